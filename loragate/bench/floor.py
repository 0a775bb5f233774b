"""The floor under the proxy's CPU per request: what its two HTTP layers cost with no proxy on top.

The proxy is an ASGI app served by uvicorn (httptools, uvloop) that forwards each request with
its own pooled client (:class:`loragate.server.upstream.Upstream`, an asyncio protocol with
httptools). This measures each layer alone,
the way ``loragate bench proxy`` measures the proxy (CPU from the process's own counters; the
measured process alone on one CPU, the bench client and upstream on the others, unless
``--shared-cpus``):

- ``server``: a null ASGI app on uvicorn with the proxy's server settings; it reads the body
  and answers the bench upstream's fixed completion. CPU of that server process per request.
- ``client``: :class:`~loragate.server.upstream.Upstream` sending the proxy's request to the
  bench upstream (:mod:`loragate.bench.upstream`) and reading the answer. CPU of the sending
  process per request.

Their sum is what any proxy built on these two layers spends per non-streamed request before
it does any work of its own, so it bounds from below what leaner judging or metrics can reach.

- ``passthrough``: the floor of any asyncio proxy, whatever its HTTP layers. A byte relay on
  uvloop (:class:`PassthroughDown` / :class:`PassthroughUp`) that frames requests and answers by
  ``Content-Length`` only, parses nothing else, judges and counts nothing, and keeps one
  upstream connection per client connection, between the bench client and the bench upstream.
  CPU of the relay process per request. It exists only for this measurement: it handles no
  chunked request bodies and no errors.
- ``passthrough, paced``: the same relay forwarding each read from the upstream as it comes,
  between the bench client and a bench upstream that paces streamed tokens (``--itl-ms``, as
  ``loragate bench proxy --itl-ms`` does): its CPU per streamed event (slope between 16- and
  128-event streams), the floor under the proxy's CPU per chunk when every event is a wake-up,
  a read and a write of its own.

Run: ``python -m loragate.bench.floor [--requests N] [--concurrency C] [--itl-ms MS] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from loragate.bench import (
    Placement,
    _cpu_seconds,
    _load_client,
    _run_block,
    _wait_http,
    on_cpus,
    split_cpus,
)
from loragate.bench.upstream import MODEL, _completion_body
from loragate.core.processes import free_port

BODY = {"model": MODEL, "prompt": "bench", "max_tokens": 16, "stream": False}
#: Inter-token gap of the paced streams (ms) and their two lengths in events (short, long), as
#: ``loragate bench proxy --itl-ms 2`` with its default ``--chunks`` and ``--long-chunks``.
PACED_ITL_MS = 2.0
STREAM_EVENTS = (16, 128)
#: Paced streams per worker in each of the two stream blocks.
STREAM_REQUESTS_PER_WORKER = 4
ANSWER = _completion_body(False, 8, 16)


async def null_app(scope, receive, send) -> None:
    """Reads the request body and answers a fixed completion: the server layer and nothing else."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]})
    await send({"type": "http.response.body", "body": ANSWER})


def _framed(buf: bytes) -> int | None:
    """Length of the first whole HTTP message in ``buf`` (head + Content-Length body), or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    at = head.find(b"content-length:")
    size = 0
    if at >= 0:
        eol = head.find(b"\r\n", at)
        size = int(head[at + 15:eol if eol > 0 else None])
    total = end + 4 + size
    return total if len(buf) >= total else None


def _opened(transport: asyncio.Transport | None) -> asyncio.Transport:
    """A relay connection's transport, which ``connection_made`` set before any other callback."""
    if transport is None:
        raise RuntimeError("a relay connection was used before it was made")
    return transport


class PassthroughUp(asyncio.Protocol):
    """The relay's connection to the upstream: each whole answer goes back to its client, or,
    with ``framed`` false, whatever each read brings goes back at once (a stream's events as
    they come; answers are not framed at all then)."""

    def __init__(self, down: "PassthroughDown", framed: bool = True) -> None:
        self.down = down
        self.framed = framed
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.framed:
            _opened(self.down.transport).write(data)
            return
        self.buf += data
        while (size := _framed(self.buf)) is not None:
            _opened(self.down.transport).write(self.buf[:size])
            self.buf = self.buf[size:]

    def connection_lost(self, exc: Exception | None) -> None:
        _opened(self.down.transport).close()


class PassthroughDown(asyncio.Protocol):
    """A client connection to the relay: each whole request goes to its own upstream connection."""

    def __init__(self, upstream_port: int, framed_answers: bool = True) -> None:
        self.upstream_port = upstream_port
        self.framed_answers = framed_answers
        self.buf = b""
        self.pending: list[bytes] = []
        self.up: PassthroughUp | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        _, up = await asyncio.get_running_loop().create_connection(
            lambda: PassthroughUp(self, self.framed_answers), "127.0.0.1", self.upstream_port)
        self.up = up
        for request in self.pending:
            _opened(up.transport).write(request)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (size := _framed(self.buf)) is not None:
            request, self.buf = self.buf[:size], self.buf[size:]
            if self.up is None:
                self.pending.append(request)
            else:
                _opened(self.up.transport).write(request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


def serve_passthrough(port: int, upstream_port: int, framed_answers: bool = True) -> None:
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            lambda: PassthroughDown(upstream_port, framed_answers), "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def serve(port: int) -> None:
    import uvicorn

    from loragate.server.serving import UVICORN_SETTINGS

    # the proxy's own uvicorn settings, lifespan aside
    uvicorn.run(null_app, host="127.0.0.1", port=port, lifespan="off", **UVICORN_SETTINGS)


async def _server_floor(url: str, pid: int, concurrency: int, requests: int) -> float:
    """CPU of process ``pid`` per non-streamed request, the bench client sending to ``url``."""
    async with _load_client(url, concurrency) as (client, path):
        await _run_block(client, path, BODY, concurrency, concurrency)  # warm-up
        before = _cpu_seconds(pid)
        block = await _run_block(client, path, BODY, concurrency, requests)
        cpu = _cpu_seconds(pid) - before
    if block.errors:
        raise RuntimeError(f"{block.errors} of {requests} requests to the null server failed")
    return cpu / requests * 1e6


async def _client_floor(upstream_url: str, concurrency: int, requests: int) -> float:
    from loragate.server.upstream import Upstream

    upstream = Upstream(upstream_url, read_timeout_s=60)
    body = json.dumps(BODY).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    failed = 0

    async def worker(n: int) -> None:
        nonlocal failed
        for _ in range(n):
            resp = await upstream.send("POST", "/v1/completions", headers, body)
            try:
                await resp.read()
                failed += resp.status != 200
            finally:
                resp.close()

    try:
        await worker(concurrency)  # warm-up
        t0 = time.process_time()  # ns resolution; os.times() ticks in 10 ms, a whole short run
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        t1 = time.process_time()
    finally:
        await upstream.close()
    if failed:
        raise RuntimeError(f"{failed} requests to the bench upstream failed")
    done = requests // concurrency * concurrency
    return (t1 - t0) / done * 1e6


async def _stream_floor(url: str, pid: int, concurrency: int, requests: int, short: int, long: int) -> float:
    """CPU of process ``pid`` per streamed event: the slope between streams of ``short`` and
    ``long`` events, as ``loragate bench proxy`` computes the proxy's (``chunk_costs``)."""
    per_request = {}
    async with _load_client(url, concurrency) as (client, path):
        for events in (short, long):
            body = {**BODY, "max_tokens": events, "stream": True}
            await _run_block(client, path, body, concurrency, concurrency)  # warm-up
            before = _cpu_seconds(pid)
            block = await _run_block(client, path, body, concurrency, requests)
            per_request[events] = (_cpu_seconds(pid) - before) / requests * 1e6
            if block.errors or block.chunks != events * requests:
                raise RuntimeError(f"streams through the pass-through relay: {block.errors} failed, "
                                   f"{block.chunks} of {events * requests} events arrived")
    return (per_request[long] - per_request[short]) / (long - short)


def measure(concurrency: int, requests: int, itl_ms: float = PACED_ITL_MS, placement: Placement | None = None) -> dict:
    """The floors, in µs of CPU per request (and per streamed event for the paced relay).

    With a ``placement``, as ``loragate bench proxy`` places the proxy: each measured server
    (and the client, while its own CPU is measured) on ``placement.measured``, the bench
    upstreams and the load client on ``placement.load``.
    """
    up_port, null_port, relay_port = free_port(), free_port(), free_port()
    paced_port, stream_relay_port = free_port(), free_port()
    load, measured = (placement.load, placement.measured) if placement else (None, None)

    def start(*args: str, cpus: frozenset[int] | None) -> subprocess.Popen:
        with on_cpus(cpus):
            return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    procs = [
        start("loragate.bench.upstream", "--port", str(up_port), cpus=load),
        start("loragate.bench.floor", "--serve", str(null_port), cpus=measured),
        start("loragate.bench.floor", "--serve-passthrough", str(relay_port), str(up_port), cpus=measured),
        start("loragate.bench.upstream", "--port", str(paced_port), "--itl-ms", str(itl_ms), cpus=load),
        start("loragate.bench.floor", "--serve-passthrough", str(stream_relay_port), str(paced_port), "--raw-answers",
              cpus=measured),
    ]
    try:
        for port in (up_port, null_port, relay_port, paced_port, stream_relay_port):
            _wait_http(f"http://127.0.0.1:{port}/health")
        with on_cpus(load):  # the load client, beside the upstreams
            print(f"[bench floor] uvicorn null app, concurrency {concurrency} ...", file=sys.stderr, flush=True)
            server = asyncio.run(_server_floor(f"http://127.0.0.1:{null_port}/v1/completions", procs[1].pid,
                                               concurrency, requests))
            print(f"[bench floor] upstream client, concurrency {concurrency} ...", file=sys.stderr, flush=True)
            with on_cpus(measured):  # the client is what is measured here
                try:
                    import uvloop

                    client = uvloop.run(_client_floor(f"http://127.0.0.1:{up_port}", concurrency, requests))
                except ImportError:
                    client = asyncio.run(_client_floor(f"http://127.0.0.1:{up_port}", concurrency, requests))
            print(f"[bench floor] asyncio pass-through relay, concurrency {concurrency} ...", file=sys.stderr,
                  flush=True)
            passthrough = asyncio.run(_server_floor(f"http://127.0.0.1:{relay_port}/v1/completions", procs[2].pid,
                                                    concurrency, requests))
            print(f"[bench floor] pass-through relay, streams paced {itl_ms:g} ms, concurrency {concurrency} ...",
                  file=sys.stderr, flush=True)
            passthrough_event = asyncio.run(_stream_floor(
                f"http://127.0.0.1:{stream_relay_port}/v1/completions", procs[4].pid, concurrency,
                STREAM_REQUESTS_PER_WORKER * concurrency, STREAM_EVENTS[0], STREAM_EVENTS[1]))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
    return {"concurrency": concurrency, "requests": requests, "placement": placement.as_json() if placement else None,
            "server_cpu_us_per_request": server,
            "client_cpu_us_per_request": client, "floor_cpu_us_per_request": server + client,
            "passthrough_cpu_us_per_request": passthrough, "paced_itl_ms": itl_ms,
            "passthrough_cpu_us_per_paced_event": passthrough_event}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the null server itself
    parser.add_argument("--itl-ms", type=float, default=PACED_ITL_MS,
                        help="how far apart the paced streams' tokens come (default %(default)g)")
    parser.add_argument("--serve-passthrough", type=int, nargs=2, metavar=("PORT", "UPSTREAM_PORT"),
                        help=argparse.SUPPRESS)  # the pass-through relay itself
    parser.add_argument("--raw-answers", action="store_true", help=argparse.SUPPRESS)  # ... relaying reads as they come
    parser.add_argument("--shared-cpus", action="store_true",
                        help="run everything on the same CPUs (default: what is measured alone on the last CPU, "
                             "as `loragate bench proxy` places the proxy)")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.serve_passthrough:
        port, upstream_port = args.serve_passthrough  # nargs=2
        serve_passthrough(port, upstream_port, framed_answers=not args.raw_answers)
        return
    if args.requests < args.concurrency or args.concurrency < 1:
        parser.error("--requests must be at least --concurrency, and --concurrency at least 1")
    if not 0 < args.itl_ms <= 1000:
        parser.error(f"--itl-ms must be above 0 and at most 1000, not {args.itl_ms:g}")
    from loragate.bench import TARGET_CPU_PER_CHUNK_US, TARGET_CPU_PER_REQUEST_US

    placement = split_cpus(shared=args.shared_cpus)
    r = measure(args.concurrency, args.requests, args.itl_ms, placement)
    print(placement.describe("each measured process") if placement else "everything on the same CPUs")
    print(f"uvicorn null app:       {r['server_cpu_us_per_request']:6.0f} us CPU per request\n"
          f"upstream client:         {r['client_cpu_us_per_request']:5.0f} us CPU per request\n"
          f"floor (sum):            {r['floor_cpu_us_per_request']:6.0f} us CPU per non-streamed request "
          f"(proxy target {TARGET_CPU_PER_REQUEST_US:.0f} us)\n"
          f"asyncio pass-through:   {r['passthrough_cpu_us_per_request']:6.0f} us CPU per request "
          f"(a byte relay: the floor of any asyncio proxy)\n"
          f"pass-through, paced:    {r['passthrough_cpu_us_per_paced_event']:6.1f} us CPU per streamed event, "
          f"tokens {r['paced_itl_ms']:g} ms apart (proxy target {TARGET_CPU_PER_CHUNK_US:.0f} us per chunk)")
    if args.out:
        args.out.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
