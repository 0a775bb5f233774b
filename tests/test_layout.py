"""The house rules of the code layout, read from the code itself (imports, by AST).

- Roles import the core, never each other's internals: nothing under ``acceptance/``,
  ``loadtest/`` or the chart's smoke check imports the proxy (``loragate.server``).
- The gate and the load test take explicit inputs: outside the CLI layer (``loragate/cli``) and
  the demo (``demo/``) nothing imports the local stack (``loragate.stack``) or the demo build
  (``loragate.demo``).
- The core imports no role.
- Every module imports by the one namespace, and the type checker resolves every import
  (``make test`` runs mypy; this test runs it too, for unresolved imports only).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE_CHECK = ROOT / "charts" / "loragate" / "files" / "smoke_check.py"


def modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def offenders(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in paths:
        bad = sorted(n for n in imported(path) if n in forbidden or n.startswith(tuple(f + "." for f in forbidden)))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def test_the_gate_the_load_test_and_the_smoke_check_never_import_the_proxy():
    paths = modules("acceptance", "loadtest") + [SMOKE_CHECK]
    assert len(paths) > 15
    assert offenders(paths, ("loragate.server",)) == {}


def test_only_the_cli_layer_and_the_demo_read_the_local_stack_or_the_demo_build():
    everything = modules("loragate", "server", "acceptance", "loadtest") + [SMOKE_CHECK]
    allowed = {p for p in modules("loragate/cli")} | {p for p in modules("loragate/stack")}
    checked = [p for p in everything if p not in allowed]
    assert offenders(checked, ("loragate.stack", "loragate.demo")) == {}
    # the local stack itself serves what it is told: it does not read the demo build either
    assert offenders(modules("loragate/stack"), ("loragate.demo",)) == {}


def test_the_core_imports_no_role():
    roles = ("loragate.server", "loragate.acceptance", "loragate.loadtest", "loragate.demo", "loragate.stack",
             "loragate.cli", "loragate.bench")
    assert offenders(modules("loragate/core"), roles) == {}


def test_the_offender_check_sees_function_level_imports(tmp_path):
    """The rules above would pass vacuously if imports inside functions went unseen."""
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from loragate.stack import running_stack\n    import loragate.server.app\n")
    assert imported(sample) >= {"loragate.stack", "loragate.stack.running_stack", "loragate.server.app"}


@pytest.mark.timeout(600)
def test_the_type_checker_resolves_every_import_and_finds_no_error():
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    unresolved = [line for line in run.stdout.splitlines()
                  if "[import-not-found]" in line or "[import]" in line or "Cannot find implementation" in line]
    assert unresolved == []
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]  # and no type error either
    checked = re.search(r"(?:checked|in) (\d+) source files?", run.stdout.splitlines()[-1])
    assert checked and int(checked.group(1)) >= 60, run.stdout[-500:]  # the whole tree, not a corner of it
