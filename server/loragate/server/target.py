"""The request target: what the proxy checks is exactly what the engine routes.

A client's request line carries a raw target (``/v1/completions?x=1``). The engine's server
(uvicorn, as vLLM runs it) routes on that target's path *percent-decoded once*
(``urllib.parse.unquote``), and nothing else: no dot-segment or slash normalisation. So:

- the proxy sends the engine the client's **raw** target, byte for byte, never a decoded copy
  (a decoded ``%3F`` or ``%0D%0A`` written into a request line would end the path early or start
  a second request);
- the proxy decides every access and counting question on :attr:`RequestTarget.route`, the
  path decoded exactly as the engine's server decodes it, so the route the proxy classified and
  the route the engine runs are the same string;
- anything that is not a plain origin-form target is refused (:class:`TargetError`, a 400):
  bytes outside RFC 3986's path and query characters, malformed ``%`` escapes, and a decoded path
  holding what no route of an OpenAI-compatible server holds and what some server or
  intermediary would read differently: ``?``, ``#``, ``%``, a space, a control character, a
  non-ASCII character, an empty segment (``//``) or a dot segment (``/./``, ``/../``).

:func:`parse_target` is total: any bytes give a :class:`RequestTarget` or a :class:`TargetError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["RequestTarget", "TargetError", "parse_target"]

_UNRESERVED_AND_SUB_DELIMS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;="
#: RFC 3986 ``path-abempty`` bytes: pchar and ``/`` (``%`` starts an escape, checked apart).
PATH_BYTES = frozenset(_UNRESERVED_AND_SUB_DELIMS + b":@/%")
#: RFC 3986 ``query`` bytes: pchar, ``/`` and ``?``.
QUERY_BYTES = frozenset(PATH_BYTES | {ord("?")})
#: Longest raw target accepted (vLLM's routes are short; a long query is a client error).
MAX_TARGET_BYTES = 8192

_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
#: A whole valid raw path and query (the fast check; :func:`_check_bytes` says what is wrong).
_VALID_PATH = re.compile(rb"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")
_VALID_QUERY = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
#: A decoded route whose every character no server reads differently, with no dot segment.
_PLAIN_ROUTE = re.compile(r"/(?:[!-~](?<![?#%]))*")
_DOT_OR_EMPTY_SEGMENT = re.compile(r"//|/\.\.?(?:/|$)")
#: Characters a decoded route may hold: visible ASCII less ``?``, ``#`` and ``%``.
_ROUTE_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"?", "#", "%"}


class TargetError(ValueError):
    """The request target is refused; the message says why (it goes to the client)."""


@dataclass(frozen=True, slots=True)
class RequestTarget:
    """A checked request target."""

    #: The target as the client sent it and as the engine receives it (origin-form).
    raw: bytes
    #: The path as the engine routes it: the raw path percent-decoded once.
    route: str
    #: The raw query, without its ``?`` (``b""`` when there is none).
    query: bytes


def _check_bytes(part: bytes, allowed: frozenset[int], what: str) -> None:
    for byte in part:
        if byte not in allowed:
            shown = chr(byte) if 0x21 <= byte < 0x7F else f"0x{byte:02x}"
            raise TargetError(f"the request target's {what} holds {shown!r}, which RFC 3986 does not allow there")
    if b"%" in part and _BAD_ESCAPE.search(part):
        raise TargetError(f"the request target's {what} holds a '%' that does not start a %XX escape")


def parse_target(raw: bytes) -> RequestTarget:
    """Check a raw request target and say how the engine will route it; see the module docstring."""
    if not raw.startswith(b"/"):
        raise TargetError("the request target must be a path starting with '/' (origin-form)")
    if len(raw) > MAX_TARGET_BYTES:
        raise TargetError(f"the request target is longer than {MAX_TARGET_BYTES} bytes")
    path, sep, query = raw.partition(b"?")
    if not _VALID_PATH.fullmatch(path):
        _check_bytes(path, PATH_BYTES, "path")  # raises, saying what is wrong
    if sep and not _VALID_QUERY.fullmatch(query):
        _check_bytes(query, QUERY_BYTES, "query")
    text = path.decode("ascii")  # every byte was checked to be ASCII
    route = unquote(text) if "%" in text else text  # exactly what uvicorn puts in scope["path"]
    if not _PLAIN_ROUTE.fullmatch(route):
        for char in route:
            if char not in _ROUTE_CHARS:
                raise TargetError(f"the request path decodes to {char!r}, which no route holds")
    if _DOT_OR_EMPTY_SEGMENT.search(route):
        raise TargetError("the request path has an empty or dot segment")
    return RequestTarget(raw=raw, route=route, query=query)
