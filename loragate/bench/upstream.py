"""An instant OpenAI-compatible upstream, used only by ``loragate bench`` to isolate the proxy's cost.

This is *not* vLLM and never stands in for it in a test: it answers every ``/v1/completions``
and ``/v1/chat/completions`` request at once with a fixed JSON completion, streamed when asked
as one SSE event per token like vLLM (``max_tokens`` events when the request sets it, else
``--chunks``), so that any time measured through the proxy beyond the time measured direct is
the proxy's own. It speaks just enough HTTP/1.1 (keep-alive,
Content-Length bodies) over raw asyncio streams to stay cheaper than the thing it measures.

Instant streams arrive at the proxy in few reads (a busy reader finds many events waiting), so
they measure what the proxy does per event in Python. An engine sends each token on its own,
one inter-token latency after the last: with ``--itl-ms`` the upstream waits that long before
every event after the first, so each event is a read and a write of its own through the proxy,
as with a real engine.

Run: ``python -m loragate.bench.upstream --port P [--chunks N] [--itl-ms MS]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

MODEL = "bench-adapter"
#: The completion every answer carries: a poster layout that matches the demo contract's JSON
#: Schema (:data:`loragate.demo.data.LAYOUT_SCHEMA`), as a good adapter answers.
ANSWER = ('{"title": "Instant", "authors": ["A. Bench"], "panels": [{"heading": "Method", "column": 1}, '
          '{"heading": "Results", "column": 2}], "theme": "light"}')


def _completion_body(chat: bool, prompt_tokens: int, completion_tokens: int) -> bytes:
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}
        if chat else {"index": 0, "text": ANSWER, "finish_reason": "stop", "logprobs": None}
    )
    return json.dumps({
        "id": "cmpl-bench", "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": MODEL, "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }).encode()


#: The most events one streamed answer gets, whatever ``max_tokens`` asks.
MAX_CHUNKS = 4096


def _chunks_for(request: dict, default: int) -> int:
    """How many tokens (streamed events) a request's answer has: its ``max_tokens``, else ``default``."""
    asked = request.get("max_tokens")
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
        return min(asked, MAX_CHUNKS)
    return default


def _stream_events(chat: bool, chunks: int, include_usage: bool) -> list[bytes]:
    # the answer's characters spread over the events (some empty when there are more events
    # than characters), so the streamed text always joins to ANSWER
    pieces = [ANSWER[i * len(ANSWER) // chunks:(i + 1) * len(ANSWER) // chunks] for i in range(chunks)]
    events = []
    for i, piece in enumerate(pieces):
        last = i == chunks - 1
        choice = (
            {"index": 0, "delta": {"content": piece}, "finish_reason": "stop" if last else None}
            if chat else {"index": 0, "text": piece, "finish_reason": "stop" if last else None, "logprobs": None}
        )
        events.append(b"data: " + json.dumps({
            "id": "cmpl-bench", "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 0, "model": MODEL, "choices": [choice],
        }).encode() + b"\n\n")
    if include_usage:
        events.append(b"data: " + json.dumps({
            "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": MODEL, "choices": [],
            "usage": {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks},
        }).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


MODELS_BODY = json.dumps({"object": "list", "data": [
    {"id": MODEL, "object": "model", "owned_by": "bench", "root": "bench-base", "max_model_len": 4096},
]}).encode()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunks: int, itl_s: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in
                       (line.split(":", 1) for line in header_lines if ":" in line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if path.startswith("/v1/models") or path == "/health":
                payload = MODELS_BODY if path.startswith("/v1/models") else b""
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                await writer.drain()
                continue
            request = json.loads(body or b"{}")
            chat = path.endswith("/chat/completions")
            n = _chunks_for(request, chunks)
            if request.get("stream"):
                include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for i, event in enumerate(_stream_events(chat, n, include_usage)):
                    if itl_s and 0 < i < n:  # the usage event follows the last token at once
                        await asyncio.sleep(itl_s)
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                payload = _completion_body(chat, 8, n)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, chunks: int, itl_s: float = 0.0) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, chunks, itl_s), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=16,
                        help="SSE chunks per streamed answer when the request sets no max_tokens")
    parser.add_argument("--itl-ms", type=float, default=0.0,
                        help="wait this long before each streamed token after the first (0: instant)")
    args = parser.parse_args()
    if args.itl_ms < 0:
        parser.error(f"--itl-ms must not be negative, not {args.itl_ms:g}")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, args.chunks, args.itl_ms / 1000))


if __name__ == "__main__":
    main()
