"""The proxy: an OpenAI-compatible pass-through in front of vLLM that judges every completion.

Every path and method goes to the upstream unchanged (status, headers less hop-by-hop ones,
body); streamed answers are forwarded event by event as they arrive. ``/v1/completions`` and
``/v1/chat/completions`` answers are also judged, per choice, with the one shared
:func:`~loragate.server.judging.judge_completion`, and counted in :mod:`loragate.server.metrics`.

Own endpoints: ``/health`` (liveness: the proxy runs; never follows the upstream),
``/ready`` (readiness: the upstream's ``/health`` answers), ``/metrics`` (Prometheus).

Access: with API keys configured, every other path needs one (``Authorization: Bearer``);
the engine's adapter-loading endpoints (:data:`ADMIN_PATHS`) need the admin key, and a load
whose adapter folder resolves outside the contracts' adapters directory is refused. Paths are
checked and forwarded in their canonical form (:func:`canonical_path`).

Counting rules (so counters are exact under concurrency): a choice is counted once, after
its answer is complete (non-streamed) or its stream has ended with a ``finish_reason``;
counters are updated in one synchronous step with no ``await`` in between. A client that
goes away mid-stream cancels the upstream request and is counted as a disconnect, never as a
completion (a client that closes as soon as it has read ``data: [DONE]``, as the OpenAI SDK
does, had the whole answer: its stream counts as complete); an upstream that breaks
mid-stream, or ends its stream before every choice has a ``finish_reason`` and without
``[DONE]``, is an upstream error, and the client gets an OpenAI-style error event before the
stream closes.

Streamed events are read and forwarded in the engine connection's read callback, through the
server's :class:`~loragate.server.serving.BodyWriter` when it offers one, while the client keeps
up; otherwise (another ASGI server, a client applying back-pressure, a disconnect) the
request's task forwards them with ``send``. Either way each byte is read once, in order.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loragate.contracts import ContractError, ContractSet, load_contracts, resolve_under
from loragate.server import fastjson
from loragate.server.adapters import AdapterNames
from loragate.server.config import ProxyConfig
from loragate.server.judging import Judgement, judge_completion
from loragate.server.metrics import ProxyMetrics
from loragate.server.serving import BODY_WRITER, BodyWriter
from loragate.server.sse import StreamTally
from loragate.server.upstream import Upstream, UpstreamBroken, UpstreamError, UpstreamResponse

log = logging.getLogger("loragate.proxy")
access_log = logging.getLogger("loragate.proxy.requests")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

JUDGED_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}
#: vLLM's SageMaker-style endpoint: generates like ``/v1/completions`` or ``/v1/chat/completions``
#: depending on the body, so it is judged and counted like them (see :func:`invocation_endpoint`).
INVOCATIONS_PATH = "/invocations"
#: Engine endpoints that change what it serves: only with the admin key. vLLM 0.32 loads LoRA
#: adapters at run time through ``/v1/load_lora_adapter`` and also through the SageMaker-style
#: ``POST /adapters`` / ``DELETE /adapters/{name}``; ``/scale_elastic_ep`` rescales the engine.
ADMIN_PATHS = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters", "/scale_elastic_ep"}
ADMIN_PREFIXES = ("/adapters/",)
#: Body field holding the folder to load an adapter from, per loading endpoint.
ADAPTER_PATH_FIELDS = {"/v1/load_lora_adapter": "lora_path", "/adapters": "src"}


def canonical_path(path: str) -> str:
    """``path`` with empty and dot segments resolved (``/v1/./x``, ``/v1//x``, ``/a/../v1/x``).

    The proxy checks and forwards this form only: the upstream client would normalise dot
    segments itself, so checking the raw path would let ``/v1/./load_lora_adapter`` past the
    admin check and still reach the engine's loading endpoint.
    """
    if path.startswith("/") and "//" not in path and "/." not in path:
        return path  # nothing to resolve: already canonical
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    canonical = "/" + "/".join(segments)
    return canonical + "/" if segments and path.endswith("/") else canonical


def invocation_endpoint(body: bytes) -> str:
    """The endpoint an ``/invocations`` body is served as: a chat completion when it carries
    ``messages``, a completion when it carries ``prompt`` (vLLM tries the request types in that
    order), else ``other`` (forwarded unjudged: embeddings, scoring, or a body vLLM refuses)."""
    try:
        request = fastjson.loads(body)
    except (ValueError, RecursionError):
        return "other"
    if isinstance(request, dict) and isinstance(request.get("messages"), list):
        return "chat_completions"
    if isinstance(request, dict) and "prompt" in request:
        return "completions"
    return "other"


def is_admin_path(path: str) -> bool:
    """Whether the canonical ``path`` is an engine endpoint that needs the admin key."""
    bare = path.rstrip("/") or "/"
    return bare in ADMIN_PATHS or bare.startswith(ADMIN_PREFIXES)


def openai_error(message: str, type_: str, code: int | str | None = None, param: str | None = None) -> bytes:
    """An error body in the OpenAI format."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _SlowBody(Exception):
    pass


@dataclass
class _Exchange:
    """What one judged request has shown so far."""

    endpoint: str
    started: float
    adapter: str = ""
    stream: bool = False
    json_constrained: bool = False
    status: int = 0
    ttft_s: float | None = None
    finish: str | None = None
    json_result: str | None = None
    completion_tokens: int | None = None


class ProxyApp:
    """The ASGI application. Create with a :class:`ProxyConfig`; serve with uvicorn."""

    def __init__(self, config: ProxyConfig, contracts: ContractSet | None = None,
                 metrics: ProxyMetrics | None = None) -> None:
        self.config = config
        if contracts is None and config.contracts is not None:
            contracts = load_contracts(config.contracts)
        self.metrics = metrics or ProxyMetrics()
        self.upstream: Upstream | None = None
        self.names: AdapterNames | None = None
        self._contracts = contracts
        self._api_keys = tuple(k.encode() for k in config.api_keys)
        self._admin_key = config.admin_key.encode()
        self._background: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle
    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.upstream = Upstream(self.config.upstream, read_timeout_s=self.config.upstream_timeout_s)
        self.names = AdapterNames(self._contracts, self.upstream)
        self._background.append(asyncio.get_running_loop().create_task(self.names.run_periodic()))
        # What start-up built lives as long as the process: out of the collector's sight, an
        # oldest-generation collection no longer walks it (the ~35,000 objects of the imports
        # alone took 12.7 ms to walk, a pause every request in flight would wait out). vLLM's
        # server does the same after its start-up (vllm.utils.gc_utils.freeze_gc_heap).
        gc.collect()
        gc.freeze()

    async def shutdown(self) -> None:
        for task in self._background:
            task.cancel()
        if self.upstream is not None:
            await self.upstream.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/health":
            await self._respond(send, 200, b'{"status":"ok"}')
        elif path == "/ready":
            await self._ready(send)
        elif path == "/metrics":
            if not self.config.public_metrics and not self._authorised(scope, self._api_keys):
                await self._refuse(send, 401, "unauthorized", "a valid API key is required")
                return
            await self._respond(send, 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode())
        else:
            await self._proxy(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # noqa: BLE001 - reported to the server
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------ helpers
    @staticmethod
    async def _respond(send: Send, status: int, body: bytes, content_type: bytes = b"application/json",
                       headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    async def _refuse(self, send: Send, status: int, reason: str, message: str, endpoint: str = "other") -> None:
        self.metrics.bad_requests.labels(reason).inc()
        self.metrics.requests.labels(endpoint, f"{status // 100}xx").inc()
        types = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 408: "timeout_error", 413: "invalid_request_error", 415: "invalid_request_error"}
        await self._respond(send, status, openai_error(message, types.get(status, "invalid_request_error"), status))

    def _authorised(self, scope: Scope, keys: tuple[bytes, ...]) -> bool:
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
                break
        ok = False
        for key in keys:  # every key compared, in constant time each
            ok |= hmac.compare_digest(presented, key)
        return ok

    async def _ready(self, send: Send) -> None:
        ok = await self.upstream.healthy(timeout_s=2.0)
        await self._respond(send, 200 if ok else 503,
                            b'{"status":"ready"}' if ok else b'{"status":"upstream not ready"}')

    async def _read_body_in_time(self, receive: Receive) -> bytes:
        """The request body, or :class:`_SlowBody` when it has not all come within
        ``body_timeout_s``.

        What ``asyncio.timeout`` does, without its three lookups of the running loop (each a
        ``getpid`` system call on Python 3.11: 4 % of the proxy's CPU per request in a profile):
        one timer that cancels this task, told apart from any other cancellation.
        """
        loop = self._loop or asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = loop.call_at(loop.time() + self.config.body_timeout_s, expire)
        try:
            return await self._read_body(receive)
        except asyncio.CancelledError:
            if expired and task.uncancel() == 0:  # our own cancellation, and no other
                raise _SlowBody from None
            raise
        finally:
            timer.cancel()

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        limit = self.config.max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(body)
            if not message.get("more_body"):
                return b"".join(chunks)

    # ------------------------------------------------------------------ the proxy
    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = canonical_path(scope["path"])
        if path != scope["path"]:
            scope = {**scope, "path": path}
        admin = is_admin_path(path)
        endpoint = JUDGED_PATHS.get(path) or (
            "admin" if admin else "models" if path.startswith("/v1/models") else "other")
        if admin:
            if not self._admin_key or not self._authorised(scope, (self._admin_key,)):
                await self._refuse(send, 403, "forbidden",
                                   "runtime adapter loading needs the admin key", endpoint)
                return
        elif self._api_keys and not self._authorised(scope, self._api_keys):
            # every engine path, not only /v1/: vLLM also generates on /invocations
            await self._refuse(send, 401, "unauthorized", "a valid API key is required (Authorization: Bearer ...)", endpoint)
            return
        gauge = self.metrics.in_flight.labels(endpoint)
        gauge.inc()
        try:
            try:
                body = await self._read_body_in_time(receive)
            except _BodyTooLarge:
                await self._refuse(send, 413, "body_too_large",
                                   f"request body exceeds {self.config.max_body_bytes} bytes", endpoint)
                return
            except _SlowBody:
                await self._refuse(send, 408, "slow_body",
                                   f"request body not received within {self.config.body_timeout_s:.0f}s", endpoint)
                return
            except _ClientGone:
                return
            if path in ADAPTER_PATH_FIELDS and scope["method"] == "POST":
                checked = self._adapter_path_checked(body, ADAPTER_PATH_FIELDS[path])
                if isinstance(checked, tuple):
                    await self._refuse(send, checked[0], checked[1], checked[2], endpoint)
                    return
                body = checked
            if path == INVOCATIONS_PATH and scope["method"] == "POST":
                endpoint = invocation_endpoint(body)
                gauge.dec()  # in flight from here on as what the body is served as
                gauge = self.metrics.in_flight.labels(endpoint)
                gauge.inc()
            if endpoint in ("completions", "chat_completions") and scope["method"] == "POST":
                await self._judged(scope, receive, send, endpoint, body)
            else:
                await self._forward_plain(scope, send, endpoint, body)
        finally:
            gauge.dec()

    def _adapter_path_checked(self, body: bytes, key: str) -> bytes | tuple[int, str, str]:
        """A load request's body with its adapter folder resolved inside the adapters directory,
        or ``(status, reason, message)`` refusing it.

        The folder may be relative to the adapters directory of the proxy's contracts or absolute;
        symbolic links are followed. Anything that resolves outside that directory is refused
        (403), as is every load when the proxy has no contracts to take the directory from.
        """
        try:
            request = fastjson.loads(body)
        except (ValueError, RecursionError):
            return 400, "malformed_json", "request body is not valid JSON"
        if not isinstance(request, dict):
            return 400, "not_an_object", "request body must be a JSON object"
        folder = request.get(key)
        if not isinstance(folder, str) or not folder or "\x00" in folder:
            return 400, "adapter_path", f"{key} must be a non-empty path"
        if self._contracts is None:
            return 403, "adapter_path", "the proxy has no contracts file, so no adapters directory to load from"
        try:
            resolved = resolve_under(self._contracts.adapters_dir, folder, key)
        except ContractError:
            return 403, "adapter_path", f"{key} must lie inside the adapters directory"
        request[key] = str(resolved)
        return json.dumps(request).encode()

    async def _send_upstream(self, scope: Scope, body: bytes) -> UpstreamResponse:
        path = scope["path"]
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        return await self.upstream.send(scope["method"], path, scope["headers"], body)

    async def _forward_plain(self, scope: Scope, send: Send, endpoint: str, body: bytes) -> None:
        try:
            resp = await self._send_upstream(scope, body)
        except UpstreamError as exc:
            await self._upstream_failed(send, endpoint, "", exc)
            return
        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": resp.headers})
            async for chunk in resp.iter_chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except (UpstreamError, OSError):
            pass
        finally:
            resp.close()
        self.metrics.requests.labels(endpoint, f"{resp.status // 100}xx").inc()

    async def _upstream_failed(self, send: Send, endpoint: str, adapter: str, exc: UpstreamError) -> None:
        kind = "timeout" if exc.kind == "timeout" else "connect"
        self.metrics.upstream_errors.labels(adapter or self.names.label(None), kind).inc()
        self.metrics.requests.labels(endpoint, "5xx").inc()
        status = 504 if kind == "timeout" else 502
        log.warning("upstream %s error on %s: %s", kind, endpoint, exc)
        await self._respond(send, status, openai_error(
            f"upstream engine unavailable ({kind}): {type(exc).__name__}", "upstream_error", status))

    async def _judged(self, scope: Scope, receive: Receive, send: Send, endpoint: str, body: bytes) -> None:
        ex = _Exchange(endpoint=endpoint, started=time.perf_counter())
        content_type = b""
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
                break
        if not content_type.split(b";")[0].strip().lower() == b"application/json":
            await self._refuse(send, 415, "unsupported_media_type", "Content-Type must be application/json", endpoint)
            return
        try:
            request = fastjson.loads(body)
        except (ValueError, RecursionError):
            await self._refuse(send, 400, "malformed_json", "request body is not valid JSON", endpoint)
            return
        if not isinstance(request, dict):
            await self._refuse(send, 400, "not_an_object", "request body must be a JSON object", endpoint)
            return
        model = request.get("model")
        ex.adapter = self.names.label(model)
        ex.stream = request.get("stream") is True
        fmt = request.get("response_format")
        ex.json_constrained = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
        strip_usage = False
        if ex.stream:
            opts = request.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage")):
                request["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                body = json.dumps(request).encode()
                strip_usage = True
        try:
            resp = await self._send_upstream(scope, body)
        except UpstreamError as exc:
            await self._upstream_failed(send, endpoint, ex.adapter, exc)
            self._log(ex)
            return
        ex.status = resp.status
        try:
            if ex.stream and resp.status == 200 and resp.content_type.startswith("text/event-stream"):
                await self._relay_stream(send, receive, resp, ex, strip_usage,
                                         (scope.get("extensions") or {}).get(BODY_WRITER))
            else:
                await self._relay_whole(send, resp, ex)
        finally:
            resp.close()
        self._log(ex)

    async def _relay_whole(self, send: Send, resp: UpstreamResponse, ex: _Exchange) -> None:
        try:
            content = await resp.read()
        except UpstreamError as exc:
            self.metrics.upstream_errors.labels(ex.adapter, "stream_broken").inc()
            self.metrics.requests.labels(ex.endpoint, "5xx").inc()
            await self._respond(send, 502, openai_error(f"upstream answer broke off: {type(exc).__name__}",
                                                        "upstream_error", 502))
            return
        try:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": resp.headers + [(b"content-length", str(len(content)).encode())]})
            await send({"type": "http.response.body", "body": content})
        except OSError:
            pass
        self.metrics.requests.labels(ex.endpoint, f"{resp.status // 100}xx").inc()
        if resp.status >= 500:
            self.metrics.upstream_errors.labels(ex.adapter, "status_5xx").inc()
            return
        if resp.status != 200:
            return  # the engine refused the request (400 bad params, 404 unknown model): nothing generated
        try:
            answer = fastjson.loads(content)
            ex.adapter = self.names.label(answer.get("model"))
            choices = answer["choices"]
            usage = answer.get("usage") or {}
            outputs = [((c.get("text") if ex.endpoint == "completions" else (c.get("message") or {}).get("content")) or "",
                        c.get("finish_reason")) for c in choices]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            self.metrics.upstream_errors.labels(ex.adapter, "invalid_response").inc()
            return
        self._count(ex, outputs, usage)
        self.metrics.duration.labels(ex.adapter).observe(time.perf_counter() - ex.started)

    async def _relay_stream(self, send: Send, receive: Receive, resp: UpstreamResponse, ex: _Exchange,
                            strip_usage: bool, writer: BodyWriter | None = None) -> None:
        gone = asyncio.Event()

        async def watch_disconnect() -> None:
            while True:
                if (await receive())["type"] == "http.disconnect":
                    gone.set()
                    return

        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        tally = StreamTally(strip_usage)
        model_seen = False

        def feed(chunk: bytes) -> bytes:
            nonlocal model_seen
            out = tally.feed(chunk)
            if tally.model is not None and not model_seen:
                ex.adapter = self.names.label(tally.model)
                model_seen = True
            if tally.has_output and ex.ttft_s is None:
                ex.ttft_s = time.perf_counter() - ex.started
            return out

        def forward_now(chunk: bytes) -> bool:
            """Forward from the engine connection's read callback while the client can take it;
            else leave the chunk to this task's loop, which waits for the client."""
            if gone.is_set() or not ready():
                return False
            out = feed(chunk)
            if out:
                write(out)
            return True

        sink = None
        if writer is not None:  # served by uvicorn with CorkedHttpToolsProtocol
            ready, write, sink = writer.ready, writer.write, forward_now

        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": resp.headers})
            next_chunk = resp.next_chunk
            while (chunk := await next_chunk(sink)) is not None:
                if gone.is_set():
                    if tally.done:
                        break  # the client left after [DONE]: it has the whole answer
                    raise _ClientGone
                out = feed(chunk)
                if out:
                    try:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                    except OSError:
                        raise _ClientGone from None
            rest = tally.rest()
            if rest:
                await send({"type": "http.response.body", "body": rest, "more_body": True})
            if gone.is_set() and not tally.done:
                raise _ClientGone
            if not tally.complete and not tally.done:  # ended in good order, but short of the end
                raise UpstreamBroken("the engine ended the stream before a finish_reason or [DONE]")
        except _ClientGone:
            self.metrics.client_disconnects.labels(ex.adapter).inc()
            self.metrics.requests.labels(ex.endpoint, "4xx").inc()
            ex.status = 499
            return
        except UpstreamError as exc:
            self.metrics.upstream_errors.labels(ex.adapter, "stream_broken").inc()
            self.metrics.requests.labels(ex.endpoint, "5xx").inc()
            ex.status = 502
            log.warning("upstream stream broke off for %s: %s", ex.adapter, exc)
            error = openai_error(f"upstream stream broke off: {type(exc).__name__}", "upstream_error", 502)
            try:
                await send({"type": "http.response.body", "body": b"data: " + error + b"\n\n", "more_body": False})
            except OSError:
                pass
            return
        finally:
            watcher.cancel()
        try:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass
        self.metrics.requests.labels(ex.endpoint, "2xx").inc()
        if not tally.complete:
            self.metrics.upstream_errors.labels(ex.adapter, "stream_broken").inc()
            return
        self._count(ex, tally.outputs(), tally.usage)
        if ex.ttft_s is not None:
            self.metrics.ttft.labels(ex.adapter).observe(ex.ttft_s)
        self.metrics.duration.labels(ex.adapter).observe(time.perf_counter() - ex.started)

    def _count(self, ex: _Exchange, outputs: list[tuple[str, str | None]], usage: dict) -> None:
        """Judge every choice, then update every counter in one synchronous step."""
        contract = self.names.contract(ex.adapter)
        expects_json = bool(contract and contract.expects_json) or ex.json_constrained
        prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        completion_tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        per_choice = completion_tokens // len(outputs) if completion_tokens and len(outputs) > 1 else completion_tokens
        judgements: list[Judgement] = [
            judge_completion(text, reason, expects_json=expects_json,
                             json_schema=contract.json_schema if contract else None,
                             prompt_tokens=prompt_tokens, completion_tokens=per_choice,
                             max_model_len=self.names.context_limit(ex.adapter))
            for text, reason in outputs
        ]
        m = self.metrics
        m.init_adapter(ex.adapter, expects_json)
        for j in judgements:
            m.completions.labels(ex.adapter, j.finish.value).inc()
            if j.length_cause is not None:
                m.length_cutoffs.labels(ex.adapter, j.length_cause.value).inc()
            if j.json_result is not None:
                m.json_outputs.labels(ex.adapter, j.json_result.value).inc()
                if ex.json_constrained:
                    m.constrained_outputs.labels(ex.adapter, j.json_result.value).inc()
        if isinstance(completion_tokens, int):
            m.output_tokens.labels(ex.adapter).inc(completion_tokens)
            ex.completion_tokens = completion_tokens
        if judgements:
            ex.finish = ",".join(j.finish.value for j in judgements)
            results = [j.json_result.value for j in judgements if j.json_result is not None]
            ex.json_result = ",".join(results) or None

    def _log(self, ex: _Exchange) -> None:
        if not self.config.log_requests:
            return
        access_log.info(json.dumps({
            "event": "request", "endpoint": ex.endpoint, "adapter": ex.adapter, "status": ex.status,
            "stream": ex.stream, "finish_reason": ex.finish, "json_result": ex.json_result,
            "json_constrained": ex.json_constrained, "completion_tokens": ex.completion_tokens,
            "ttft_ms": None if ex.ttft_s is None else round(ex.ttft_s * 1e3, 2),
            "latency_ms": round((time.perf_counter() - ex.started) * 1e3, 2),
        }))
