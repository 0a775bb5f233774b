"""The proxy's serving layer (loragate.server.serving): an answer's start and what the same
loop turn writes after it leave together; a stream's later events leave at once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Iterator

from loragate.server.serving import UVICORN_SETTINGS, CorkedTransport
from loragate.stack import free_port


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.events.append("close")
        self.closing = True

    def abort(self) -> None:
        self.events.append("abort")
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def test_writes_of_one_turn_leave_in_one_write_and_later_ones_in_the_next():
    async def main():
        raw = RecordingTransport()
        corked = CorkedTransport(raw, asyncio.get_running_loop())
        corked.write(b"HTTP/1.1 200 OK\r\n\r\n")
        corked.write(b"")
        corked.writelines([b"{", b"}"])
        assert raw.writes == [] and corked.get_write_buffer_size() == 7 + 21
        await asyncio.sleep(0)
        assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
        # a stream's events after its head: each goes out as it is written, not at the turn's end
        corked.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await asyncio.sleep(0)
        corked.write(b"9\r\ndata: 1\n\n\r\n")
        assert raw.writes[2:] == [b"9\r\ndata: 1\n\n\r\n"]
        corked.write(b"9\r\ndata: 2\n\n\r\n")
        assert raw.writes[3:] == [b"9\r\ndata: 2\n\n\r\n"] and corked.get_write_buffer_size() == 7
        # behind a held start a write waits its turn, so the order on the wire is kept
        corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        corked.write(b"ok")
        assert len(raw.writes) == 4
        await asyncio.sleep(0)
        assert raw.writes[4:] == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        raw.closing = True
        corked.write(b"after the end")  # a closing transport gets nothing more, as at a flush
        assert len(raw.writes) == 5
        assert corked.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the transport's

    asyncio.run(main())


def test_close_sends_what_is_held_first_and_abort_drops_it():
    async def main():
        raw = RecordingTransport()
        corked = CorkedTransport(raw, asyncio.get_running_loop())
        corked.write(b"HTTP/1.1 200 OK\r\n\r\nlast words")
        corked.close()
        assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nlast words"] and raw.events == ["close"]
        await asyncio.sleep(0)
        assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nlast words"]  # the scheduled flush finds nothing more

        raw = RecordingTransport()
        corked = CorkedTransport(raw, asyncio.get_running_loop())
        corked.write(b"HTTP/1.1 200 OK\r\n\r\nnever sent")
        corked.abort()
        await asyncio.sleep(0)
        assert raw.writes == [] and raw.events == ["abort"]

    asyncio.run(main())


@contextlib.contextmanager
def served(app) -> Iterator[int]:
    """``app`` served by real uvicorn with the proxy's settings, in a thread; yields its port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", **UVICORN_SETTINGS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            threading.Event().wait(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_served_answer_reaches_the_client_in_one_segment(tmp_path):
    """Through real uvicorn with the proxy's settings: head and body of a small answer arrive
    together, and keep-alive and a second request on the same connection still work."""
    body = b'{"ok": true}'

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    with served(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\n" + body), first
            assert b"server:" not in first.lower()


def test_the_body_writer_sends_chunks_only_while_uvicorn_could_and_in_order_with_send(tmp_path):
    """Through real uvicorn with the proxy's settings: every request is offered a BodyWriter;
    it is ready only between the start and the end of a chunked answer and while the client's
    connection is not paused; what it writes is framed as uvicorn frames ``send``'s chunks and
    keeps its place among them."""
    from loragate.server.serving import BODY_WRITER

    seen: dict = {}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        writer = scope["extensions"][BODY_WRITER]
        seen["before_start"] = writer.ready()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        seen["streaming"] = writer.ready()
        writer.write(b"data: 1\n\n")
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": True})
        writer.write(b"data: 3\n\n")
        flow = writer._cycle().flow  # what uvicorn pauses when the client's connection is full
        flow.pause_writing()
        seen["paused"] = writer.ready()
        flow.resume_writing()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        seen["after_end"] = writer.ready()

    with served(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        got = b""
        while not got.endswith(b"0\r\n\r\n"):
            data = sock.recv(65536)
            assert data, got
            got += data
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n9\r\ndata: 3\n\n\r\n0\r\n\r\n"
    assert seen == {"before_start": False, "streaming": True, "paused": False, "after_end": False}


def test_the_heap_built_at_start_up_is_frozen_out_of_the_collectors_walks():
    """After the proxy's start-up an oldest-generation collection walks only what serving
    made since: the start-up heap (imports, contracts, metrics) is frozen."""
    import gc

    from loragate.server.app import ProxyApp
    from loragate.server.config import ProxyConfig

    async def main():
        app = ProxyApp(ProxyConfig(upstream=f"http://127.0.0.1:{free_port()}"))
        gc.unfreeze()
        assert gc.get_freeze_count() == 0
        await app.startup()
        try:
            assert gc.get_freeze_count() > 10_000  # the imports alone are tens of thousands of objects
        finally:
            await app.shutdown()
            gc.unfreeze()

    asyncio.run(main())


def test_a_request_leaves_no_reference_cycle_behind():
    """Each request's objects (uvicorn's cycle, its scope, the BodyWriter in it) are freed when
    the request is done, not left for the garbage collector: a collector pass finds none."""
    import gc

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with served(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        def ask() -> None:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert sock.recv(65536).endswith(b"\r\n\r\nok")

        ask()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(20):
                ask()
            threading.Event().wait(0.2)  # the server thread finishes its last request
            gc.collect()
            left = {type(o).__name__ for o in gc.garbage}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert not left & {"RequestResponseCycle", "BodyWriter"}, left


def test_a_client_that_left_before_its_request_was_read_is_counted_as_its_adapters_disconnect(tmp_path):
    """A client sends its whole request and closes before the proxy's task reads it (a busy
    proxy): uvicorn then answers ``receive`` with ``http.disconnect`` and drops the body. The
    request is still counted once, as a client disconnect of the adapter its body names."""
    import json

    import uvicorn
    from uvicorn.server import ServerState

    from loragate.core.contracts import load_contracts
    from loragate.server.app import ProxyApp
    from loragate.server.config import ProxyConfig
    from loragate.server.serving import CorkedHttpToolsProtocol

    contracts = tmp_path / "adapters.yaml"
    contracts.write_text(json.dumps({"base_model": "base", "adapters_dir": ".",
                                     "adapters": {"poster": {"path": "poster", "output": "json"}}}))

    def value(app: ProxyApp, name: str, **labels: str) -> float:
        return app.metrics.registry.get_sample_value(name, labels) or 0.0

    async def main() -> dict[str, float]:
        app = ProxyApp(ProxyConfig(upstream=f"http://127.0.0.1:{free_port()}"), load_contracts(contracts))
        await app.startup()
        try:
            config = uvicorn.Config(app, lifespan="off", **UVICORN_SETTINGS)
            config.load()
            sent = {}
            for name, (model, cut) in {"whole": ("poster", False), "mid-body": ("poster", True),
                                       "unknown": ("no-such-adapter", False)}.items():
                protocol = CorkedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
                transport = RecordingTransport()
                protocol.connection_made(transport)
                body = json.dumps({"model": model, "prompt": "x", "max_tokens": 4}).encode()
                protocol.data_received(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                       b"content-length: %d\r\n\r\n%s" % (len(body), body[:10] if cut else body))
                protocol.connection_lost(None)  # gone before the app's task has run
                for _ in range(50):
                    await asyncio.sleep(0)
                sent[name] = (value(app, "loragate_client_disconnects_total", adapter="poster"),
                              value(app, "loragate_client_disconnects_total", adapter="__other__"),
                              value(app, "loragate_requests_total", endpoint="completions", code="4xx"))
                assert transport.writes == []  # nothing is answered to a connection that is gone
            return sent
        finally:
            await app.shutdown()

    counts = asyncio.run(main())
    # (poster's disconnects, unknown adapters' disconnects, 4xx requests) after each client
    assert counts == {"whole": (1.0, 0.0, 1.0), "mid-body": (1.0, 1.0, 2.0), "unknown": (1.0, 2.0, 3.0)}
