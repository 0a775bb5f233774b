"""The gate fails closed: every way it can fail to check an adapter is a REJECT or an error,
never a PROMOTE, and never touches the promoted set.

These tests run ``loragate gate`` against the stack's real vLLM through a recording relay
(:mod:`relay`): the relay shows what the gate sent and can make the real engine slow, so a test
can stop the suite at will. The verdicts on each demo adapter through the proxy are in
``test_gate_demo.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import yaml
from conftest import interruptible
from relay import Relay

from loragate.acceptance import report as rep
from loragate.acceptance.gate import GateOptions, run_gate
from loragate.cli.defaults import gate_options
from loragate.core import engine as eng
from loragate.core.errors import LoragateError, UsageError
from loragate.stack import free_port

pytestmark = pytest.mark.stack


@pytest.fixture
def relay(stack) -> Iterator[Relay]:
    """A recording relay in front of the stack's real vLLM (not the proxy: the gate's runtime
    LoRA calls go straight to the engine, as with ``--engine-url``)."""
    with Relay(stack.vllm_url) as r:
        yield r


@pytest.fixture
def candidates(stack, tmp_path: Path) -> Iterator[Path]:
    """A contracts file with two candidates the engine does not serve yet: ``cand-good`` (the
    poster-good weights) and ``cand-runaway`` (the poster-eos-masked weights). Whatever a test
    leaves loaded is unloaded afterwards, so the shared engine is as it was."""
    contracts = yaml.safe_load(Path(stack.contracts_file).read_text())
    contracts["adapters_dir"] = str(Path(stack.contracts_file).parent)
    contracts["adapters"]["cand-good"] = dict(contracts["adapters"]["poster-good"])
    contracts["adapters"]["cand-runaway"] = dict(contracts["adapters"]["poster-eos-masked"])
    path = tmp_path / "candidates.yaml"
    path.write_text(yaml.safe_dump(contracts))
    vllm = eng.normalize_endpoint(stack.vllm_url)
    try:
        yield path
    finally:
        served = eng.fetch_models(vllm)
        for name in ("cand-good", "cand-runaway"):
            if served.get(name) is not None:
                eng.unload_adapter(vllm, name)


@pytest.fixture
def promoted(tmp_path: Path) -> Path:
    """A promoted folder holding an earlier promotion; tests assert it is left byte for byte."""
    folder = tmp_path / "promoted"
    folder.mkdir()
    (folder / "promoted.json").write_text('{"version": 1, "adapters": {}}\n')
    (folder / "values.yaml").write_text("adapters:\n  promoted: []\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def gate_cmd(endpoint: str, build, report_dir: Path, promoted: Path, *extra: str, adapter: str = "poster-good",
             contracts: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "loragate.cli", "gate", "--endpoint", endpoint, "--adapter", adapter,
            "--contracts", str(contracts or build.adapters_file), "--prompts", str(build.heldout_prompts),
            "--report-dir", str(report_dir), "--promote", "--promoted-dir", str(promoted), *extra]


def run_cli(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def report_of(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


# --------------------------------------------------------------------------- through the CLI


def test_a_candidate_loaded_at_runtime_promotes_stays_loaded_and_the_gate_sends_only_what_it_should(
        stack, relay, build, candidates, tmp_path, promoted) -> None:
    rank = build.manifest()["serve"]["max_lora_rank"]  # the contracts copy is not the demo build's own
    proc = run_cli(gate_cmd(relay.url, build, tmp_path / "r", promoted, "--load-into-engine",
                            "--max-lora-rank", str(rank), adapter="cand-good", contracts=candidates))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "VERDICT cand-good: PROMOTE" in proc.stdout
    report = report_of(tmp_path / "r")
    assert report["verdict"] == "PROMOTE" and report["reasons"] == []
    assert report["engine"]["max_lora_rank_source"] == "--max-lora-rank"
    assert report["engine"]["loaded_by_gate"] is True
    assert set(report["timings"]) >= {"preflight", "static", "plan", "suite", "report", "promotion", "total"}
    assert report["promotion"]["record"] and Path(report["promotion"]["record"]).is_file()
    values = yaml.safe_load((promoted / "values.yaml").read_text())
    assert [e["name"] for e in values["adapters"]["promoted"]] == ["cand-good"]
    ET.parse(tmp_path / "r" / "junit.xml")
    ET.parse(tmp_path / "r" / "suite.xml")  # pytest's own
    # Loaded through vLLM's runtime API with the contract's folder, and kept: it was promoted.
    path = str(build.adapter_path("poster-good").resolve())
    assert [c.body for c in relay.calls("/v1/load_lora_adapter")] == [{"lora_name": "cand-good", "lora_path": path}]
    assert not relay.calls("/v1/unload_lora_adapter")
    assert eng.fetch_models(eng.normalize_endpoint(stack.vllm_url)).get("cand-good") is not None
    # What was sent: the diagnosis' scoring requests (token ids, echo, nothing generated) ...
    sent = relay.completion_bodies()
    scoring = [b for b in sent if b.get("echo") is True and b.get("max_tokens") == 0]
    for body in scoring:
        assert set(body) == {"model", "prompt", "echo", "max_tokens", "logprobs", "temperature",
                             "return_tokens_as_token_ids"}, body
        assert all(isinstance(t, int) for t in body["prompt"]) and body["logprobs"] == 1
    assert len(scoring) == 2 * 16 and {b["model"] for b in scoring} == {"cand-good", stack.base_model}
    assert report["diagnosis"]["available"] and report["diagnosis"]["findings"] == []
    # ... then the suite's: the training template, the contract's budget, greedy and seeded sampling, nothing else.
    bodies = [b for b in sent if b not in scoring]
    # The candidate, and the baseline it is compared with (the base model: nothing promoted before).
    assert report["baseline"]["model"] == stack.base_model
    assert {b["model"] for b in bodies} == {"cand-good", stack.base_model}
    for body in bodies:
        assert set(body) <= {"model", "prompt", "max_tokens", "temperature", "seed"}, body
        assert body["prompt"].startswith("### Paper:\n") and body["prompt"].endswith("\n### Layout:\n")
        assert body["max_tokens"] == 160
    temps = {body["temperature"] for body in bodies}
    assert temps == {0.0, 0.2}
    seeds = sorted(b["seed"] for b in bodies if b["temperature"] > 0)
    assert seeds == list(range(seeds[0], seeds[0] + 35))


def test_endpoint_down_is_a_reject(build, tmp_path, promoted) -> None:
    before = snapshot(promoted)
    proc = run_cli(gate_cmd(f"http://127.0.0.1:{free_port()}", build, tmp_path / "r", promoted))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = report_of(tmp_path / "r")
    assert report["verdict"] == "REJECT"
    assert report["reasons"][0].startswith("endpoint: endpoint unreachable: GET http://127.0.0.1:")
    assert snapshot(promoted) == before


def test_an_engine_that_stops_answering_mid_suite_is_a_reject(relay, build, tmp_path, promoted) -> None:
    relay.delay_s = 0.5
    before = snapshot(promoted)
    gate = subprocess.Popen(gate_cmd(relay.url, build, tmp_path / "r", promoted), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_suite(tmp_path / "r", gate, min_samples=4)
    relay.refuse()
    out, err = gate.communicate(timeout=240)
    assert gate.returncode == 1, out + err
    report = report_of(tmp_path / "r")
    assert report["verdict"] == "REJECT" and report["promotion"] is None
    # The engine is named as the cause, first; the rates count the failed requests as failures.
    assert report["reasons"][0].startswith("engine answered: "), report["reasons"]
    assert "failed (first: " in report["reasons"][0]
    answered = next(c for c in report["checks"] if c["id"] == "suite.engine_answers")
    assert answered["measured"]["failed"] > 0 and answered["measured"]["requests"] > answered["measured"]["failed"]
    assert snapshot(promoted) == before


def test_a_report_folder_that_cannot_be_written_is_an_error(relay, build, tmp_path, promoted) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = snapshot(promoted)
    proc = run_cli(gate_cmd(relay.url, build, blocker / "reports", promoted))
    assert proc.returncode == 2
    assert "is not writable" in proc.stderr
    # found out before anything was sent: at most the model list was read (is the adapter served?)
    assert all((r.method, r.path) == ("GET", "/v1/models") for r in relay.requests), relay.requests
    assert snapshot(promoted) == before


def _wait_for_suite(report_dir: Path, gate: subprocess.Popen, min_samples: int = 1) -> int:
    """The pytest child's pid, once it has judged ``min_samples`` completions."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert gate.poll() is None, gate.communicate()
        samples = report_dir / "samples.jsonl"
        pid_file = report_dir / "suite.pid"
        if pid_file.exists() and samples.exists() and len(samples.read_text().splitlines()) >= min_samples:
            return int(pid_file.read_text())
        time.sleep(0.1)
    raise AssertionError("the suite never started")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_suite_is_a_reject_and_promotes_nothing(relay, build, tmp_path, promoted, sig) -> None:
    relay.delay_s = 1.0
    before = snapshot(promoted)
    gate = subprocess.Popen(gate_cmd(relay.url, build, tmp_path / "r", promoted), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    child = _wait_for_suite(tmp_path / "r", gate)
    gate.send_signal(sig)
    out, err = gate.communicate(timeout=60)
    assert gate.returncode == 130, out + err
    report = report_of(tmp_path / "r")
    assert report["verdict"] == "REJECT" and report["interrupted"]
    assert any("interrupted during suite" in r for r in report["reasons"])
    assert any(r.startswith("suite completed: no; the gate was interrupted") for r in report["reasons"])
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert snapshot(promoted) == before


def test_a_killed_suite_child_is_a_reject(relay, build, tmp_path, promoted) -> None:
    relay.delay_s = 0.5
    before = snapshot(promoted)
    gate = subprocess.Popen(gate_cmd(relay.url, build, tmp_path / "r", promoted), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    child = _wait_for_suite(tmp_path / "r", gate, min_samples=8)
    os.kill(child, signal.SIGKILL)
    out, err = gate.communicate(timeout=60)
    assert gate.returncode == 1, out + err
    report = report_of(tmp_path / "r")
    assert report["verdict"] == "REJECT" and not report["interrupted"]
    complete = next(c for c in report["checks"] if c["id"] == "suite.complete")
    assert not complete["passed"] and "killed by signal 9" in complete["summary"]
    assert complete["measured"]["reported"] < complete["measured"]["planned"]
    assert report["runs"] and sum(r["n"] for r in report["runs"]) >= 8  # what was measured is reported
    assert snapshot(promoted) == before


# --------------------------------------------------------------------------- in process


def test_an_adapter_the_engine_does_not_serve_is_a_usage_error_before_any_request(relay, build, candidates,
                                                                                  tmp_path, promoted) -> None:
    """Not served and no --load-into-engine: the command is wrong, not the adapter. A usage error
    (exit 2 from the CLI), before a report folder, a load or a completion."""
    before = snapshot(promoted)
    rank = build.manifest()["serve"]["max_lora_rank"]
    with pytest.raises(UsageError, match="does not serve adapter 'cand-good'.*--load-into-engine"):
        run_gate(gate_options(GateOptions(endpoint=relay.url, adapter="cand-good", contracts=candidates,
                                          prompts=build.heldout_prompts, report_dir=tmp_path / "r", promote=True,
                                          promoted_dir=promoted, max_lora_rank=rank)), quiet=True)
    # the rank limit unknown (behind a proxy that is not the local stack's): the same, named
    with pytest.raises(UsageError, match="--max-lora-rank is not known"):
        run_gate(gate_options(GateOptions(endpoint=relay.url, adapter="cand-good", contracts=candidates,
                                          prompts=build.heldout_prompts, report_dir=tmp_path / "r",
                                          promoted_dir=promoted, load_into_engine=True)), quiet=True)
    assert not (tmp_path / "r").exists()
    assert not relay.completion_bodies() and not relay.calls("/v1/load_lora_adapter")
    assert snapshot(promoted) == before


def test_a_report_that_cannot_be_written_at_the_end_promotes_nothing(relay, build, tmp_path, promoted,
                                                                     monkeypatch) -> None:
    before = snapshot(promoted)
    real = rep.write_file

    def failing(path: Path, text: str) -> None:
        if path.name == "report.html":
            raise rep.ReportError(f"cannot write the report {path}: No space left on device")
        real(path, text)

    monkeypatch.setattr(rep, "write_file", failing)
    with pytest.raises(rep.ReportError, match="No space left"):
        run_gate(gate_options(GateOptions(endpoint=relay.url, adapter="poster-good", contracts=build.adapters_file,
                             prompts=build.heldout_prompts, report_dir=tmp_path / "r", promote=True,
                             promoted_dir=promoted)), quiet=True)
    assert len(relay.completion_bodies()) > 100  # the adapter was fully checked (and would have passed) ...
    assert snapshot(promoted) == before  # ... but nothing was promoted


def test_a_rejected_candidate_loaded_at_runtime_is_unloaded(stack, relay, build, candidates, tmp_path,
                                                            promoted) -> None:
    before = snapshot(promoted)
    result = run_gate(gate_options(GateOptions(endpoint=relay.url, adapter="cand-runaway", contracts=candidates,
                                  prompts=build.heldout_prompts, report_dir=tmp_path / "r", promote=True,
                                  promoted_dir=promoted, load_into_engine=True,
                                  max_lora_rank=build.manifest()["serve"]["max_lora_rank"])), quiet=True)
    assert result.verdict == "REJECT" and result.promotion is None
    assert result.reasons[0].startswith("EOS never learned"), result.reasons
    assert result.reasons[1].startswith("stop rate (greedy, 35 held-out prompts): 0/35")
    assert result.report["engine"]["loaded_by_gate"] is True
    path = str(build.adapter_path("poster-eos-masked").resolve())
    assert [c.body for c in relay.calls("/v1/load_lora_adapter")] == [{"lora_name": "cand-runaway", "lora_path": path}]
    assert [c.body for c in relay.calls("/v1/unload_lora_adapter")] == [{"lora_name": "cand-runaway"}]
    assert eng.fetch_models(eng.normalize_endpoint(stack.vllm_url)).get("cand-runaway") is None
    assert snapshot(promoted) == before


def test_an_error_of_its_inputs_mid_run_unloads_what_the_gate_loaded(stack, relay, build, candidates, tmp_path,
                                                                     promoted) -> None:
    """A prompts file broken past its first line is found only when the run is planned, after the
    runtime load: the error ends the run (exit 2), and the adapter is unloaded all the same."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text(build.heldout_prompts.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(LoragateError, match="broken.jsonl"):
        run_gate(gate_options(GateOptions(endpoint=relay.url, adapter="cand-good", contracts=candidates,
                                          prompts=broken, report_dir=tmp_path / "r", promoted_dir=promoted,
                                          load_into_engine=True,
                                          max_lora_rank=build.manifest()["serve"]["max_lora_rank"])), quiet=True)
    assert [c.body["lora_name"] for c in relay.calls("/v1/load_lora_adapter")] == ["cand-good"]
    assert [c.body for c in relay.calls("/v1/unload_lora_adapter")] == [{"lora_name": "cand-good"}]
    assert eng.fetch_models(eng.normalize_endpoint(stack.vllm_url)).get("cand-good") is None
    assert snapshot(promoted) == {"promoted.json": b'{"version": 1, "adapters": {}}\n',
                                  "values.yaml": b"adapters:\n  promoted: []\n"}
