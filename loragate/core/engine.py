"""What the gate asks an OpenAI-compatible vLLM endpoint (directly or through the proxy).

- ``GET /v1/models``: the served base model (``root``: where its weights are, ``max_model_len``)
  and the adapters (``parent``: the base they run on, ``root``: the adapter folder).
- ``POST /tokenize``: prompt lengths in the engine's own tokens (vLLM's extension).
- ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``: vLLM's runtime LoRA API. Through
  the loragate proxy these need its admin key (sent as ``Authorization: Bearer``).

Every failure is a :class:`EndpointError` whose message says what was asked and what came back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import httpx

from loragate.core.errors import GateError

#: Seconds for one metadata request (models, tokenize, load).
METADATA_TIMEOUT_S = 30.0
#: Environment variable with the client API key for the endpoint (the proxy's client keys).
API_KEY_ENV = "LORAGATE_API_KEY"
#: Environment variable with the proxy's admin key (the one ``loragate proxy`` reads too).
ADMIN_KEY_ENV = "LORAGATE_PROXY_ADMIN_KEY"


class EndpointError(GateError):
    """The endpoint is unreachable or answered something unusable."""


def normalize_endpoint(url: str) -> str:
    """``http://host:port`` from ``http://host:port``, ``.../`` or ``.../v1``."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise EndpointError(f"endpoint {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
    return url


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass(frozen=True)
class ServedModel:
    """One entry of ``/v1/models``."""

    id: str
    root: str | None
    parent: str | None
    max_model_len: int | None

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


@dataclass(frozen=True)
class EngineModels:
    """The engine's ``/v1/models`` answer, read once per gate run."""

    endpoint: str
    models: tuple[ServedModel, ...] = field(default_factory=tuple)

    def get(self, name: str) -> ServedModel | None:
        return next((m for m in self.models if m.id == name), None)

    @property
    def bases(self) -> tuple[ServedModel, ...]:
        return tuple(m for m in self.models if not m.is_adapter)

    @property
    def adapters(self) -> tuple[ServedModel, ...]:
        return tuple(m for m in self.models if m.is_adapter)

    def base_for(self, adapter: str) -> ServedModel | None:
        """The base model an adapter runs on (its ``parent``), else the only base served."""
        served = self.get(adapter)
        if served is not None and served.parent:
            return self.get(served.parent)
        return self.bases[0] if len(self.bases) == 1 else None

    def max_model_len(self, name: str) -> int | None:
        """Context limit of ``name``; an adapter inherits its base's."""
        served = self.get(name)
        if served is None:
            return None
        if served.max_model_len:
            return served.max_model_len
        base = self.get(served.parent) if served.parent else None
        return base.max_model_len if base else None


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def fetch_models(endpoint: str, api_key: str | None = None, timeout_s: float = METADATA_TIMEOUT_S) -> EngineModels:
    """Read ``/v1/models``; an endpoint that is down or answers garbage is an :class:`EndpointError`."""
    url = f"{endpoint}/v1/models"
    try:
        resp = httpx.get(url, headers=auth_headers(api_key), timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise EndpointError(f"endpoint unreachable: GET {url} failed ({_describe(exc)})") from None
    if resp.status_code != 200:
        raise EndpointError(f"endpoint answered GET {url} with HTTP {resp.status_code}: {resp.text[:300]}")
    try:
        return parse_models(endpoint, resp.json()["data"])
    except (ValueError, KeyError, TypeError) as exc:
        raise EndpointError(f"GET {url} did not answer an OpenAI model list ({_describe(exc)})") from None


def parse_models(endpoint: str, data: Any, *, skip_malformed: bool = False) -> EngineModels:
    """The ``data`` list of a ``/v1/models`` answer as :class:`EngineModels`. A malformed entry
    raises (ValueError, KeyError, TypeError), or is left out with ``skip_malformed``."""
    models = []
    for entry in data:
        try:
            models.append(_served_model(entry))
        except (ValueError, KeyError, TypeError):
            if not skip_malformed:
                raise
    return EngineModels(endpoint=endpoint, models=tuple(models))


def _served_model(entry: Any) -> ServedModel:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        raise TypeError("a model entry needs a string id")
    parent, root, max_len = entry.get("parent"), entry.get("root"), entry.get("max_model_len")
    if parent is not None and not isinstance(parent, str):
        raise TypeError(f"model {entry['id']!r}: parent {parent!r} is not a string")
    return ServedModel(id=entry["id"], root=root if isinstance(root, str) else None, parent=parent,
                       max_model_len=int(max_len) if max_len else None)


def tokenize_count(client: httpx.Client, endpoint: str, model: str, prompt: str | None = None, *,
                   messages: list[dict[str, Any]] | None = None) -> int:
    """Tokens of ``prompt`` for ``model`` as the engine counts them (BOS included); or of the
    conversation ``messages`` with the engine's chat template applied and the assistant turn
    opened (what ``/v1/chat/completions`` sends the model)."""
    url = f"{endpoint}/tokenize"
    body: dict[str, Any] = {"model": model}
    if messages is not None:
        body.update(messages=messages, add_generation_prompt=True)
    else:
        body["prompt"] = prompt
    try:
        resp = client.post(url, json=body, timeout=METADATA_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise EndpointError(f"POST {url} failed ({_describe(exc)})") from None
    if resp.status_code != 200:
        raise EndpointError(f"POST {url} answered HTTP {resp.status_code}: {resp.text[:300]} "
                            "(the gate needs vLLM's /tokenize to size long-context probes)")
    try:
        return int(resp.json()["count"])
    except (ValueError, KeyError, TypeError) as exc:
        raise EndpointError(f"POST {url}: unexpected answer ({_describe(exc)})") from None


def load_adapter(url: str, name: str, path: str, *, admin_key: str | None = None,
                 inplace: bool = False) -> None:
    """Load ``name`` from ``path`` (as the engine sees it) through vLLM's runtime LoRA API."""
    body: dict[str, Any] = {"lora_name": name, "lora_path": path}
    if inplace:
        body["load_inplace"] = True
    target = f"{url}/v1/load_lora_adapter"
    try:
        resp = httpx.post(target, json=body, headers=auth_headers(admin_key), timeout=120.0)
    except httpx.HTTPError as exc:
        raise EndpointError(f"loading adapter {name!r}: POST {target} failed ({_describe(exc)})") from None
    if resp.status_code != 200:
        hint = ""
        if resp.status_code in (401, 403):
            hint = (f" (through the proxy this needs its admin key: --admin-key or ${ADMIN_KEY_ENV}, which "
                    "`loragate status` shows for the local stack; or load straight into the engine with "
                    "--engine-url set to the engine's own URL)")
        raise EndpointError(f"loading adapter {name!r} from {path}: HTTP {resp.status_code}: "
                            f"{resp.text[:300]}{hint}")


def unload_adapter(url: str, name: str, *, admin_key: str | None = None) -> None:
    target = f"{url}/v1/unload_lora_adapter"
    try:
        resp = httpx.post(target, json={"lora_name": name}, headers=auth_headers(admin_key), timeout=60.0)
    except httpx.HTTPError as exc:
        raise EndpointError(f"unloading adapter {name!r}: POST {target} failed ({_describe(exc)})") from None
    if resp.status_code != 200:
        raise EndpointError(f"unloading adapter {name!r}: HTTP {resp.status_code}: {resp.text[:300]}")


def key_from_env(value: str | None, env: str) -> str | None:
    """An explicit key, else the environment's, else none."""
    return value if value else (os.environ.get(env) or None)
