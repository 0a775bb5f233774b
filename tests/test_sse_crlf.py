"""An OpenAI-compatible upstream that frames events with CRLF, as sse-starlette does.

The upstream is a real sse-starlette server (the library vLLM itself depends on) replaying a
stream recorded from the stack's real vLLM, one event every 0.3 s: through the proxy the
events arrive as they are sent, the completion is counted with its finish reason, and nothing
is counted as a broken stream (an LF-only reader would hold the whole stream back and count it
``stream_broken``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from conftest import heldout, sample, start_proxy

from loragate.stack import free_port

pytestmark = pytest.mark.stack

PACE_S = 0.3


def record_stream(stack) -> list[dict]:
    body = {"model": "poster-good", "prompt": heldout(stack, 1, offset=3)[0], "max_tokens": 12,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", f"{stack.vllm_url}/v1/completions", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return events


def serve_sse_starlette(events: list[dict], port: int) -> threading.Thread:
    import uvicorn
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def completions(request):
        await request.body()

        async def gen():
            for event in events:
                yield {"data": json.dumps(event)}
                await asyncio.sleep(PACE_S)
            yield {"data": "[DONE]"}

        return EventSourceResponse(gen())

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "poster-good", "object": "model"}]})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/models", models), Route("/health", models)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    thread.server = server  # type: ignore[attr-defined]
    return thread


def test_crlf_framed_events_pass_as_they_arrive_and_count(stack, tmp_path):
    events = record_stream(stack)
    assert len(events) >= 4
    port = free_port()
    thread = serve_sse_starlette(events, port)
    raw = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={}, timeout=30).content
    assert b"\r\n\r\n" in raw and b"\n\n" not in raw.replace(b"\r\n", b""), "the upstream must frame with CRLF"
    proxy = start_proxy(f"http://127.0.0.1:{port}", tmp_path, contracts=stack.contracts_file)
    try:
        arrivals, lines = [], []
        t0 = time.monotonic()
        with httpx.stream("POST", f"{proxy.url}/v1/completions", timeout=60, json={
                "model": "poster-good", "prompt": "x", "stream": True}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic() - t0)
                    lines.append(line)
        total = PACE_S * len(events)
        assert lines[-1] == "data: [DONE]"
        assert arrivals[0] < total / 2, f"first event after {arrivals[0]:.2f}s of a {total:.1f}s stream: held back"
        samples = proxy.settled_scrape()
        finish = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")][0]
        assert sample(samples, "loragate_completions_total", adapter="poster-good", finish_reason=finish) == 1
        assert sample(samples, "loragate_upstream_errors_total", adapter="poster-good", kind="stream_broken") == 0
        usage_lines = [json.loads(x[6:]) for x in lines[:-1] if not json.loads(x[6:]).get("choices")]
        assert usage_lines == [], "the usage event the proxy asked for is not the client's"
    finally:
        proxy.stop()
        thread.server.should_exit = True  # type: ignore[attr-defined]
