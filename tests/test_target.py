"""The request target and route table, without an engine: what the proxy checks is what the
engine's server (uvicorn, as vLLM runs it) routes, for any bytes."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from loragate.server.routes import Kind, classify, unclassified
from loragate.server.target import TargetError, parse_target


def uvicorn_scope_path(raw: bytes) -> str:
    """scope["path"] as uvicorn's httptools protocol computes it, by running that protocol."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    seen: list[str] = []

    async def app(scope, receive, send):
        seen.append(scope["path"])

    async def main():
        config = Config(app, lifespan="off")
        config.load()
        proto = HttpToolsProtocol(config, ServerState(), app_state={})

        class T:
            def get_extra_info(self, *_):
                return None

            def write(self, data):
                pass

            def close(self):
                pass

            def is_closing(self):
                return False

            def pause_reading(self):
                pass

            def resume_reading(self):
                pass

            def set_protocol(self, p):
                pass

        proto.connection_made(T())
        proto.data_received(b"GET " + raw + b" HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.sleep(0.01)
        return seen

    return asyncio.run(main())[0]


@given(raw=st.binary(max_size=40).map(lambda b: b"/" + b))
@example(b"/v1/load_lora_adapter%3F")
@example(b"/v1%2Fload_lora_adapter")
@example(b"/v1/models%E2%82%AC")
@example(b"/v1/models%ff")
@example(b"/a%2")
@example(b"/v1/completions?x=%0d%0a")
def test_a_checked_target_routes_where_uvicorn_routes_it_and_nothing_else_passes(raw):
    try:
        target = parse_target(raw)
    except TargetError as exc:
        assert str(exc)
        return
    assert target.raw == raw
    assert all(0x21 <= b < 0x7F for b in raw)  # nothing that could end a request line
    assert target.route == uvicorn_scope_path(raw)
    assert not set(target.route) & set("?#% \r\n\x00")
    assert "//" not in target.route and "/./" not in target.route + "/" and "/../" not in target.route + "/"


@pytest.mark.parametrize("raw", [
    b"/v1/load_lora_adapter%3F", b"/v1/load_lora_adapter%23", b"/v1/load_lora_adapter%20", b"/v1%0d%0aGET%20/",
    b"/v1/models%E2%82%AC", b"/v1/./models", b"//v1/models", b"/v1/x/../models", b"/v1/%2e%2e/models",
    b"http://h/v1/models", b"*", b"/v1/models#f", b"/v1/models%zz", b"/v1 /models", b"/v1/\xe2\x82\xac",
    b"/v1/models%2525", b"/" + b"a" * 9000,
])
def test_targets_that_some_server_would_read_differently_are_refused(raw):
    with pytest.raises(TargetError):
        parse_target(raw)


def test_encoded_slashes_are_judged_where_the_engine_routes_them():
    target = parse_target(b"/v1%2Fload_lora_adapter")
    assert target.route == "/v1/load_lora_adapter" and classify(target.route).kind is Kind.ADMIN
    assert parse_target(b"/v1/models?x=%3F").query == b"x=%3F"


def test_route_table_kinds():
    assert classify("/v1/completions").kind is Kind.JUDGED
    assert classify("/v1/chat/completions").kind is Kind.JUDGED
    assert classify("/v1/load_lora_adapter/").kind is Kind.ADMIN
    assert classify("/adapters/some-name").kind is Kind.ADMIN
    assert classify("/v1/responses").kind is Kind.GENERATING
    assert classify("/v1/models").methods == frozenset({"GET", "HEAD"})
    assert classify("/v1/new_generate_endpoint").kind is Kind.REFUSED
    assert unclassified([("/v1/completions", "post"), ("/v1/new", "post"), ("/v1/models", "delete")]) == [
        "DELETE /v1/models", "POST /v1/new"]
