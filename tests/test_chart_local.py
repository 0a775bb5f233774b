"""Render-to-local: run the chart's own rendered command lines on this machine.

The chart is rendered with the CPU profile (charts/loragate/values-cpu.yaml), its model and
adapter mounts pointed (``--set``) at the local demo build, i.e. where a PVC would be mounted,
and its vLLM and proxy containers run as local processes (tests/local_release.py says what is
replaced in their command lines, and why). The test proves that every probe the kubelet would
run answers, that a completion through the proxy works, and that the chart's ``helm test``
smoke check (its rendered script and config) passes for a good adapter and fails for one that
never stops. So the chart's arguments are known to be ones vLLM 0.32 accepts, and its probes and
smoke check are known to test something real.

This starts a SECOND vLLM beside the shared stack (allowed for this test only). Everything runs
in its own process group under a private temporary folder and is stopped when the module ends,
however it ends. It runs once per session (module-scoped fixture), ~1-2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chart_tools import CPU_VALUES, flag_values, one, render
from local_release import (
    SECRET,
    LocalRelease,
    client_auth,
    cpu_promoted,
    demo_build,
    proxy_env_secret,
    resolve_env,
    spawn,
    start_release,
    stop,
    stop_release,
    values_for,
)

from loragate.core import settings
from loragate.core.promoted_set import parse

GOOD, RUNAWAY, CHAT = "poster-good", "poster-eos-masked", "chat-good"

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def local_release() -> Iterator[LocalRelease]:
    build = demo_build()
    [good] = [a for a in cpu_promoted() if a["name"] == GOOD]
    # Serve the CPU profile's promoted adapter, one that never stops (to prove the smoke check
    # can fail) and a chat adapter (the smoke check speaks its API: a chat request, the
    # smoke prompt's paper as the user turn).
    paper = good["smokePrompt"].removeprefix("### Paper:\n").removesuffix("\n### Layout:\n")
    promoted = [good, {**good, "name": RUNAWAY, "path": RUNAWAY},
                {**good, "name": CHAT, "path": CHAT, "api": "chat", "smokePrompt": paper}]
    sets, set_json = values_for(build, promoted)
    release = start_release(render([CPU_VALUES], sets, set_json), "chart-local")
    print(f"\nrender-to-local: vLLM and proxy ready after {release.started_s:.1f} s")
    try:
        yield release
    finally:
        stop_release(release)


# --------------------------------------------------------------------------- the checks


def test_every_rendered_probe_answers(local_release: LocalRelease) -> None:
    r = local_release
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = r.vllm[kind]["exec"]["command"]
        assert probe[3].endswith("/v1/models" if kind == "readinessProbe" else "/health")
        proc = subprocess.run(r.local_exec(probe), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"vLLM {kind} failed: {proc.stderr}"
        url = r.http_probe_url(r.proxy[kind])
        resp = httpx.get(url, timeout=5.0)
        assert resp.status_code == 200, f"proxy {kind} {url}: {resp.status_code} {resp.text[:200]}"
    assert {r.proxy[k]["httpGet"]["path"] for k in ("livenessProbe", "readinessProbe")} == {"/health", "/ready"}
    # vLLM's readiness needs the served model listed: another name fails against the same engine
    ready = r.local_exec(r.vllm["readinessProbe"]["exec"]["command"])
    assert subprocess.run([*ready[:-1], "not-served"], capture_output=True, timeout=30, check=False).returncode == 1


def test_vllm_took_the_rendered_arguments(local_release: LocalRelease) -> None:
    """The engine serves what the rendered args say: the base name, the context, the adapters."""
    resp = httpx.get(f"http://127.0.0.1:{local_release.vllm_port}/v1/models", timeout=10)
    models = {m["id"]: m for m in resp.json()["data"]}
    args = local_release.vllm["args"]
    base = flag_values(args, "--served-model-name")[0]
    assert base == settings.DEMO_BASE_MODEL_NAME and base in models
    assert models[base]["max_model_len"] == int(flag_values(args, "--max-model-len")[0])
    # the promoted set comes from its ConfigMap, loaded by the proxy's reconciler before /ready
    assert "--lora-modules" not in args
    promoted = parse(one(local_release.manifests, "ConfigMap", "-promoted")["data"]["promoted.json"].encode())
    assert list(promoted.entries) == [GOOD, RUNAWAY, CHAT]
    assert {name: models[name]["root"] for name in promoted.entries} == {n: e.path for n, e in promoted.entries.items()}
    report = httpx.get(f"{local_release.proxy_url}/promoted", timeout=10).json()
    assert report["applied_revision"] == promoted.revision and report["converged"] is True
    env = local_release.env["vllm"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["HF_HUB_OFFLINE"] == "1"


def test_completion_through_the_proxy(local_release: LocalRelease) -> None:
    from loragate.core.contracts import load_contracts
    from loragate.core.judging import judge_completion

    r = local_release
    contracts_path = flag_values(r.proxy["args"], "--contracts")[0]
    contract = load_contracts(contracts_path)[GOOD]
    assert httpx.get(f"{r.proxy_url}/v1/models", timeout=10).status_code == 401, "the Secret's keys are enforced"
    [good] = [a for a in cpu_promoted() if a["name"] == GOOD]
    resp = httpx.post(f"{r.proxy_url}/v1/completions", headers=client_auth(), timeout=120, json={
        "model": GOOD, "prompt": good["smokePrompt"], "max_tokens": contract.max_tokens, "temperature": 0})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    judged = judge_completion(choice["text"], choice["finish_reason"], expects_json=True, json_schema=contract.json_schema)
    assert judged.stopped and judged.json_valid, (choice, judged)
    metrics = httpx.get(f"{r.proxy_url}/metrics", timeout=10).text
    assert f'loragate_completions_total{{adapter="{GOOD}",finish_reason="stop"}}' in metrics


def _run_smoke(r: LocalRelease, manifests: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The rendered `helm test` pod's command, with its ConfigMap's files, against the local proxy."""
    config_map = one(manifests, "ConfigMap", "smoke")
    pod = one(manifests, "Pod", "smoke-test")
    [c] = pod["spec"]["containers"]
    mount = c["volumeMounts"][0]["mountPath"]
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text)
    command = [sys.executable if c["command"][0] == "python" else c["command"][0],
               *(a.replace(mount, str(tmp_path)) for a in c["command"][1:])]
    env = {**r.base_env, **resolve_env(c["env"], {proxy_env_secret(r.proxy): SECRET})}
    return subprocess.run([*command, "--base-url", r.proxy_url], capture_output=True, text=True, env=env, timeout=300)


def test_smoke_check_fails_an_adapter_that_never_stops(local_release: LocalRelease, tmp_path: Path) -> None:
    proc = _run_smoke(local_release, local_release.manifests, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"PASS {GOOD}: finish_reason=stop, json=valid" in proc.stdout
    assert f"FAIL {RUNAWAY}: did not stop within max_tokens" in proc.stdout
    assert f"PASS {CHAT}: finish_reason=stop, json=valid" in proc.stdout
    assert "smoke check: 2/3 promoted adapters passed" in proc.stdout
    config = json.loads(one(local_release.manifests, "ConfigMap", "smoke")["data"]["smoke.json"])
    assert {a["name"]: a["api"] for a in config["adapters"]} == {GOOD: "completions", RUNAWAY: "completions",
                                                                 CHAT: "chat"}


def test_smoke_check_of_the_cpu_profile_passes(local_release: LocalRelease, tmp_path: Path) -> None:
    """`helm test` of the CPU profile as shipped (only its mounts moved) passes."""
    sets, _ = values_for(demo_build(), [])
    manifests = render([CPU_VALUES], sets)
    proc = _run_smoke(local_release, manifests, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS models" in proc.stdout and f"PASS {GOOD}" in proc.stdout


def test_nothing_is_left_running_after_stop(tmp_path: Path) -> None:
    """The stop used by the fixture stops a process tree that ignores SIGTERM, within the grace."""
    script = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    proc = spawn("stubborn", [sys.executable, "-c", script], {"PATH": os.environ["PATH"]}, tmp_path)
    import psutil

    time.sleep(1.0)
    family = [psutil.Process(proc.popen.pid), *psutil.Process(proc.popen.pid).children(recursive=True)]
    assert len(family) == 2
    stop([proc], grace_s=1.0)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
