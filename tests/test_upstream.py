"""The proxy's upstream client (loragate.server.upstream) against scripted HTTP peers.

Each test runs a small asyncio server that answers with exact bytes, so framings and faults
vLLM rarely shows (a body closed early, a peer that goes quiet, garbage, an EOF-framed body) are
exercised on purpose. The proxy over the real vLLM engine is tested in test_proxy.py and
test_reliability.py.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import pytest

from loragate.server.upstream import (
    HIGH_WATER,
    Upstream,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamReset,
    UpstreamTimeout,
)
from loragate.stack import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One request: (request line, headers by lower-case name, body by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *lines = head[:-4].split(b"\r\n")
    headers = {}
    for h in lines:
        name, _, value = h.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return line, headers, body


def serve(handler: Handler, test: Callable[[str, dict], Awaitable[None]]) -> dict:
    """Run ``handler`` as a server and ``test(base_url, state)`` against it; returns the state."""
    state: dict = {"connections": 0, "requests": [], "closed_by_client": 0}

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["connections"] += 1
        try:
            await handler(reader, writer, state)
        except (asyncio.IncompleteReadError, ConnectionError):
            state["closed_by_client"] += 1
        finally:
            writer.close()

    async def main() -> None:
        port = free_port()
        server = await asyncio.start_server(on_connection, "127.0.0.1", port)
        try:
            await test(f"http://127.0.0.1:{port}", state)
        finally:
            server.close()

    asyncio.run(main())
    return state


def answer(body: bytes, *extra: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n" + b"".join(e + b"\r\n" for e in extra) + b"\r\n" + body)


async def keep_answering(reader, writer, state) -> None:
    while True:
        line, headers, body = await read_request(reader)
        state["requests"].append((line, headers, body))
        writer.write(answer(b'{"echo": %d}' % len(body), b"keep-alive: timeout=5", b"x-engine: 1"))
        await writer.drain()


def test_keep_alive_connection_is_reused_and_hop_by_hop_headers_stay_behind():
    async def test(url, state):
        up = Upstream(url, read_timeout_s=5)
        try:
            for _ in range(3):
                resp = await up.send("POST", "/v1/completions?x=1", [
                    (b"content-type", b"application/json"), (b"authorization", b"Bearer k"),
                    (b"connection", b"close"), (b"content-length", b"999"), (b"expect", b"100-continue")],
                    b'{"a":1}')
                assert resp.status == 200
                assert await resp.read() == b'{"echo": 7}'
                assert resp.content_type == "application/json"
                assert (b"x-engine", b"1") in resp.headers
                assert not any(k.lower() in (b"content-length", b"keep-alive") for k, _ in resp.headers)
                resp.close()
        finally:
            await up.close()

    state = serve(keep_answering, test)
    assert state["connections"] == 1, "a finished keep-alive connection must be reused"
    line, headers, body = state["requests"][0]
    assert line == b"POST /v1/completions?x=1 HTTP/1.1" and body == b'{"a":1}'
    assert headers[b"content-length"] == b"7" and headers[b"authorization"] == b"Bearer k"
    assert b"connection" not in headers and b"expect" not in headers and headers[b"host"].startswith(b"127.0.0.1:")


def stream_in_steps(steps: tuple[tuple[int, ...], ...], wait_first: bool = False) -> Handler:
    """A peer streaming SSE events ``data: N``, one chunked write per step (the events numbered
    in it), each step only once the client has set ``state["next"]`` for the one before (with
    ``wait_first``, the first too: the head comes alone)."""
    async def next_step(state: dict) -> None:
        await state["next"].wait()
        state["next"].clear()

    async def handler(reader, writer, state):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        if wait_first:
            await next_step(state)
        for events in steps:
            writer.write(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in (b"data: %d\n\n" % i for i in events)))
            await writer.drain()
            await next_step(state)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    return handler


def test_chunked_stream_arrives_piece_by_piece_before_it_ends():
    handler = stream_in_steps(((0,), (1,), (2,)))

    async def test(url, state):
        state["next"] = asyncio.Event()
        up = Upstream(url, read_timeout_s=5)
        resp = await up.send("POST", "/v1/completions", [], b"{}")
        assert resp.content_type == "text/event-stream"
        got = []
        async for chunk in resp.iter_chunks():
            got.append(chunk)
            state["next"].set()
        resp.close()
        await up.close()
        assert got == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]

    serve(handler, test)


def test_a_sink_takes_bytes_in_the_read_callback_until_it_declines_and_nothing_is_read_twice():
    # 2 and 3 in one write: one read callback; the first event only once the client waits for it
    # (else it would come with the head and be buffered)
    handler = stream_in_steps(((0,), (1,), (2, 3), (4,), (5,)), wait_first=True)

    async def test(url, state):
        state["next"] = asyncio.Event()
        taken: list[bytes] = []
        offered: list[bytes] = []

        def sink(data: bytes) -> bool:
            offered.append(data)
            if data == b"data: 2\n\n":
                return False  # declined: the waiting call returns it
            taken.append(data)
            state["next"].set()
            return True

        up = Upstream(url, read_timeout_s=5)
        resp = await up.send("POST", "/v1/completions", [], b"{}")
        returned = []
        state["next"].set()
        while (chunk := await resp.next_chunk(sink)) is not None:
            returned.append(chunk)
            state["next"].set()
        resp.close()
        await up.close()
        # declining 2 disarms the sink: 3, read in the same callback, waits behind 2 for the caller
        assert taken == [b"data: 0\n\n", b"data: 1\n\n", b"data: 4\n\n", b"data: 5\n\n"]
        assert returned == [b"data: 2\n\ndata: 3\n\n"]
        assert offered == [b"data: %d\n\n" % i for i in (0, 1, 2, 4, 5)]  # each offered once, in order

    serve(handler, test)


def test_head_answer_has_no_body_and_eof_framed_body_ends_at_close():
    async def handler(reader, writer, state):
        line, _, _ = await read_request(reader)
        if line.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n")
            await writer.drain()
            await reader.read()
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it, then the close")
            await writer.drain()

    async def test(url, state):
        up = Upstream(url, read_timeout_s=2)
        resp = await asyncio.wait_for(up.send("HEAD", "/x", [], b""), 5)
        assert resp.status == 200 and await asyncio.wait_for(resp.read(), 5) == b""
        resp.close()
        resp = await up.send("GET", "/y", [], b"")
        assert await resp.read() == b"all of it, then the close"
        resp.close()
        await up.close()

    serve(handler, test)


def test_unreachable_engine_is_a_connect_error():
    async def test():
        up = Upstream(f"http://127.0.0.1:{free_port()}", read_timeout_s=2)
        with pytest.raises(UpstreamConnectError):
            await up.send("GET", "/health", [], b"")
        assert await up.healthy() is False
        await up.close()

    asyncio.run(test())


def test_quiet_engine_times_out_but_a_slow_steady_stream_does_not():
    async def handler(reader, writer, state):
        while True:
            line, _, _ = await read_request(reader)
            if b"/quiet" in line:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
                await writer.drain()
                await asyncio.sleep(10)
                return
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(8):  # 8 x 0.15 s = 1.2 s in all, longer than the 0.5 s read timeout
                await asyncio.sleep(0.15)
                writer.write(b"1\r\n.\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def test(url, state):
        up = Upstream(url, read_timeout_s=0.5)
        resp = await up.send("POST", "/steady", [], b"{}")
        assert await resp.read() == b"." * 8
        resp.close()
        resp = await up.send("POST", "/quiet", [], b"{}")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(UpstreamTimeout):
            async for _ in resp.iter_chunks():
                pass
        assert 0.4 < loop.time() - t0 < 3
        resp.close()
        await up.close()

    serve(handler, test)


def test_answer_cut_mid_body_or_garbage_is_broken_and_never_reused():
    async def handler(reader, writer, state):
        line, _, _ = await read_request(reader)
        if b"/cut" in line:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        elif b"/garbage" in line:
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    async def test(url, state):
        up = Upstream(url, read_timeout_s=5)
        resp = await up.send("POST", "/cut", [], b"{}")
        with pytest.raises(UpstreamBroken):
            await resp.read()
        resp.close()
        with pytest.raises(UpstreamBroken):
            await up.send("POST", "/garbage", [], b"{}")
        await up.close()

    state = serve(handler, test)
    assert state["connections"] == 2


def test_closing_an_unfinished_answer_closes_the_connection_and_a_slow_reader_stops_reading():
    """The engine sees the close (vLLM aborts the request); while nobody reads, the client stops
    reading the socket near HIGH_WATER instead of buffering the whole answer."""
    async def handler(reader, writer, state):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        piece = b"x" * 65536
        sent = 0
        try:
            while sent < 64 * 1024 * 1024:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await asyncio.wait_for(writer.drain(), 2)
                sent += len(piece)
        except asyncio.TimeoutError:
            state["stalled_after"] = sent  # the client stopped reading
            try:
                await reader.read()  # until the client closes (an abort: a reset)
            except ConnectionError:
                pass
            state["saw_close"] = True

    async def test(url, state):
        up = Upstream(url, read_timeout_s=30)
        resp = await up.send("POST", "/big", [], b"{}")
        first = await resp.iter_chunks().__anext__()
        assert first
        for _ in range(50):
            if "stalled_after" in state:
                break
            await asyncio.sleep(0.1)
        resp.close()
        for _ in range(50):
            if state.get("saw_close"):
                break
            await asyncio.sleep(0.1)
        await up.close()

    state = serve(handler, test)
    # kernel socket buffers hold some megabytes; the client itself holds at most about HIGH_WATER more
    assert state.get("stalled_after", 1 << 30) < 32 * 1024 * 1024 + HIGH_WATER
    assert state.get("saw_close") is True


def test_idle_connection_the_engine_closed_is_not_reused():
    async def handler(reader, writer, state):
        line, _, body = await read_request(reader)
        writer.write(answer(b"{}"))
        await writer.drain()  # then close: the engine's keep-alive timeout ran out

    async def test(url, state):
        up = Upstream(url, read_timeout_s=5)
        for _ in range(3):
            resp = await up.send("GET", "/v1/models", [], b"")
            assert resp.status == 200 and await resp.read() == b"{}"
            resp.close()
            await asyncio.sleep(0.1)  # the close arrives
        await up.close()

    state = serve(handler, test)
    assert state["connections"] == 3


def test_only_http_and_https_urls_are_accepted():
    async def test():
        for bad in ("ftp://engine:8001", "engine:8001", "http://"):
            with pytest.raises(ValueError, match="http:// or https:// URL"):
                Upstream(bad, read_timeout_s=1)
        await Upstream("https://engine:8443/prefix", read_timeout_s=1).close()

    asyncio.run(test())


def test_a_slow_reader_is_not_an_engine_timeout():
    """Reading paused because the consumer is behind is not the engine going quiet: the read
    timeout counts only while the client is ready for more."""
    total = 8 * 1024 * 1024

    async def handler(reader, writer, state):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        piece = b"y" * 65536
        for _ in range(total // len(piece)):
            writer.write(piece)
            await writer.drain()
        await reader.read()

    async def test(url, state):
        up = Upstream(url, read_timeout_s=0.5)
        resp = await up.send("GET", "/big", [], b"")
        chunks = resp.iter_chunks()
        got = len(await chunks.__anext__())
        await asyncio.sleep(1.5)  # three read timeouts, with the client's buffer full
        async for chunk in chunks:
            got += len(chunk)
        assert got == total
        resp.close()
        await up.close()

    serve(handler, test)


def test_a_connection_closed_before_the_answer_is_a_reset_and_a_target_cannot_end_the_line():
    async def handler(reader, writer, state):
        await read_request(reader)  # the engine took the request and died before answering

    async def test(url, state):
        up = Upstream(url, read_timeout_s=5)
        try:
            with pytest.raises(UpstreamReset) as caught:
                await up.send("POST", "/v1/completions", [], b"{}")
            assert caught.value.kind == "reset"
            for bad in (b"/v1/x HTTP/1.1\r\nhost: y", b"/a b", b"v1/x", b"/\xe2\x82\xac", b"/x\x00"):
                with pytest.raises(ValueError):
                    await up.send("GET", bad, [], b"")
        finally:
            await up.close()

    state = serve(handler, test)
    assert state["connections"] == 1  # the refused targets never opened a connection


def test_headers_named_in_connection_stay_behind_both_ways_and_date_is_the_servers():
    async def handler(reader, writer, state):
        line, headers, body = await read_request(reader)
        state["requests"].append((line, headers, body))
        writer.write(answer(b"{}", b"connection: x-hop", b"x-hop: 1", b"x-end: 2", b"date: Mon, 01 Jan 2024",
                            b"server: uvicorn"))
        await writer.drain()

    async def test(url, state):
        up = Upstream(url, read_timeout_s=5)
        try:
            resp = await up.send("POST", b"/v1/completions", [
                (b"connection", b"keep-alive, X-Secret"), (b"x-secret", b"s"), (b"x-kept", b"k")], b"{}")
            await resp.read()
            names = [n.lower() for n, _ in resp.headers]
            assert b"x-end" in names and b"x-hop" not in names and b"date" not in names and b"server" not in names
            resp.close()
        finally:
            await up.close()

    state = serve(handler, test)
    _, headers, _ = state["requests"][0]
    assert b"x-secret" not in headers and headers[b"x-kept"] == b"k"
