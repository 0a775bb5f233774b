"""A scripted stand-in for vLLM's OpenAI API, for the gate's fail-closed tests.

It serves the demo build's real files (``/v1/models`` names the real base and adapter
folders, so the static checks read real weights) and answers completions as told:

- ``mode="good"``: a schema-valid poster layout, ``finish_reason: stop``;
- ``mode="runaway"``: the same layout followed by more text, ``finish_reason: length`` at ``max_tokens``;
- ``mode="slow"``: like ``good`` after ``delay_s`` seconds (so a test can interrupt the suite).

Every completion request body is recorded in ``requests`` so tests can assert what the gate
sent; runtime LoRA load/unload calls (vLLM's ``/v1/load_lora_adapter`` API) change the served
adapters and are recorded in ``admin_calls``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LAYOUT = {"title": "Fake", "authors": ["A. Person"], "panels": [{"heading": "Method", "column": 1}], "theme": "light"}


@dataclass
class FakeEngine:
    base_model: str
    base_root: Path
    adapters: dict[str, Path]
    max_model_len: int = 4096
    mode: str = "good"
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    admin_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def models(self) -> dict[str, Any]:
        data = [{"id": self.base_model, "object": "model", "root": str(self.base_root), "parent": None,
                 "max_model_len": self.max_model_len}]
        data += [{"id": name, "object": "model", "root": str(path), "parent": self.base_model, "max_model_len": None}
                 for name, path in self.adapters.items()]
        return {"object": "list", "data": data}

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.mode == "slow":
            time.sleep(self.delay_s)
        text = json.dumps(LAYOUT)
        prompt_tokens = len(body["prompt"]) // 4 + 1
        if self.mode == "runaway":
            text += " ### Layout:" * 40
            finish, completion_tokens = "length", body["max_tokens"]
        else:
            finish, completion_tokens = "stop", 40
        return {"id": "cmpl-fake", "object": "text_completion", "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def start(self) -> "FakeEngine":
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, doc: Any) -> None:
                raw = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, engine.models())
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if self.path == "/tokenize":
                    self._send(200, {"count": len(body["prompt"]) // 4 + 1, "max_model_len": engine.max_model_len})
                elif self.path == "/v1/load_lora_adapter":
                    engine.admin_calls.append(("load", body))
                    if body["lora_name"] in engine.adapters:
                        self._send(400, {"error": {"message": "already loaded"}})
                    else:
                        engine.adapters[body["lora_name"]] = Path(body["lora_path"])
                        self._send(200, {"ok": True})
                elif self.path == "/v1/unload_lora_adapter":
                    engine.admin_calls.append(("unload", body))
                    if engine.adapters.pop(body["lora_name"], None) is None:
                        self._send(404, {"error": {"message": "not loaded"}})
                    else:
                        self._send(200, {"ok": True})
                elif self.path == "/v1/completions":
                    engine.requests.append(body)
                    known = {engine.base_model, *engine.adapters}
                    if body.get("model") not in known:
                        self._send(404, {"error": {"message": f"model {body.get('model')} does not exist"}})
                    else:
                        self._send(200, engine.completion(body))
                else:
                    self._send(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
