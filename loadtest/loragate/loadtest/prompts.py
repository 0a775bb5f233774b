"""The load test's prompts and the request it sends for each.

Prompts come from a JSONL file, one object a line:

- ``{"input": "..."}``: the adapter's raw input, rendered with the contract's
  ``prompt_template`` (:meth:`loragate.core.contracts.Contract.render_prompt`): the prompt exactly
  as the adapter saw it in training. Used whenever a line has ``input`` and a contract is given.
- ``{"prompt": "..."}``: an already rendered prompt, sent as it is.
- ``{"messages": [...]}``: for a chat adapter (contract ``api: chat``), the conversation up to the
  turn it answers, sent as it is to ``/v1/chat/completions``; an ``input`` line becomes the
  contract's system and user turns.

A chat prompt travels as its conversation's JSON array (one string per request, like a
completion prompt): :func:`completion_body` sends it as ``messages``.

The demo's ``heldout.jsonl`` holds both (``prompt`` == ``render_prompt(input)`` for every line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from loragate.core.contracts import Contract
from loragate.core.errors import LoragateError
from loragate.core.jsonl import read_objects

#: The completion endpoint the load test streams, relative to the server's root.
COMPLETIONS_PATH = "/v1/completions"
#: The endpoint it streams for a chat adapter.
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"


def request_path(api: str) -> str:
    """Where the load test streams requests for an adapter served through ``api``."""
    return CHAT_COMPLETIONS_PATH if api == "chat" else COMPLETIONS_PATH
#: Body keys the load test must never send: they force a length and hide an adapter that
#: cannot stop (common LLM load tools set them to fix the output length).
FORBIDDEN_BODY_KEYS = frozenset({"ignore_eos", "min_tokens"})


class LoadTestError(LoragateError):
    """The load test could not run (bad input, locust failed); never a pass."""


def load_prompts(path: str | os.PathLike[str], contract: Contract | None = None,
                 api: str | None = None) -> list[str]:
    """The prompts of a JSONL file (see the module docstring), in file order. ``api`` (default:
    the contract's, else completions) says which lines a file may hold."""
    source = Path(path)
    chat = (api or (contract.api if contract is not None else "completions")) == "chat"
    prompts: list[str] = []
    for number, row in read_objects(source, what="prompts file", error=LoadTestError,
                                    expected="an object with 'input', 'prompt' or 'messages'"):
        raw_input, prompt, messages = row.get("input"), row.get("prompt"), row.get("messages")
        if chat:
            if isinstance(messages, list) and messages:
                prompts.append(json.dumps(messages, ensure_ascii=False))
            elif contract is not None and isinstance(raw_input, str) and raw_input:
                prompts.append(json.dumps(contract.render_messages(raw_input), ensure_ascii=False))
            else:
                raise LoadTestError(f"{source}:{number}: a chat adapter's line needs 'messages' (or 'input' "
                                    "with the adapter's contract)")
        elif contract is not None and isinstance(raw_input, str) and raw_input:
            prompts.append(contract.render_prompt(raw_input))
        elif isinstance(prompt, str) and prompt:
            prompts.append(prompt)
        elif isinstance(raw_input, str) and raw_input:
            raise LoadTestError(
                f"{source}:{number}: has only 'input'; give the adapter's contract to render it")
        else:
            raise LoadTestError(f"{source}:{number}: expected a non-empty string 'input' or 'prompt'")
    if not prompts:
        raise LoadTestError(f"prompts file {source} holds no prompts")
    return prompts


def write_prompts(prompts: Sequence[str], path: Path, api: str = "completions") -> Path:
    """Write rendered prompts as JSONL for the locust process: ``{"prompt": ...}`` lines, or
    ``{"messages": [...]}`` lines for a chat adapter."""
    if not prompts:
        raise LoadTestError("no prompts to send")
    with path.open("w", encoding="utf-8") as out:
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt:
                raise LoadTestError(f"every prompt must be a non-empty string, got {prompt!r:.80}")
            line = {"messages": json.loads(prompt)} if api == "chat" else {"prompt": prompt}
            out.write(json.dumps(line) + "\n")
    return path


def completion_body(adapter: str, prompt: str, max_tokens: int, temperature: float,
                    api: str = "completions") -> dict[str, Any]:
    """The streamed ``/v1/completions`` request for one prompt (``/v1/chat/completions`` with
    the prompt's conversation as ``messages`` for ``api="chat"``).

    Asks for the usage report on the stream (output tokens, as ``vllm bench serve`` does) and
    never sets ``ignore_eos`` or ``min_tokens``: the adapter decides when it stops.
    """
    body: dict[str, Any] = {"model": adapter}
    if api == "chat":
        body["messages"] = json.loads(prompt)
    else:
        body["prompt"] = prompt
    body.update({
        "max_tokens": int(max_tokens),
        "temperature": float(temperature),
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    assert not FORBIDDEN_BODY_KEYS & body.keys()
    return body


def base_url(endpoint: str) -> str:
    """The server root of an endpoint given as ``http://host:port`` or ``http://host:port/v1``."""
    url = endpoint.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise LoadTestError(f"endpoint must be an http(s) URL, got {endpoint!r}")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url
