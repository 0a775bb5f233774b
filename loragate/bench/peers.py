"""What a user could put in front of vLLM instead of the proxy: the peers ``loragate bench proxy``
measures beside it, in the same rounds, as pass-through floors.

- ``nginx``: Debian's package, a reverse proxy with a keep-alive pool to the upstream and
  response buffering off (so streams pass event by event, as an LLM gateway must relay them).
  Used from ``PATH`` when installed; otherwise the bench fetches the package with
  ``apt-get download`` and unpacks it (``dpkg-deb -x``) under :func:`peers_dir`, without
  installing anything on the machine.
- ``vllm-router``: vLLM's own router (Rust, from PyPI), one worker, round-robin policy (it has
  nothing to route between: the cheapest of its policies). Used when importable; otherwise
  the bench installs the pinned wheel with ``pip install --target`` under :func:`peers_dir`
  (``--no-deps``: its Python launcher needs only packages the gate's environment has).

Neither judges nor counts anything: what they spend per request is the floor of a proxy that
only relays. A peer that cannot be found or set up is left out with a printed note.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from loragate.core import settings

#: The peers, in the order the bench reports them.
PEERS = ("nginx", "vllm-router")
#: The vllm-router release the bench installs when none is importable.
VLLM_ROUTER_VERSION = "0.1.17"

NGINX_CONF = """\
# written by loragate bench proxy: a pass-through reverse proxy to the bench upstream
worker_processes 1;
daemon off;
master_process on;
error_log stderr warn;
pid {workdir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream engine {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def peers_dir() -> Path:
    """Where the bench unpacks or installs peers it had to fetch (under the loragate home)."""
    return settings.home() / "peers"


@dataclass
class Peer:
    """A peer ready to start: how to run it, and what it is."""

    name: str
    version: str
    #: The command, with ``{port}``, ``{upstream_port}`` and ``{workdir}`` to fill in.
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    #: Where it came from: ``PATH``, the environment, or what the bench set up.
    source: str = ""

    def command(self, port: int, upstream_port: int, workdir: Path) -> list[str]:
        return [a.format(port=port, upstream_port=upstream_port, workdir=workdir) for a in self.argv]

    def start(self, port: int, upstream_port: int, workdir: Path, log) -> subprocess.Popen:
        """Start it on ``port`` in front of the upstream on ``upstream_port``; ``workdir`` holds its
        files, ``log`` gets its output."""
        workdir.mkdir(parents=True, exist_ok=True)
        if self.name == "nginx":
            (workdir / "nginx.conf").write_text(NGINX_CONF.format(port=port, upstream_port=upstream_port,
                                                                  workdir=workdir))
        return subprocess.Popen(self.command(port, upstream_port, workdir), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **self.env})


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _nginx_version(binary: Path) -> str | None:
    try:
        out = _run([str(binary), "-v"], timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stderr or out.stdout).strip()
    return text.split("/", 1)[1] if out.returncode == 0 and "/" in text else None


def _nginx(setup: bool) -> tuple[Peer | None, str]:
    unpacked = peers_dir() / "nginx" / "usr" / "sbin" / "nginx"
    candidates = [(Path(p), "PATH") for p in [shutil.which("nginx")] if p] + [(unpacked, f"unpacked in {unpacked.parents[2]}")]
    for binary, source in candidates:
        version = _nginx_version(binary) if binary.exists() else None
        if version:
            return Peer("nginx", version, [str(binary), "-p", "{workdir}", "-c", "{workdir}/nginx.conf", "-e", "stderr"],
                        source=source), ""
    if not setup:
        return None, "nginx: not installed and not set up (run without --no-peer-setup to fetch Debian's package)"
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return None, "nginx: not installed, and no apt-get/dpkg-deb to fetch Debian's package"
    target = unpacked.parents[2]
    with tempfile.TemporaryDirectory(prefix="loragate-nginx-") as tmp:
        try:
            got = _run(["apt-get", "download", "nginx"], cwd=Path(tmp))
            debs = sorted(Path(tmp).glob("nginx_*.deb"))
            if got.returncode != 0 or not debs:
                return None, f"nginx: apt-get download nginx failed: {(got.stderr or got.stdout).strip()[-300:]}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            unpack = _run(["dpkg-deb", "-x", str(debs[0]), str(target)])
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"nginx: fetching Debian's package failed: {exc}"
    version = _nginx_version(unpacked) if unpack.returncode == 0 and unpacked.exists() else None
    if not version:
        return None, f"nginx: Debian's package did not unpack to a working binary: {unpack.stderr.strip()[-300:]}"
    return Peer("nginx", version, [str(unpacked), "-p", "{workdir}", "-c", "{workdir}/nginx.conf", "-e", "stderr"],
                source=f"Debian package, unpacked in {target}"), ""


def _router_version(pythonpath: str | None) -> str | None:
    code = "import vllm_router.router, vllm_router.version as v; print(v.__version__)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [pythonpath, os.environ.get("PYTHONPATH")] if p)}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _vllm_router(setup: bool) -> tuple[Peer | None, str]:
    argv = [sys.executable, "-m", "vllm_router.launch_router", "--worker-urls", "http://127.0.0.1:{upstream_port}",
            "--host", "127.0.0.1", "--port", "{port}", "--policy", "round_robin", "--log-level", "warning"]
    target = peers_dir() / "vllm-router"
    if importlib.util.find_spec("vllm_router") is not None:
        version = _router_version(None)
        if version:
            return Peer("vllm-router", version, argv, source="the environment"), ""
    pythonpath = os.pathsep.join(p for p in [str(target), os.environ.get("PYTHONPATH")] if p)
    version = _router_version(str(target)) if target.exists() else None
    if version:
        return Peer("vllm-router", version, argv, env={"PYTHONPATH": pythonpath}, source=f"installed in {target}"), ""
    if not setup:
        return None, "vllm-router: not installed and not set up (run without --no-peer-setup to install it from PyPI)"
    try:
        got = _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    "--upgrade", f"vllm-router=={VLLM_ROUTER_VERSION}"], timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"vllm-router: pip install failed: {exc}"
    if got.returncode != 0:
        return None, f"vllm-router: pip install vllm-router=={VLLM_ROUTER_VERSION} failed: {got.stderr.strip()[-300:]}"
    version = _router_version(str(target))
    if not version:
        return None, f"vllm-router: installed in {target} but its launcher does not import"
    return Peer("vllm-router", version, argv, env={"PYTHONPATH": pythonpath},
                source=f"PyPI wheel, installed in {target}"), ""


def prepare(names: list[str], setup: bool = True) -> tuple[list[Peer], list[str]]:
    """The peers of ``names`` that can run here (found, or set up when ``setup``), and a note for
    each that cannot."""
    found: list[Peer] = []
    notes: list[str] = []
    for name in names:
        peer, note = {"nginx": _nginx, "vllm-router": _vllm_router}[name](setup)
        if peer is not None:
            found.append(peer)
        else:
            notes.append(note)
    return found, notes
