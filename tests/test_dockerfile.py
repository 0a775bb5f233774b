"""The Dockerfile of the proxy/gate image: hadolint, and what the image must be.

No Docker daemon runs here, so the image is not built; instead:

- hadolint passes with every rule at its lowest threshold (style);
- the file's structure: two stages, every base image pinned to an exact version (or digest),
  the final stage non-root, without pip/compilers/package installs, with a HEALTHCHECK on the
  proxy's /health, exposing the proxy port, running ``loragate``;
- the build stage's COPY lines carry everything the package is built from: the copied files
  alone build a wheel that holds the proxy and the modules the chart's smoke check imports;
- the HEALTHCHECK command itself answers against the running proxy (only its port replaced).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from chart_tools import ROOT, container, render, tool

from loragate.core import settings

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)

    def all(self, instruction: str) -> list[str]:
        return [rest for ins, rest in self.instructions if ins == instruction]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined."""
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = rest.split()
            base = parts[0]
            for name, value in args.items():
                base = base.replace("${" + name + "}", value).replace("$" + name, value)
            stages.append(Stage(base, parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None))
        elif not stages and instruction == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif stages:
            stages[-1].instructions.append((instruction, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def test_hadolint_passes() -> None:
    proc = subprocess.run([tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_hadolint_is_a_real_check(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nCMD python app.py\n")
    proc = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3008" in proc.stdout  # latest tag; unpinned apt package


def test_multi_stage_on_pinned_bases(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "a build stage and a slim final stage"
    for stage in stages:
        pinned_tag = re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", stage.base)
        pinned_digest = re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", stage.base)
        assert pinned_tag or pinned_digest, f"base image {stage.base!r} is not pinned to an exact version or digest"
        assert "slim" in stage.base or "distroless" in stage.base or pinned_digest, stage.base
    assert stages[0].base == stages[-1].base, "the venv is copied across: both stages need the same Python"


def test_final_stage_is_slim_and_non_root(stages: list[Stage]) -> None:
    final = stages[-1]
    [user] = final.all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"USER {user}: a numeric, unprivileged UID"
    chart_uid = container(render(), "proxy")["securityContext"]["runAsUser"]
    assert int(uid) == chart_uid, "the chart's proxy.securityContext runs the image's user"
    runs = " ".join(final.all("RUN"))
    for forbidden in ("apt-get install", "apk add", "pip install", "gcc", "build-essential", "make "):
        assert forbidden not in runs, f"the final stage must not run {forbidden!r}"
    assert re.search(r"pip uninstall .*pip", runs), "the final stage drops the base image's pip"
    copies = final.all("COPY")
    assert copies and all(c.startswith("--from=") for c in copies), "the final stage copies only built artefacts"


def test_healthcheck_entrypoint_and_port(stages: list[Stage]) -> None:
    final = stages[-1]
    [health] = final.all("HEALTHCHECK")
    assert f"127.0.0.1:{settings.PROXY_PORT}/health" in health
    assert str(settings.PROXY_PORT) in final.all("EXPOSE")[0].split()
    [entrypoint] = final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["loragate"]
    [cmd] = final.all("CMD")
    assert json.loads(cmd)[0] == "proxy"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["loragate"] == "loragate.cli:main"
    # The chart runs the same entry point in the proxy container.
    assert container(render(), "proxy")["command"][:2] == ["loragate", "proxy"]


def test_healthcheck_command_answers_against_the_proxy(stack, stages: list[Stage]) -> None:
    """Run the HEALTHCHECK's command against the running proxy, only its port replaced."""
    [health] = stages[-1].all("HEALTHCHECK")
    command = json.loads(health[health.index("CMD") + 3:].strip())
    assert command[0] == "python"
    port = stack.proxy_url.rsplit(":", 1)[1]
    live = [sys.executable, *(a.replace(f":{settings.PROXY_PORT}/", f":{port}/") for a in command[1:])]
    assert subprocess.run(live, capture_output=True, timeout=30).returncode == 0
    dead = [sys.executable, *(a.replace(f":{settings.PROXY_PORT}/", ":9/") for a in command[1:])]
    assert subprocess.run(dead, capture_output=True, timeout=30).returncode != 0


def _copied_paths(stage: Stage) -> list[str]:
    paths = []
    for rest in stage.all("COPY"):
        if rest.startswith("--from="):
            continue
        parts = shlex.split(rest)
        paths += [p.rstrip("/") for p in parts[:-1] if not p.startswith("--")]
    return paths


def test_build_stage_copies_every_package_folder(stages: list[Stage]) -> None:
    copied = set(_copied_paths(stages[0]))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    missing = sorted(f for f in folders if not any(f == c or f.startswith(c + "/") for c in copied))
    assert not missing, f"pyproject's package folders not copied: {missing}"
    assert {"pyproject.toml", "README.md"} <= copied  # README.md: pyproject's readme
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for path in copied:
        assert path not in ignored, f".dockerignore drops {path}, which the Dockerfile copies"


def test_copied_files_alone_build_the_package(stages: list[Stage], tmp_path: Path) -> None:
    """What the build stage copies is enough: a wheel built from only those files holds the
    proxy and what the chart's smoke check imports."""
    context = tmp_path / "context"
    context.mkdir()
    for path in _copied_paths(stages[0]):
        source = ROOT / path
        if source.is_dir():
            shutil.copytree(source, context / path, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, context / path)
    out = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "-w", str(out), str(context)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [wheel] = list(out.glob("loragate-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("loragate/cli/__init__.py", "loragate/server/cli.py", "loragate/server/app.py",
                   "loragate/core/judging.py", "loragate/core/contracts.py", "loragate/acceptance/gate.py"):
        assert module in names, f"{module} missing from the image's package"
    assert any(n.endswith("entry_points.txt") for n in names)
