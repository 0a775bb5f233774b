"""Helpers of the chart tests: find helm and the linters, render the chart, pick containers.

Tools are looked up where ``make test`` installs them (``.cache/bin`` for helm, the venv's
``bin`` for hadolint, checkov, kubernetes-validate), then on ``PATH``. A missing tool fails the
test with what to run: the suite never silently skips a check of the chart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "loragate"
CPU_VALUES = CHART / "values-cpu.yaml"
#: Namespace the tests render into (anything but "default", which checkov flags).
NAMESPACE = "loragate"
RELEASE = "lg"

_WHERE = {
    "helm": [ROOT / ".cache" / "bin" / "helm"],
    "hadolint": [Path(sys.executable).parent / "hadolint"],
    "checkov": [Path(sys.executable).parent / "checkov"],
    "promtool": [],
}


def tool(name: str) -> str:
    """Path of ``name``; fails the test (never skips) when it is not installed."""
    for candidate in _WHERE.get(name, []):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(
        f"{name} not found (looked in {', '.join(map(str, _WHERE.get(name, []))) or 'nowhere special'} "
        f"and on PATH); `make test` (scripts/setup.sh) installs it",
        pytrace=False,
    )


def helm(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run helm; with ``check`` a non-zero exit fails the test quoting helm's output."""
    proc = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return proc


def _value_args(values: Iterable[str | os.PathLike[str]] = (), sets: Mapping[str, Any] | None = None,
                set_json: Mapping[str, Any] | None = None) -> list[str]:
    import json

    args: list[str] = []
    for file in values:
        args += ["-f", str(file)]
    for key, value in (sets or {}).items():
        if isinstance(value, float):  # --set reads 0.95 as a string
            args += ["--set-json", f"{key}={json.dumps(value)}"]
        else:
            args += ["--set-string" if isinstance(value, str) else "--set", f"{key}={_set_literal(value)}"]
    for key, value in (set_json or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def _set_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def render_text(values: Iterable[str | os.PathLike[str]] = (), sets: Mapping[str, Any] | None = None,
                set_json: Mapping[str, Any] | None = None, *, tests: bool = True) -> str:
    """``helm template`` output (hooks and test hooks included unless ``tests`` is False)."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *_value_args(values, sets, set_json)]
    if not tests:
        args.append("--skip-tests")
    return helm(*args).stdout


def render(values: Iterable[str | os.PathLike[str]] = (), sets: Mapping[str, Any] | None = None,
           set_json: Mapping[str, Any] | None = None, *, tests: bool = True) -> list[dict[str, Any]]:
    """The rendered manifests as dicts."""
    return [d for d in yaml.safe_load_all(render_text(values, sets, set_json, tests=tests)) if d]


def render_error(values: Iterable[str | os.PathLike[str]] = (), sets: Mapping[str, Any] | None = None,
                 set_json: Mapping[str, Any] | None = None) -> str:
    """The error helm prints when rendering must fail; fails the test if it renders."""
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                *_value_args(values, sets, set_json), check=False)
    if proc.returncode == 0:
        pytest.fail(f"rendering was expected to fail but succeeded for sets={sets} set_json={set_json}", pytrace=False)
    return proc.stderr


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    """The single manifest of ``kind`` (whose name ends with ``name_suffix``)."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind}*{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """A container of the engine Deployment by name."""
    by_name = {c["name"]: c for c in pod_spec(docs)["containers"]}
    assert name in by_name, f"no container {name!r}; containers: {sorted(by_name)}"
    return by_name[name]


def env_of(c: Mapping[str, Any]) -> dict[str, Any]:
    """A container's env as name -> value (a plain value, or the valueFrom mapping)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def flag_values(args: list[str], flag: str) -> list[str]:
    """The values that follow ``flag`` in ``args`` (up to the next --flag)."""
    if flag not in args:
        return []
    out = []
    for arg in args[args.index(flag) + 1:]:
        if arg.startswith("--"):
            break
        out.append(arg)
    return out


def lora_modules(args: list[str]) -> list[tuple[str, str]]:
    """``(name, path)`` of each ``--lora-modules`` item of a rendered vLLM command line (the
    chart renders vLLM's JSON form, ``{"name": ..., "path": ...}``)."""
    import json

    return [(item["name"], item["path"]) for item in map(json.loads, flag_values(args, "--lora-modules"))]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
