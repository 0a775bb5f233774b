"""The fields of a judged request that the proxy reads, read as the engine reads them.

The proxy relays and counts ``/v1/completions``, ``/v1/chat/completions`` and ``/invocations``
by a few fields of the request. vLLM reads booleans and integers leniently (``"true"`` and
``1`` are true, ``"0"`` is 0), so each field the proxy reads must be of the JSON type it reads
it as, or the request is refused (400 ``invalid_field``) before it reaches the engine:

- ``stream``, ``stream_options.include_usage``, ``stream_options.continuous_usage_stats`` and
  ``echo``: JSON booleans (or ``null``);
- with ``echo: true``: ``max_tokens`` a JSON integer and ``return_token_ids`` a JSON boolean
  (or ``null``).

Usage on streams: the proxy counts each stream's tokens from the engine's usage report, so a
stream whose client did not ask for usage is sent to the engine with
``stream_options.include_usage`` on (and ``continuous_usage_stats`` off, which vLLM ignores
without ``include_usage``); :class:`~loragate.core.sse.StreamTally` then hands the client the
stream vLLM would have sent it (the usage event dropped, the fingerprint that vLLM moves onto
it put back on each choice's last event).

Echo: with ``echo: true`` vLLM puts the prompt before a completion's text (and the last
message before a chat answer's content, when that message has the answer's role). The proxy
judges the generated part only (:func:`generated_part`). ``echo`` with ``max_tokens: 0`` (how
lm-eval scores log-likelihoods) generates nothing: the answer is the prompt with its
logprobs, counted as a scoring request, never as a completion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class FieldError(Exception):
    """A field the proxy reads is not of the type it reads it as (400 ``invalid_field``)."""


@dataclass(frozen=True, slots=True)
class Asked:
    """What a judged request asked for, as far as relaying and counting go."""

    stream: bool = False
    #: The client asked for usage in its stream (``stream_options.include_usage``).
    include_usage: bool = False
    #: ``response_format`` asked for JSON (``json_object`` or ``json_schema``).
    json_constrained: bool = False
    echo: bool = False
    #: ``echo`` with ``max_tokens: 0``: a completion request that only scores its prompt.
    scoring: bool = False
    #: A completion request's text prompts, in order (``None``: token ids, or no text prompt).
    prompts: tuple[str, ...] | None = None
    #: ``(role, content)`` of a chat request's last message (``None``: no usable last message).
    last_message: tuple[str, str] | None = None
    #: ``return_token_ids``: vLLM then echoes no prompt text.
    return_token_ids: bool = False


def _boolean(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise FieldError(f"'{name}' must be a JSON boolean")
    return value


def _message_content(message: Any) -> tuple[str, str] | None:
    """``(role, text)`` of a chat message as vLLM echoes it (text parts joined by a newline)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        return None
    content = message.get("content")
    if content is None:
        return message["role"], ""
    if isinstance(content, str):
        return message["role"], content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return message["role"], "\n".join(p["text"] for p in content)
    return None


def read_fields(request: dict) -> Asked:
    """What ``request`` asks for; :class:`FieldError` when a field the proxy reads is mistyped."""
    stream = _boolean(request.get("stream"), "stream")
    opts = request.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise FieldError("'stream_options' must be an object")
    include_usage = _boolean(opts.get("include_usage"), "stream_options.include_usage") if opts else False
    if opts:
        _boolean(opts.get("continuous_usage_stats"), "stream_options.continuous_usage_stats")
    echo = _boolean(request.get("echo"), "echo")
    fmt = request.get("response_format")
    json_constrained = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
    if not echo:
        return Asked(stream=stream, include_usage=include_usage, json_constrained=json_constrained)
    max_tokens = request.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
        raise FieldError("'max_tokens' must be a JSON integer")
    return_token_ids = _boolean(request.get("return_token_ids"), "return_token_ids")
    prompt = request.get("prompt")
    prompts: tuple[str, ...] | None = None
    if isinstance(prompt, str):
        prompts = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    messages = request.get("messages")
    last = _message_content(messages[-1]) if isinstance(messages, list) and messages else None
    return Asked(stream=stream, include_usage=include_usage, json_constrained=json_constrained, echo=True,
                 scoring=max_tokens == 0, prompts=prompts, last_message=last, return_token_ids=return_token_ids)


def upstream_body(request: dict, asked: Asked) -> bytes | None:
    """The body to send the engine instead of the client's, or ``None`` to send the client's.

    A stream whose client did not ask for usage gets ``include_usage`` on (the proxy counts
    tokens from it) and ``continuous_usage_stats`` off (vLLM ignores it without
    ``include_usage``, so the client asked for nothing by it); nothing else changes.
    """
    if not asked.stream or asked.include_usage:
        return None
    opts = dict(request.get("stream_options") or {})
    opts["include_usage"] = True
    if "continuous_usage_stats" in opts:
        opts["continuous_usage_stats"] = False
    return json.dumps({**request, "stream_options": opts}).encode()


def echoed_prefix(asked: Asked, index: int, choices: int, chat: bool, role: str | None) -> str | None:
    """The text vLLM put before choice ``index``'s generated text: ``""`` when none, ``None``
    when the proxy cannot tell (a token-id prompt echoed as text it does not have).

    ``choices`` is how many choices the answer has (for a completion: prompts x ``n``, choice
    ``i`` belonging to prompt ``i // n``); ``role`` is a chat answer's role.
    """
    if not asked.echo:
        return ""
    if chat:
        if asked.last_message is None:
            return None
        last_role, content = asked.last_message
        return content if role is not None and last_role == role else ""
    if asked.return_token_ids:
        return ""
    prompts = asked.prompts
    if prompts is None or choices % len(prompts):
        return None
    return prompts[index // (choices // len(prompts))]


def generated_part(text: str, prefix: str | None) -> str | None:
    """``text`` without the echoed ``prefix``; ``None`` when it cannot be told apart."""
    if prefix is None or not text.startswith(prefix):
        return None
    return text[len(prefix):]
