"""The proxy: an OpenAI-compatible pass-through in front of vLLM that judges every completion.

What reaches the engine is exactly what the proxy checked:

- The request target is checked (:mod:`loragate.server.target`) and sent to the engine as the
  client's raw bytes; every decision (own endpoint, access, judging) is made on the route as
  the engine will route it, and only routes of :mod:`loragate.server.routes` are forwarded.
- The body the proxy read is the body it sends (but for usage asked on a stream's behalf); the
  fields it reads to relay and judge must be of the JSON type it reads them as, so the engine
  reads them the same way, or the request is refused (:mod:`loragate.server.fields`).
- Headers go through less hop-by-hop ones (those named in ``Connection`` too), both ways; an
  answer carries one ``date`` header, the proxy's.

``/v1/completions``, ``/v1/chat/completions`` and ``/invocations`` answers are judged, per choice
and on the generated part (an echoed prompt left out), with the one shared
:func:`~loragate.core.judging.judge_completion`, and counted in
:mod:`loragate.server.metrics`; the Responses and Messages APIs are forwarded and counted as
unjudged generations.

Own endpoints: ``/health`` (liveness: the proxy runs; never follows the upstream),
``/ready`` (readiness: the upstream's ``/health`` answers, and every check in
:attr:`ProxyApp.readiness_checks` passes), ``/metrics`` (Prometheus), and those of
:attr:`ProxyApp.own_routes` (:mod:`loragate.server.engine_metrics`, :mod:`loragate.server.reconciler`).
While the server drains (:mod:`loragate.server.drain`), ``/ready`` answers 503 and every
request to the engine gets a 503 with ``Connection: close``.

Access: with API keys configured, every other route needs one (``Authorization: Bearer``);
admin routes (:class:`~loragate.server.routes.Kind` ``admin``) need the admin key, and a load
whose adapter folder resolves outside the contracts' adapters directory is refused.

Counting rules (so counters are exact under concurrency): a choice is counted once, after
its answer is complete (non-streamed) or its stream has ended with a ``finish_reason``;
counters are updated in one synchronous step with no ``await`` in between. A client that
goes away before it was sent the whole answer, streamed or not, cancels the engine's request
(its connection to the engine is closed, which makes vLLM abort) and is counted as a
disconnect, never as a completion. Whether the client was sent the whole answer is decided by
the server's own view of the connection when the last byte was handed to it: a client that
closes right after ``data: [DONE]``, as the OpenAI SDK does, had the whole answer. An upstream
that breaks mid-stream, or ends its stream before every choice has a ``finish_reason`` and
without ``[DONE]``, is an upstream error, and the client gets an OpenAI-style error event
before the stream closes.

Streamed events are read and forwarded in the engine connection's read callback, through the
server's :class:`~loragate.server.serving.BodyWriter` when it offers one, while the client keeps
up; otherwise (another ASGI server, a client applying back-pressure, a disconnect) the
request's task forwards them with ``send``. Either way each byte is read once, in order.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loragate.core import fastjson
from loragate.core.contracts import (
    ContractError,
    ContractSet,
    load_contracts,
    resolve_under,
)
from loragate.core.sse import StreamTally
from loragate.server import engine_metrics, reconciler
from loragate.server.adapters import AdapterNames
from loragate.server.answers import Output, judge_outputs, whole_answer
from loragate.server.config import ProxyConfig
from loragate.server.fields import Asked, FieldError, read_fields, upstream_body
from loragate.server.metrics import ProxyMetrics
from loragate.server.reconciler import Admission, Reconciler
from loragate.server.routes import Kind, classify, unclassified
from loragate.server.shadow import LiveOutcome, Shadows, live_outcome_of
from loragate.server.serving import BODY_WRITER, RAW_TARGET, BodyWriter, ServerEvents
from loragate.server.target import RequestTarget, TargetError, parse_target
from loragate.server.turns import EngineTurns, needs_turn_alone, refusal
from loragate.server.upstream import (
    Upstream,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamReset,
    UpstreamResponse,
    UpstreamTimeout,
)

log = logging.getLogger("loragate.proxy")
access_log = logging.getLogger("loragate.proxy.requests")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
#: An own endpoint besides /health, /ready and /metrics: called with the request's scope and send.
OwnRoute = Callable[[Scope, Send], Awaitable[None]]

def invocation_endpoint(body: bytes) -> str:
    """The endpoint label of an ``/invocations`` request: ``chat_completions`` when its body
    carries ``messages``, ``completions`` when it carries ``prompt``, else ``other``.

    Only a label for the request and in-flight counts: how the answer is judged follows what
    the engine answered (a completion, a chat completion, or neither), never this guess.
    """
    try:
        request = fastjson.loads(body)
    except (ValueError, RecursionError):
        return "other"
    if isinstance(request, dict) and isinstance(request.get("messages"), list):
        return "chat_completions"
    if isinstance(request, dict) and "prompt" in request:
        return "completions"
    return "other"


def openai_error(message: str, type_: str, code: int | str | None = None, param: str | None = None) -> bytes:
    """An error body in the OpenAI format."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _SlowBody(Exception):
    pass


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's declared body length, or None (absent or unreadable: the body limit
    still applies while reading)."""
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class _ClientLink:
    """Whether the client is still connected, told as early as the server can, for one exchange
    with the engine.

    While armed, the client's going away cancels the request's task: whatever it awaits (the
    engine's answer head, its body, the client's connection) stops, and the connection to the
    engine is closed, which makes vLLM abort the request. :meth:`disarm` before handing over
    the last bytes of an answer; :attr:`connected` then says whether they were handed to an open
    connection. Under uvicorn with :class:`~loragate.server.serving.CorkedHttpToolsProtocol` the
    server reports the close synchronously (:class:`~loragate.server.serving.BodyWriter`); under
    another ASGI server a task watches ``receive`` for ``http.disconnect``.
    """

    __slots__ = ("writer", "gone", "_armed", "_task", "_watcher")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.gone = False
        self._armed = True
        self._task = asyncio.current_task()
        self.writer: BodyWriter | None = (scope.get("extensions") or {}).get(BODY_WRITER)
        self._watcher: asyncio.Task | None = None
        if self.writer is not None:
            self.writer.on_disconnect(self._lost)
        else:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._lost()

    def _lost(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self._armed and self._task is not None:
            self._task.cancel()

    @property
    def connected(self) -> bool:
        if self.gone:
            return False
        return self.writer is None or self.writer.connected

    def disarm(self) -> None:
        self._armed = False

    def took_cancellation(self) -> bool:
        """Whether a cancellation of the task was this link's alone (then it is withdrawn)."""
        return self.gone and self._task is not None and self._task.cancelling() > 0 and self._task.uncancel() == 0

    def close(self) -> None:
        self._armed = False
        if self._watcher is not None:
            self._watcher.cancel()


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
    #: whether this exchange's outcome has been counted (completion, disconnect or error)
    counted: bool = False
    #: what the request asked for (the fields the proxy reads)
    asked: Asked = field(default_factory=Asked)
    #: the live answer's judged outcome, for the request's shadows (None: no shadow)
    live_outcome: "asyncio.Future[LiveOutcome] | None" = None


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
        # keys are kept and compared as SHA-256 digests: a comparison's time says nothing of a key's length
        self._api_keys = tuple(hashlib.sha256(k.encode()).digest() for k in config.api_keys)
        self._admin_key = hashlib.sha256(config.admin_key.encode()).digest() if config.admin_key else b""
        self._background: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Engine routes (``"METHOD path"``) the proxy refuses for want of a classification.
        self.unclassified_routes: list[str] | None = None
        #: Requests for prompt log-probabilities run alone in the engine (:mod:`loragate.server.turns`).
        self.turns = EngineTurns()
        #: Candidate adapters shadowing live ones (:mod:`loragate.server.shadow`).
        self.shadows = Shadows(config.shadows, contracts, self.metrics, log_requests=config.log_requests)
        #: Own endpoints by route, answered before anything is forwarded (same access as /metrics).
        self.own_routes: dict[str, OwnRoute] = {}
        #: More conditions of /ready: each returns (ready, why not).
        self.readiness_checks: list[Callable[[], tuple[bool, str]]] = []
        #: Set when the server drains (loragate.server.drain): new engine requests get 503.
        self.draining = False
        #: Requests refused while draining.
        self.drain_refused = 0
        self.own_routes[engine_metrics.ROUTE] = engine_metrics.EngineMetricsRelay(
            self._upstream_client, self.metrics.engine_scrape_errors)
        #: The promoted-set reconciler (``promoted_set`` configured), and the admission of engine
        #: requests it holds back for adapters being removed.
        self.reconciler: Reconciler | None = None
        self.admission: Admission | None = None
        if config.promoted_set is not None:
            self.metrics.enable_promoted()
            self.reconciler = Reconciler(
                config.promoted_set, self._upstream_client, self.metrics, poll_s=config.promoted_poll_s,
                retry_s=config.promoted_retry_s, retry_max_s=config.promoted_retry_max_s,
                state_file=config.promoted_state, on_change=self._refresh_names)
            self.admission = self.reconciler.admission
            self.own_routes[reconciler.ROUTE] = self.reconciler.endpoint
            self.readiness_checks.append(self.reconciler.ready)

    def _refresh_names(self) -> None:
        """The engine's model list changed (the reconciler loaded or unloaded): read it now."""
        self._background = [t for t in self._background if not t.done()]
        self._background.append(asyncio.get_running_loop().create_task(self._adapter_names().refresh()))

    def _upstream_client(self) -> Upstream:
        """The engine client, which :meth:`startup` makes before the app serves anything."""
        upstream = self.upstream
        if upstream is None:
            raise RuntimeError("the proxy has not started: startup() makes its upstream client")
        return upstream

    def _adapter_names(self) -> AdapterNames:
        """The adapter names, which :meth:`startup` makes before the app serves anything."""
        names = self.names
        if names is None:
            raise RuntimeError("the proxy has not started: startup() makes its adapter names")
        return names

    # ------------------------------------------------------------------ lifecycle
    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.upstream = Upstream(self.config.upstream, read_timeout_s=self.config.upstream_timeout_s)
        # Every known adapter's series exist from the moment it is known, at 0: a rule or dashboard
        # sees an adapter before its first request, and an alert sees its first event.
        self.names = AdapterNames(self._contracts, self.upstream, on_known=self._init_adapter)
        self._background.append(asyncio.get_running_loop().create_task(self.names.run_periodic()))
        self._background.append(asyncio.get_running_loop().create_task(self._report_unclassified_routes()))
        if self.reconciler is not None:
            self._background.append(asyncio.get_running_loop().create_task(self.reconciler.run()))
        # What start-up built lives as long as the process: out of the collector's sight, an
        # oldest-generation collection no longer walks it (the ~35,000 objects of the imports
        # alone took 12.7 ms to walk, a pause every request in flight would wait out). vLLM's
        # server does the same after its start-up (vllm.utils.gc_utils.freeze_gc_heap).
        gc.collect()
        gc.freeze()

    def _init_adapter(self, name: str) -> None:
        contract = self._contracts[name] if self._contracts is not None and name in self._contracts else None
        self.metrics.init_adapter(name, bool(contract and contract.expects_json))

    async def _report_unclassified_routes(self) -> None:
        """Read the engine's OpenAPI document once it answers and log every route it serves that
        the proxy refuses for want of a classification (:func:`loragate.server.routes.unclassified`)."""
        for _ in range(60):
            try:
                # JSON of any shape: a wrong one raises KeyError/TypeError/AttributeError, caught below
                document: Any = await self._upstream_client().get_json("/openapi.json", timeout_s=10.0)
                paths = document["paths"]
                pairs = [(path, method) for path, ops in paths.items() for method in ops]
            except (UpstreamConnectError, UpstreamTimeout, UpstreamReset):
                await asyncio.sleep(5.0)  # not up yet
                continue
            except (UpstreamError, KeyError, TypeError, AttributeError) as exc:
                log.info(json.dumps({"event": "no_engine_openapi", "message": f"route check skipped: {exc}"}))
                return
            self.unclassified_routes = unclassified(pairs)
            if self.unclassified_routes:
                log.warning(json.dumps({"event": "unclassified_engine_routes", "refused": self.unclassified_routes,
                                        "message": "the engine serves routes this proxy does not know; "
                                                   "they are refused (loragate.server.routes)"}))
            return

    async def shutdown(self) -> None:
        for task in self._background:
            task.cancel()
        await self.shadows.close()
        if self.upstream is not None:
            await self.upstream.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        raw = (scope.get("extensions") or {}).get(RAW_TARGET)
        if raw is None:  # another ASGI server: rebuild the target from its raw parts
            query = scope.get("query_string") or b""
            raw = scope.get("raw_path") or scope["path"].encode("utf-8")
            raw = raw + b"?" + query if query else raw
        try:
            target = parse_target(raw)
        except TargetError as exc:
            await self._refuse(send, 400, "invalid_target", str(exc))
            return
        route = target.route
        if route == "/health":
            await self._respond(send, 200, b'{"status":"ok"}')
        elif route == "/ready":
            await self._ready(send)
        elif route == "/metrics":
            if not self.config.public_metrics and not self._authorised(scope, self._api_keys):
                await self._refuse(send, 401, "unauthorized", "a valid API key is required")
                return
            await self._respond(send, 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode())
        elif route in self.own_routes:
            if not self.config.public_metrics and not self._authorised(scope, self._api_keys):
                await self._refuse(send, 401, "unauthorized", "a valid API key is required")
                return
            await self.own_routes[route](scope, send)
        elif self.draining:
            await self._refuse_draining(send)
        else:
            await self._proxy(scope, receive, send, target)

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
                 404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                 413: "invalid_request_error", 415: "invalid_request_error"}
        # a refused body may not have been read: the connection cannot carry another request
        headers = [(b"connection", b"close")] if status in (408, 413) else None
        await self._respond(send, status, openai_error(message, types.get(status, "invalid_request_error"), status),
                            headers=headers)

    def server_events(self) -> ServerEvents:
        """What the serving layer reports, counted in this app's metrics."""
        app = self

        class _Counted(ServerEvents):
            def refused(self, reason: str, status: int | None) -> None:
                app.metrics.bad_requests.labels(reason).inc()
                if status is not None:
                    app.metrics.requests.labels("other", f"{status // 100}xx").inc()

            def evicted(self) -> None:
                app.metrics.connections_evicted.inc()

        return _Counted()

    def _authorised(self, scope: Scope, keys: tuple[bytes, ...]) -> bool:
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
                break
        presented_digest = hashlib.sha256(presented).digest()
        ok = False
        for digest in keys:  # every key compared, in constant time each, as equal-length digests
            ok |= hmac.compare_digest(presented_digest, digest)
        return ok

    async def _ready(self, send: Send) -> None:
        if self.draining:
            await self._respond(send, 503, b'{"status":"draining"}')
            return
        ok = await self._upstream_client().healthy(timeout_s=2.0)
        if not ok:
            await self._respond(send, 503, b'{"status":"upstream not ready"}')
            return
        for check in self.readiness_checks:
            ready, why = check()
            if not ready:
                await self._respond(send, 503, json.dumps({"status": why}).encode())
                return
        await self._respond(send, 200, b'{"status":"ready"}')

    async def _refuse_draining(self, send: Send) -> None:
        """A request that came after the drain began: 503, and the client should go elsewhere."""
        self.drain_refused += 1
        self.metrics.bad_requests.labels("draining").inc()
        self.metrics.requests.labels("other", "5xx").inc()
        await self._respond(send, 503, openai_error(
            "this server is shutting down; send the request again (another replica takes it)",
            "service_unavailable", 503), headers=[(b"connection", b"close"), (b"retry-after", b"1")])

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
    async def _proxy(self, scope: Scope, receive: Receive, send: Send, target: RequestTarget) -> None:
        route = classify(target.route)
        endpoint = route.endpoint
        if route.kind is Kind.REFUSED:
            await self._refuse(send, 404, "not_served", f"the proxy does not serve {target.route}", endpoint)
            return
        if route.kind is Kind.ADMIN:
            if not self._admin_key or not self._authorised(scope, (self._admin_key,)):
                await self._refuse(send, 403, "forbidden", "this endpoint needs the admin key", endpoint)
                return
        elif self._api_keys and not self._authorised(scope, self._api_keys):
            await self._refuse(send, 401, "unauthorized", "a valid API key is required (Authorization: Bearer ...)", endpoint)
            return
        if scope["method"] not in route.methods:
            await self._refuse(send, 405, "method_not_allowed",
                               f"{target.route} does not take {scope['method']}", endpoint)
            return
        length = _content_length(scope["headers"])
        if length is not None and length > self.config.max_body_bytes:
            await self._refuse(send, 413, "body_too_large",
                               f"request body exceeds {self.config.max_body_bytes} bytes", endpoint)
            return
        gauge = self.metrics.in_flight.labels(endpoint)
        gauge.inc()
        ticket: int | None = None
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
                self._count_gone_unread(scope, route.kind, endpoint)
                return
            if route.adapter_path_field is not None:
                checked = self._adapter_path_checked(body, route.adapter_path_field)
                if isinstance(checked, tuple):
                    await self._refuse(send, checked[0], checked[1], checked[2], endpoint)
                    return
                body = checked
            if self.admission is not None and route.kind in (Kind.JUDGED, Kind.GENERATING):
                ticket = self.admission.enter(body)
                if ticket is None:
                    await self._refuse(send, 404, "adapter_retiring",
                                       "the requested adapter is being removed from this server", endpoint)
                    return
            if route.kind is Kind.JUDGED:
                if target.route.rstrip("/") == "/invocations":
                    endpoint = invocation_endpoint(body)
                    gauge.dec()  # in flight from here on as what the body is served as
                    gauge = self.metrics.in_flight.labels(endpoint)
                    gauge.inc()
                await self._judged(scope, receive, send, target, endpoint, body)
            else:
                await self._forward_plain(scope, receive, send, target, endpoint, body,
                                          generating=route.kind is Kind.GENERATING)
        finally:
            gauge.dec()
            if ticket is not None and self.admission is not None:
                self.admission.leave(ticket)

    def _count_gone_unread(self, scope: Scope, kind: Kind, endpoint: str) -> None:
        """A client that left before the proxy read its request: a client disconnect of the
        adapter its body names (when the whole body had come: :meth:`BodyWriter.unread_body`),
        else of no known adapter; a request of another kind counts as a 4xx request only."""
        if kind not in (Kind.JUDGED, Kind.GENERATING):
            self.metrics.requests.labels(endpoint, "4xx").inc()
            return
        writer: BodyWriter | None = (scope.get("extensions") or {}).get(BODY_WRITER)
        body = writer.unread_body() if writer is not None else None
        model = None
        if body is not None:
            try:
                request = fastjson.loads(body)
            except (ValueError, RecursionError):
                request = None
            if isinstance(request, dict):
                model = request.get("model")
        self._count_disconnect(self._adapter_names().label(model), endpoint)

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

    async def _send_upstream(self, scope: Scope, target: RequestTarget, body: bytes) -> UpstreamResponse:
        return await self._upstream_client().send(scope["method"], target.raw, scope["headers"], body)

    async def _forward_plain(self, scope: Scope, receive: Receive, send: Send, target: RequestTarget,
                             endpoint: str, body: bytes, generating: bool = False) -> None:
        adapter = ""
        if generating:
            try:
                request = fastjson.loads(body)
            except (ValueError, RecursionError):
                request = None
            adapter = self._adapter_names().label(request.get("model") if isinstance(request, dict) else None)
        link = _ClientLink(scope, receive)
        turn: bool | None = None
        try:
            if generating:
                turn = await self.turns.enter(isinstance(request, dict) and needs_turn_alone(request))
            try:
                resp = await self._send_upstream(scope, target, body)
            except UpstreamError as exc:
                await self._upstream_failed(send, endpoint, adapter, exc)
                return
            try:
                await send({"type": "http.response.start", "status": resp.status, "headers": resp.headers})
                while (chunk := await resp.next_chunk()) is not None:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                link.disarm()
                await send({"type": "http.response.body", "body": b""})
            except UpstreamError as exc:
                self.metrics.upstream_errors.labels(adapter or self._adapter_names().label(None), exc.kind).inc()
            finally:
                resp.close()
            if not link.connected:
                self._count_disconnect(adapter or self._adapter_names().label(None), endpoint)
                return
            self.metrics.requests.labels(endpoint, f"{resp.status // 100}xx").inc()
            if generating and 200 <= resp.status < 300:
                self.metrics.unjudged_generations.labels(adapter, endpoint).inc()
        except asyncio.CancelledError:
            if not link.took_cancellation():
                raise
            self._count_disconnect(adapter or self._adapter_names().label(None), endpoint)
        finally:
            if turn is not None:
                self.turns.leave(turn)
            link.close()

    async def _upstream_failed(self, send: Send, endpoint: str, adapter: str, exc: UpstreamError) -> None:
        kind = exc.kind
        self.metrics.upstream_errors.labels(adapter or self._adapter_names().label(None), kind).inc()
        self.metrics.requests.labels(endpoint, "5xx").inc()
        status = 504 if kind == "timeout" else 502
        log.warning("upstream %s error on %s: %s", kind, endpoint, exc)
        await self._respond(send, status, openai_error(
            f"upstream engine failed ({kind}): {exc}", "upstream_error", status))

    async def _judged(self, scope: Scope, receive: Receive, send: Send, target: RequestTarget,
                      endpoint: str, body: bytes) -> None:
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
        # The engine reads booleans leniently (1, "true", "yes" stream too); the fields the proxy
        # reads to relay and count must be of the JSON type it reads them as.
        try:
            ex.asked = read_fields(request)
        except FieldError as exc:
            await self._refuse(send, 400, "invalid_field", str(exc), endpoint)
            return
        refused = refusal(request)
        if refused is not None:
            await self._refuse(send, 400, "invalid_field", refused, endpoint)
            return
        ex.adapter = self._adapter_names().label(request.get("model"))
        ex.stream = ex.asked.stream
        ex.json_constrained = ex.asked.json_constrained
        shadows = self.shadows.sample(ex.adapter, request, ex.asked) if self.shadows else None
        body = upstream_body(request, ex.asked) or body
        link = _ClientLink(scope, receive)
        turn: bool | None = None
        try:
            turn = await self.turns.enter(needs_turn_alone(request))
            try:
                resp = await self._send_upstream(scope, target, body)
            except UpstreamError as exc:
                await self._upstream_failed(send, endpoint, ex.adapter, exc)
                self._log(ex)
                return
            ex.status = resp.status
            if shadows and resp.status == 200:  # the live request is in the engine: its shadows join it
                ex.live_outcome = asyncio.get_running_loop().create_future()
                self.shadows.start(shadows, upstream=self._upstream_client(), turns=self.turns,
                                   names=self._adapter_names(), target=target.raw, headers=scope["headers"],
                                   request=request, asked=ex.asked, live=ex.live_outcome)
            try:
                if ex.stream and resp.status == 200 and resp.content_type.startswith("text/event-stream"):
                    await self._relay_stream(send, resp, ex, link)
                else:
                    await self._relay_whole(send, resp, ex, link)
            finally:
                resp.close()
        except asyncio.CancelledError:
            if not link.took_cancellation():
                raise
            if not ex.counted:
                self._client_gone(ex)
        finally:
            if turn is not None:
                self.turns.leave(turn)
            link.close()
            if ex.live_outcome is not None and not ex.live_outcome.done():
                ex.live_outcome.set_result(None)  # no judged live answer: its shadows count unpaired
        self._log(ex)

    def _count_disconnect(self, adapter: str, endpoint: str) -> None:
        """A client that left before it was handed the whole answer: never a completion."""
        self.metrics.client_disconnects.labels(adapter).inc()
        self.metrics.requests.labels(endpoint, "4xx").inc()

    def _client_gone(self, ex: _Exchange) -> None:
        self._count_disconnect(ex.adapter, ex.endpoint)
        ex.status = 499
        ex.counted = True

    async def _relay_whole(self, send: Send, resp: UpstreamResponse, ex: _Exchange, link: "_ClientLink") -> None:
        try:
            content = await resp.read()
        except UpstreamError as exc:
            self.metrics.upstream_errors.labels(ex.adapter, exc.kind).inc()
            self.metrics.requests.labels(ex.endpoint, "5xx").inc()
            ex.counted = True
            await self._respond(send, 502, openai_error(f"upstream answer broke off: {exc}", "upstream_error", 502))
            return
        link.disarm()  # from here on the answer is the client's: what it was handed decides
        await send({"type": "http.response.start", "status": resp.status,
                    "headers": resp.headers + [(b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})
        if not link.connected:  # gone before the whole answer was handed to its connection
            self._client_gone(ex)
            return
        ex.counted = True
        self.metrics.requests.labels(ex.endpoint, f"{resp.status // 100}xx").inc()
        if resp.status >= 500:
            self.metrics.upstream_errors.labels(ex.adapter, "status_5xx").inc()
            return
        if resp.status != 200:
            return  # the engine refused the request (400 bad params, 404 unknown model): nothing generated
        try:
            parsed = fastjson.loads(content)
            if ex.endpoint == "other" and isinstance(parsed, dict) and "choices" not in parsed:
                return  # an /invocations request the engine served as pooling: nothing generated
            # judged by what the engine answered: a completion's choice has text, a chat one a message
            answer = whole_answer(parsed)
            ex.adapter = self._adapter_names().label(answer.model)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            self.metrics.upstream_errors.labels(ex.adapter, "invalid_response").inc()
            return
        self._count(ex, answer.outputs, answer.usage, answer.chat)
        self.metrics.duration.labels(ex.adapter).observe(time.perf_counter() - ex.started)

    async def _relay_stream(self, send: Send, resp: UpstreamResponse, ex: _Exchange, link: "_ClientLink") -> None:
        # usage the proxy asked for on the client's behalf: the client gets the stream vLLM would have sent it
        tally = StreamTally(strip_usage=not ex.asked.include_usage)
        model_seen = False
        #: whether [DONE] was handed to the client's connection while it was open
        done_delivered = False

        def feed(chunk: bytes) -> bytes:
            nonlocal model_seen
            out = tally.feed(chunk)
            if tally.model is not None and not model_seen:
                ex.adapter = self._adapter_names().label(tally.model)
                model_seen = True
            if tally.has_output and ex.ttft_s is None:
                ex.ttft_s = time.perf_counter() - ex.started
            return out

        def forward_now(chunk: bytes) -> bool:
            """Forward from the engine connection's read callback while the client can take it;
            else leave the chunk to this task's loop, which waits for the client."""
            nonlocal done_delivered
            if link.gone or not ready():
                return False
            out = feed(chunk)
            if out:
                write(out)
            done_delivered = tally.done
            return True

        sink = None
        writer = link.writer
        if writer is not None:  # served by uvicorn with CorkedHttpToolsProtocol
            ready, write, sink = writer.ready, writer.write, forward_now

        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": resp.headers})
            next_chunk = resp.next_chunk
            while (chunk := await next_chunk(sink)) is not None:
                out = feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    done_delivered = tally.done and link.connected
            rest = tally.rest()
            if rest:
                await send({"type": "http.response.body", "body": rest, "more_body": True})
            if not tally.complete and not tally.done:  # ended in good order, but short of the end
                raise UpstreamBroken("the engine ended the stream before a finish_reason or [DONE]")
            link.disarm()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if done_delivered and link.took_cancellation():
                # the client left after [DONE] had been handed to it: it has the whole answer
                self._stream_complete(ex, tally)
                return
            raise
        except UpstreamError as exc:
            self.metrics.upstream_errors.labels(ex.adapter, exc.kind).inc()
            self.metrics.requests.labels(ex.endpoint, "5xx").inc()
            ex.status = 502
            ex.counted = True
            log.warning("upstream stream broke off for %s: %s", ex.adapter, exc)
            error = openai_error(f"upstream stream broke off: {exc}", "upstream_error", 502)
            link.disarm()
            # events held for their fingerprint go out first, as the engine sent them
            await send({"type": "http.response.body", "body": tally.release() + b"data: " + error + b"\n\n",
                        "more_body": False})
            return
        if not (done_delivered or link.connected):  # gone before the end was handed to it
            self._client_gone(ex)
            return
        self._stream_complete(ex, tally)

    def _stream_complete(self, ex: _Exchange, tally: StreamTally) -> None:
        ex.counted = True
        self.metrics.requests.labels(ex.endpoint, "2xx").inc()
        if not tally.complete:
            self.metrics.upstream_errors.labels(ex.adapter, "stream_broken").inc()
            return
        self._count(ex, [Output("".join(c.text), c.finish_reason, c.stop_reason, c.role)
                         for _, c in sorted(tally.choices.items())], tally.usage, tally.chat)
        if ex.ttft_s is not None:
            self.metrics.ttft.labels(ex.adapter).observe(ex.ttft_s)
        self.metrics.duration.labels(ex.adapter).observe(time.perf_counter() - ex.started)

    def _count(self, ex: _Exchange, outputs: list[Output], usage: dict, chat: bool) -> None:
        """Judge every choice, then update every counter in one synchronous step.

        Each choice is judged on its generated part (an echoed prompt left out); a completion
        request with ``echo`` and ``max_tokens: 0`` generated nothing and is counted as a scoring
        request only.
        """
        contract = self._adapter_names().contract(ex.adapter)
        json_contract = bool(contract and contract.expects_json)
        usage = usage if isinstance(usage, dict) else {}
        completion_tokens = usage.get("completion_tokens")
        m = self.metrics
        m.init_adapter(ex.adapter, json_contract)
        if ex.asked.scoring and not chat:
            m.scoring_requests.labels(ex.adapter).inc()
            if isinstance(completion_tokens, int):
                m.output_tokens.labels(ex.adapter).inc(completion_tokens)
                ex.completion_tokens = completion_tokens
            ex.finish = "scoring"
            return
        judged = judge_outputs(outputs, usage, chat, ex.asked, self._adapter_names(), ex.adapter,
                               ex.json_constrained)
        for j, constrained in judged:
            m.completions.labels(ex.adapter, j.finish.value).inc()
            if j.length_cause is not None:
                m.length_cutoffs.labels(ex.adapter, j.length_cause.value).inc()
            if j.json_result is not None:
                m.json_outputs.labels(ex.adapter, j.json_result.value).inc()
            if constrained is not None:
                m.constrained_outputs.labels(ex.adapter, constrained.value).inc()
        if isinstance(completion_tokens, int):
            m.output_tokens.labels(ex.adapter).inc(completion_tokens)
            ex.completion_tokens = completion_tokens
        if ex.live_outcome is not None and not ex.live_outcome.done():
            ex.live_outcome.set_result(live_outcome_of(judged))
        if judged:
            ex.finish = ",".join(j.finish.value for j, _ in judged)
            results = [j.json_result.value for j, _ in judged if j.json_result is not None]
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
