"""Which engine routes the proxy forwards, and as what: one table, decided on the engine's route.

The proxy forwards a request only when its route (the path as the engine will route it, see
:mod:`loragate.server.target`) and method are in :data:`ROUTES`; anything else gets a 404 from
the proxy and never reaches the engine. So a route a new vLLM release adds, generating or
not, is refused until it is classified here: an unknown generating endpoint can never be
forwarded uncounted. At start-up the proxy reads the engine's OpenAPI document and logs every
route the engine serves that this table refuses (:func:`unclassified`);
``tests/test_hardening.py`` fails when the served vLLM has a route that is not in the table.

Kinds (:class:`Kind`):

- ``judged``: answers are judged per choice and counted per adapter (completions, chat
  completions; ``/invocations`` is judged as what its body asks for);
- ``generating``: the engine generates, but the proxy does not judge this answer format yet
  (the Responses and Anthropic Messages APIs): forwarded, counted per adapter in
  ``loragate_unjudged_generations_total``;
- ``admin``: changes what the engine serves: only with the admin key;
- ``read``: no generation (model list, tokenizer, version, load): forwarded with a client key;
- ``refused``: known to the engine and deliberately not served through the proxy.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable


class Kind(str, enum.Enum):
    JUDGED = "judged"
    GENERATING = "generating"
    ADMIN = "admin"
    READ = "read"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Route:
    """One engine route as the proxy treats it."""

    kind: Kind
    #: The ``endpoint`` metric label of requests to it (:data:`loragate.server.metrics.ENDPOINTS`).
    endpoint: str
    #: Methods forwarded (``HEAD`` goes with ``GET``, as the engine's server routes it).
    methods: frozenset[str]
    #: For loading endpoints: the body field naming the adapter folder (checked by the proxy).
    adapter_path_field: str | None = None


def _route(kind: Kind, endpoint: str, *methods: str, adapter_path_field: str | None = None) -> Route:
    allowed = set(methods) | ({"HEAD"} if "GET" in methods else set())
    return Route(kind, endpoint, frozenset(allowed), adapter_path_field)


#: Exact routes. vLLM 0.32's OpenAI-compatible server, ``vllm serve`` as the chart runs it.
ROUTES: dict[str, Route] = {
    "/v1/completions": _route(Kind.JUDGED, "completions", "POST"),
    "/v1/chat/completions": _route(Kind.JUDGED, "chat_completions", "POST"),
    # SageMaker-style: a completion or a chat completion depending on the body
    "/invocations": _route(Kind.JUDGED, "other", "POST"),
    "/v1/responses": _route(Kind.GENERATING, "responses", "POST"),
    "/v1/messages": _route(Kind.GENERATING, "messages", "POST"),
    "/v1/load_lora_adapter": _route(Kind.ADMIN, "admin", "POST", adapter_path_field="lora_path"),
    "/v1/unload_lora_adapter": _route(Kind.ADMIN, "admin", "POST"),
    "/adapters": _route(Kind.ADMIN, "admin", "POST", adapter_path_field="src"),
    "/scale_elastic_ep": _route(Kind.ADMIN, "admin", "POST"),
    "/is_scaling_elastic_ep": _route(Kind.ADMIN, "admin", "POST"),
    "/kv_event_sources": _route(Kind.ADMIN, "admin", "GET"),
    "/v1/models": _route(Kind.READ, "models", "GET"),
    "/tokenize": _route(Kind.READ, "other", "POST"),
    "/detokenize": _route(Kind.READ, "other", "POST"),
    "/v1/messages/count_tokens": _route(Kind.READ, "other", "POST"),
    "/version": _route(Kind.READ, "other", "GET"),
    "/load": _route(Kind.READ, "other", "GET"),
    "/ping": _route(Kind.READ, "other", "GET", "POST"),
    "/openapi.json": _route(Kind.READ, "other", "GET"),
    # generating endpoints whose answers the proxy cannot judge or count per choice yet
    "/v1/chat/completions/batch": _route(Kind.REFUSED, "other"),
    "/generative_scoring": _route(Kind.REFUSED, "other"),
    "/v1/systemone": _route(Kind.REFUSED, "other"),
    # the engine's own health and metrics: the proxy answers /health, /ready and /metrics itself
    "/metrics": _route(Kind.REFUSED, "other"),
    "/health": _route(Kind.REFUSED, "other"),
}

#: Routes with one path parameter: (pattern, route). A parameter never holds ``/``.
PATTERN_ROUTES: tuple[tuple[re.Pattern[str], Route], ...] = (
    (re.compile(r"/adapters/[^/]+"), _route(Kind.ADMIN, "admin", "DELETE")),
    (re.compile(r"/v1/responses/[^/]+"), _route(Kind.READ, "other", "GET")),
    (re.compile(r"/v1/responses/[^/]+/cancel"), _route(Kind.READ, "other", "POST")),
)

#: What an unknown route is: refused.
UNKNOWN = Route(Kind.REFUSED, "other", frozenset())


def classify(route: str) -> Route:
    """How the proxy treats the engine route ``route`` (the decoded path the engine routes on).

    A trailing ``/`` is looked up without it: the engine's server answers such a path with a
    redirect to the route, and the proxy guards it like the route itself.
    """
    found = ROUTES.get(route)
    if found is None and len(route) > 1 and route.endswith("/"):
        found = ROUTES.get(route.rstrip("/"))
    if found is not None:
        return found
    bare = route.rstrip("/") or "/"
    for pattern, candidate in PATTERN_ROUTES:
        if pattern.fullmatch(bare):
            return candidate
    return UNKNOWN


def _openapi_path_matches(path: str) -> str:
    """An OpenAPI path template as a sample route (``{name}`` filled)."""
    return re.sub(r"\{[^}]+\}", "x", path)


def unclassified(openapi_paths: Iterable[tuple[str, str]]) -> list[str]:
    """``"METHOD path"`` for every (path template, method) of an engine's OpenAPI document that
    :func:`classify` neither forwards nor lists as deliberately refused."""
    missing = []
    for path, method in openapi_paths:
        route = classify(_openapi_path_matches(path))
        if route is UNKNOWN or (route.kind is not Kind.REFUSED and method.upper() not in route.methods):
            missing.append(f"{method.upper()} {path}")
    return sorted(missing)
