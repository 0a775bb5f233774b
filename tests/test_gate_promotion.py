"""Promotion: the record, the promoted set the chart takes, atomic and locked updates.

The reliability tests run promotions in child processes: one killed in the middle of writing
the promoted set (the previous set must stay whole), several at once (every one must land).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from chart_tools import CHART, CPU_VALUES, helm, one

from loragate.acceptance.promotion import PromotionError, promote, read_promoted
from loragate.core.contracts import load_contracts
from loragate.core.promoted_set import parse as parse_set
from loragate.core.promoted_set import revision as set_revision
from loragate.core.errors import LoragateError

ROOT = Path(__file__).resolve().parent.parent


def make_adapters(root: Path, names: list[str]) -> Path:
    """An adapters folder with an adapters file and a small weights file per adapter."""
    root.mkdir(parents=True, exist_ok=True)
    doc = {"base_model": "base", "adapters": {}}
    for i, name in enumerate(names):
        (root / name).mkdir()
        (root / name / "adapter_model.safetensors").write_bytes(f"weights of {name} {i}".encode() * 100)
        doc["adapters"][name] = {"path": name, "output": "json", "max_tokens": 64}
    (root / "adapters.yaml").write_text(yaml.safe_dump(doc))
    return root / "adapters.yaml"


def do_promote(contracts_file: Path, name: str, folder: Path):
    cs = load_contracts(contracts_file)
    return promote(cs[name], adapters_dir=cs.adapters_dir, folder=folder, thresholds={"stop_rate": 0.9},
                   measured={"stop_rate": 1.0, "json_validity": 0.97}, checks=[], smoke_prompt=f"prompt of {name}",
                   report="report.json", endpoint="http://engine")


def test_promotion_writes_a_record_and_the_chart_values(tmp_path: Path) -> None:
    contracts = make_adapters(tmp_path / "adapters", ["poster-a", "poster-b"])
    folder = tmp_path / "promoted"
    done = do_promote(contracts, "poster-a", folder)
    record = json.loads(done.record_path.read_text())
    weights = tmp_path / "adapters" / "poster-a" / "adapter_model.safetensors"
    assert record["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["adapter"] == "poster-a" and record["base_model"] == "base" and record["verdict"] == "PROMOTE"
    assert record["thresholds"] == {"stop_rate": 0.9} and record["measured"]["json_validity"] == 0.97
    assert record["promoted_at"].endswith("+00:00")
    do_promote(contracts, "poster-b", folder)
    values = yaml.safe_load(done.values_path.read_text())
    assert values == {"adapters": {"promoted": [
        {"name": "poster-a", "path": "poster-a", "output": "json", "maxTokens": 64, "smokePrompt": "prompt of poster-a"},
        {"name": "poster-b", "path": "poster-b", "output": "json", "maxTokens": 64, "smokePrompt": "prompt of poster-b"},
    ]}}
    # The chart's own schema accepts the entries ...
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(values["adapters"]["promoted"], schema["properties"]["adapters"]["properties"]["promoted"])
    # ... and `helm upgrade -f` with it serves exactly the promoted set.
    rendered = helm("template", "lg", str(CHART), "-f", str(CPU_VALUES), "-f", str(done.values_path)).stdout
    promoted = one([d for d in yaml.safe_load_all(rendered) if d], "ConfigMap", "-promoted")["data"]["promoted.json"]
    assert json.loads(promoted)["adapters"] == [{"name": "poster-a", "path": "poster-a"},
                                                {"name": "poster-b", "path": "poster-b"}]
    assert "poster-good" not in rendered  # the CPU profile's own list is replaced
    assert set(read_promoted(folder)) == {"poster-a", "poster-b"}
    # ... and the reconciler's file of the same set, paths under the local adapters folder
    second = do_promote(contracts, "poster-b", folder)
    data = (folder / "promoted-set.json").read_bytes()
    reconciled = parse_set(data)
    adapters = (tmp_path / "adapters").resolve()
    assert {n: e.path for n, e in reconciled.entries.items()} == {
        "poster-a": str(adapters / "poster-a"), "poster-b": str(adapters / "poster-b")}
    assert second.to_dict()["revision"] == reconciled.revision == set_revision(data)
    assert json.loads(data)["adapters"] == json.loads(promoted)["adapters"]  # the chart's, under its own mount


def test_an_adapter_path_outside_the_adapters_folder_is_refused(tmp_path: Path) -> None:
    contracts = make_adapters(tmp_path / "adapters", ["poster-a"])
    cs = load_contracts(contracts)
    outside = dataclasses.replace(cs["poster-a"], path=tmp_path)
    with pytest.raises(LoragateError, match="escapes"):
        promote(outside, adapters_dir=cs.adapters_dir, folder=tmp_path / "promoted", thresholds={}, measured={},
                checks=[], smoke_prompt=None, report=None, endpoint="x")
    assert not (tmp_path / "promoted" / "promoted.json").exists()
    (tmp_path / "escape.yaml").write_text(yaml.safe_dump(
        {"base_model": "b", "adapters": {"x": {"path": "../../etc"}}}))
    with pytest.raises(LoragateError, match="escapes"):
        load_contracts(tmp_path / "escape.yaml")


def test_a_corrupt_promoted_set_is_an_error_not_an_empty_set(tmp_path: Path) -> None:
    folder = tmp_path / "promoted"
    folder.mkdir()
    (folder / "promoted.json").write_text("{torn")
    with pytest.raises(PromotionError, match="cannot read the promoted set"):
        read_promoted(folder)


CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_gate_promotion import do_promote
    contracts, name, folder, mode = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    if mode == "hang-in-set-write":
        import loragate.acceptance.promotion as p
        real_fsync = os.fsync
        def fsync(fd):
            # Hang once the new promoted set's temporary file is written, before it replaces the old.
            target = os.readlink(f"/proc/self/fd/{{fd}}")
            if ".promoted.json." in target:
                Path(sys.argv[5]).write_text("in the middle")
                time.sleep(600)
            real_fsync(fd)
        p.os.fsync = fsync
    if mode == "barrier":
        while not Path(sys.argv[5]).exists():
            time.sleep(0.005)
    do_promote(contracts, name, folder)
""").format(tests=str(Path(__file__).resolve().parent))


def child(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_killed_mid_write_leaves_the_previous_set_whole(tmp_path: Path) -> None:
    contracts = make_adapters(tmp_path / "adapters", ["poster-a", "poster-b", "poster-c"])
    folder = tmp_path / "promoted"
    do_promote(contracts, "poster-a", folder)
    before = {p.name: p.read_bytes() for p in (folder / "promoted.json", folder / "values.yaml")}
    flag = tmp_path / "flag"
    proc = child(str(contracts), "poster-b", str(folder), "hang-in-set-write", str(flag))
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never reached the write"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # The temporary file of the interrupted write is there, the set is not touched.
    assert any(p.name.startswith(".promoted.json.") for p in folder.iterdir())
    assert {p.name: p.read_bytes() for p in (folder / "promoted.json", folder / "values.yaml")} == before
    assert set(read_promoted(folder)) == {"poster-a"}
    # The dead writer's lock is gone with it: the next promotion goes through at once.
    t0 = time.monotonic()
    do_promote(contracts, "poster-c", folder)
    assert time.monotonic() - t0 < 5
    assert set(read_promoted(folder)) == {"poster-a", "poster-c"}
    promoted = yaml.safe_load((folder / "values.yaml").read_text())["adapters"]["promoted"]
    assert [e["name"] for e in promoted] == ["poster-a", "poster-c"]


def test_concurrent_promotions_of_different_adapters_all_land(tmp_path: Path) -> None:
    names = [f"poster-{i}" for i in range(6)]
    contracts = make_adapters(tmp_path / "adapters", names)
    folder = tmp_path / "promoted"
    go = tmp_path / "go"
    procs = [child(str(contracts), name, str(folder), "barrier", str(go)) for name in names]
    time.sleep(1.5)  # every child imported and waiting at the barrier
    go.write_text("go")
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert set(read_promoted(folder)) == set(names)
    promoted = yaml.safe_load((folder / "values.yaml").read_text())["adapters"]["promoted"]
    assert sorted(e["name"] for e in promoted) == names
    assert len(list((folder / "records").iterdir())) == len(names)
