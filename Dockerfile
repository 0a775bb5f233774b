# The loragate image: the proxy (`loragate proxy`, the chart's sidecar), the smoke check the
# chart's `helm test` runs, and the gate (`loragate gate`, with LORAGATE_EXTRAS=gate).
#
#   docker build -t ghcr.io/<you>/loragate:0.1.0 .                       # proxy only (~150 MB)
#   docker build --build-arg LORAGATE_EXTRAS=gate -t <...>:0.1.0-gate .   # + gate deps (torch: GBs)
#
# Two stages: `build` installs the package into a virtual environment; the final stage copies
# only that environment onto the same pinned slim Python, without pip, setuptools or compilers,
# and runs as the unprivileged user 10001 (the chart's proxy.securityContext).
# tests/test_dockerfile.py lints this file with hadolint and checks that the files it copies
# are enough to build the package.

# Exact tag: Debian 12 slim with Python 3.11 (the project's requires-python floor).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Only what the package is built from (pyproject.toml's package-dir folders).
COPY pyproject.toml README.md constraints.txt ./
COPY loragate/ loragate/
COPY server/ server/
COPY acceptance/ acceptance/
COPY loadtest/ loadtest/
COPY demo/ demo/
# "" installs the proxy's dependencies only; "gate" adds the gate's (pyproject.toml extras).
ARG LORAGATE_EXTRAS=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN /opt/venv/bin/pip install --no-compile -c constraints.txt ".${LORAGATE_EXTRAS:+[${LORAGATE_EXTRAS}]}" \
    && /opt/venv/bin/pip uninstall --yes pip setuptools wheel \
    && find /opt/venv -depth -name __pycache__ -type d -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="loragate" \
      org.opencontainers.image.description="Metrics proxy and acceptance gate for LoRA adapters on vLLM" \
      org.opencontainers.image.licenses="Apache-2.0"
# No packaging or build tools at run time: drop the base image's pip, setuptools and wheel.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
    && groupadd --system --gid 10001 loragate \
    && useradd --system --uid 10001 --gid loragate --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin loragate
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
# loragate.core.settings.PROXY_PORT
EXPOSE 8000
# The proxy's liveness endpoint (it never follows the upstream, so a loading engine is no fault).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["loragate"]
# The proxy needs --upstream (or LORAGATE_PROXY_UPSTREAM) and --contracts; the chart passes both.
CMD ["proxy", "--host", "0.0.0.0", "--port", "8000"]
