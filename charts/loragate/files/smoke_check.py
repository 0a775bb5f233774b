"""The chart's `helm test`: one completion per promoted adapter through the proxy's Service.

Run by the test pod in the loragate image (``python smoke_check.py /etc/loragate-smoke/smoke.json``);
tests/test_chart_local.py runs the same file against the chart's command lines run locally.

The configuration (rendered by the chart from ``adapters.promoted`` and ``smokeTest``)::

    {"base_url": "http://<release>:8000", "base_model": "...", "timeout_s": 300,
     "adapters": [{"name": "...", "api": "completions", "output": "json", "prompt": "...", "max_tokens": 256}]}

Checks, in order; any failure exits 1, naming the adapter and what it did:

1. ``GET /v1/models`` lists the base model and every promoted adapter (each was loaded);
2. per adapter, a greedy ``POST /v1/completions`` (``api: chat``: ``POST /v1/chat/completions``,
   the prompt as the user turn, or as the whole conversation when it is a JSON array of
   messages) returns 200 and finishes with ``stop`` (the adapter emitted EOS before
   ``max_tokens``); for ``output: json`` the text (the message's content) must parse.
   Stop and JSON are judged by loragate's one judging (:func:`loragate.core.judging.judge_completion`),
   the same definitions the proxy's metrics and the gate use.

``LORAGATE_SMOKE_API_KEY`` (the proxy's comma-separated client keys; the first is used) is
sent as a Bearer token when set. ``--base-url`` overrides the configured URL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from loragate.core.judging import judge_completion


class SmokeFailure(Exception):
    """A check failed; the message says which and why."""


def _request(method: str, url: str, key: str, timeout_s: float, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read().decode())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise SmokeFailure(f"{method} {url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise SmokeFailure(f"{method} {url} failed: {getattr(exc, 'reason', exc)}") from None
    except ValueError:
        raise SmokeFailure(f"{method} {url} did not answer JSON") from None


def chat_messages(prompt: str) -> list[dict[str, Any]]:
    """A chat adapter's smoke conversation: the prompt when it is a JSON array of messages (what
    the gate records), else one user turn holding it."""
    if prompt.lstrip().startswith("["):
        try:
            messages = json.loads(prompt)
        except ValueError:
            messages = None
        if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
            return messages
    return [{"role": "user", "content": prompt}]


def check_models(cfg: dict[str, Any], key: str) -> None:
    """The engine serves the base model and every promoted adapter."""
    listing = _request("GET", f"{cfg['base_url']}/v1/models", key, 30.0)
    served = {m.get("id") for m in listing.get("data", [])}
    wanted = [cfg["base_model"], *(a["name"] for a in cfg["adapters"])]
    missing = [name for name in wanted if name not in served]
    if missing:
        raise SmokeFailure(f"/v1/models does not list {', '.join(missing)} (served: {', '.join(sorted(map(str, served)))})")
    print(f"PASS models: {', '.join(wanted)} served", flush=True)


def check_adapter(cfg: dict[str, Any], adapter: dict[str, Any], key: str) -> str:
    """One greedy completion of ``adapter``; returns its summary line, raises on failure."""
    name = adapter["name"]
    expects_json = adapter.get("output") == "json"
    t0 = time.monotonic()
    chat = adapter.get("api") == "chat"
    body: dict[str, Any] = {"model": name, "max_tokens": int(adapter["max_tokens"]), "temperature": 0}
    if chat:
        body["messages"] = chat_messages(adapter["prompt"])
    else:
        body["prompt"] = adapter["prompt"]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    answer = _request("POST", f"{cfg['base_url']}{path}", key, float(cfg.get("timeout_s", 300)), body)
    seconds = time.monotonic() - t0
    try:
        choice = answer["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise SmokeFailure(f"{name}: the answer has no choices: {json.dumps(answer)[:300]}") from None
    usage = answer.get("usage") or {}
    text = ((choice.get("message") or {}).get("content") if chat else choice.get("text")) or ""
    judged = judge_completion(
        text, choice.get("finish_reason"), expects_json=expects_json,
        prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
    )
    facts = f"finish_reason={choice.get('finish_reason')}"
    if expects_json:
        facts += f", json={judged.json_result.value if judged.json_result else None}"
    facts += f", {usage.get('completion_tokens', '?')} tokens, {seconds:.1f} s"
    problems = []
    if not judged.stopped:
        problems.append(f"did not stop within max_tokens={adapter['max_tokens']}")
    if expects_json and not judged.json_valid:
        problems.append("its output does not parse as JSON")
    if problems:
        raise SmokeFailure(f"{name}: {' and '.join(problems)} ({facts}); output starts: {(choice.get('text') or '')[:120]!r}")
    return f"PASS {name}: {facts}"


def run(cfg: dict[str, Any], key: str) -> int:
    failures = 0
    try:
        check_models(cfg, key)
    except SmokeFailure as exc:
        print(f"FAIL {exc}", flush=True)
        return 1
    if not cfg["adapters"]:
        print("no promoted adapters (adapters.promoted is empty): only the base model was checked", flush=True)
    for adapter in cfg["adapters"]:
        try:
            print(check_adapter(cfg, adapter, key), flush=True)
        except SmokeFailure as exc:
            failures += 1
            print(f"FAIL {exc}", flush=True)
    total = len(cfg["adapters"])
    print(f"smoke check: {total - failures}/{total} promoted adapters passed", flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="smoke.json rendered by the chart")
    parser.add_argument("--base-url", help="override the configured base URL")
    args = parser.parse_args(argv)
    try:
        with open(args.config, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"FAIL cannot read {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.base_url:
        cfg["base_url"] = args.base_url
    cfg["base_url"] = cfg["base_url"].rstrip("/")
    keys = [k.strip() for k in os.environ.get("LORAGATE_SMOKE_API_KEY", "").split(",") if k.strip()]
    return run(cfg, keys[0] if keys else "")


if __name__ == "__main__":
    sys.exit(main())
