"""The proxy's configuration: one dataclass, read from a YAML file and ``LORAGATE_PROXY_*`` variables.

Precedence, lowest first: the defaults below, the file given with ``--config``, environment
variables, command-line flags. Every field:

============================  ==============================  ===============================================
field                         environment variable            meaning (default)
============================  ==============================  ===============================================
``upstream``                  ``LORAGATE_PROXY_UPSTREAM``     base URL of the OpenAI-compatible engine
``contracts``                 ``LORAGATE_PROXY_CONTRACTS``    adapters file (contracts) to judge outputs by
``host`` / ``port``           ``LORAGATE_PROXY_HOST``/``PORT`` where the proxy listens (127.0.0.1:8000)
``max_body_bytes``            ``LORAGATE_PROXY_MAX_BODY_BYTES`` request bodies above it get 413 (8 MiB)
``body_timeout_s``            ``LORAGATE_PROXY_BODY_TIMEOUT_S`` a body not received within it gets 408 (30)
``upstream_timeout_s``        ``LORAGATE_PROXY_UPSTREAM_TIMEOUT_S`` read timeout towards the engine (600)
``head_timeout_s``            ``LORAGATE_PROXY_HEAD_TIMEOUT_S`` a request head not received within it: 408,
                                                              or a silent close when nothing came (10)
``max_head_bytes``            ``LORAGATE_PROXY_MAX_HEAD_BYTES`` request line + headers above it get 431 (64 KiB)
``max_headers``               ``LORAGATE_PROXY_MAX_HEADERS``  more header fields than this get 431 (100)
``max_connections``           ``LORAGATE_PROXY_MAX_CONNECTIONS`` client connections at once; beyond it the one
                                                              idle longest is closed, or 503 (2048)
``api_keys``                  ``LORAGATE_PROXY_API_KEYS``     comma-separated client keys, needed on every
                                                              engine path; empty: no auth
``admin_key``                 ``LORAGATE_PROXY_ADMIN_KEY``    key for the adapter endpoints (/v1/load_lora_adapter,
                                                              unload, /adapters) and /scale_elastic_ep; empty:
                                                              those endpoints are refused
``public_metrics``            ``LORAGATE_PROXY_PUBLIC_METRICS`` /metrics without a key (true)
``log_requests``              ``LORAGATE_PROXY_LOG_REQUESTS`` one JSON log line per request (true)
``shadows``                   ``LORAGATE_PROXY_SHADOWS``      candidate adapters shadowing live ones: a list of
                                                              ``{live, candidate, share, max_in_flight}``
                                                              (the variable: that list as JSON); none by default
``promoted_set``              ``LORAGATE_PROXY_PROMOTED_SET`` a promoted-set file (loragate.core.promoted_set) the
                                                              proxy applies to the engine at run time and
                                                              reports on /promoted (none: off)
``promoted_poll_s``           ``LORAGATE_PROXY_PROMOTED_POLL_S`` seconds between reads of that file (5)
``promoted_retry_s``          ``LORAGATE_PROXY_PROMOTED_RETRY_S`` first retry delay of a failed load or unload,
                                                              doubling on each failure (5)
``promoted_retry_max_s``      ``LORAGATE_PROXY_PROMOTED_RETRY_MAX_S`` longest retry delay (300)
``promoted_state``            ``LORAGATE_PROXY_PROMOTED_STATE`` file keeping which adapters the reconciler
                                                              loaded, across proxy restarts (none)
``drain_timeout_s``           ``LORAGATE_PROXY_DRAIN_TIMEOUT_S`` after SIGTERM, seconds the requests in flight
                                                              may take to finish while new ones get 503
                                                              (25: Kubernetes' default grace period of 30 s
                                                              less a margin; the chart derives it from the
                                                              pod's terminationGracePeriodSeconds)
============================  ==============================  ===============================================

Shadows (:mod:`loragate.server.shadow`): for a ``share`` (0 < share <= 1) of the judged requests
to ``live``, the proxy also sends the request to the engine with ``model: candidate``, judges the
answer and counts it apart; at most ``max_in_flight`` (>= 1, default 4) shadows of one pair run at
once, a shadow beyond them is skipped (and counted), never queued. ``live`` and ``candidate``
must be adapters of the contracts, and differ; a (live, candidate) pair is named once.

``/health`` (liveness) and ``/ready`` (readiness: the upstream answers) never need a key. Keys
are compared in constant time and never logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from loragate.core import settings
from loragate.core.errors import LoragateError

if TYPE_CHECKING:
    from loragate.server.serving import ServerLimits

ENV_PREFIX = "LORAGATE_PROXY_"
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


class ConfigError(LoragateError):
    """The proxy's configuration is invalid."""


#: ``max_in_flight`` of a shadow that does not name one.
DEFAULT_SHADOW_MAX_IN_FLIGHT = 4


@dataclass(frozen=True)
class ShadowConfig:
    """One candidate adapter shadowing a live one (see the module docstring)."""

    live: str
    candidate: str
    share: float
    max_in_flight: int = DEFAULT_SHADOW_MAX_IN_FLIGHT


def _shadows(value: Any) -> tuple[ShadowConfig, ...]:
    """The ``shadows`` setting read from YAML (a list of mappings) or its variable (JSON)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError:
            raise ConfigError("proxy config shadows: the variable must hold a JSON list of "
                              "{live, candidate, share, max_in_flight}") from None
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ConfigError("proxy config shadows: expected a list of {live, candidate, share, max_in_flight}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, ShadowConfig):
            out.append(item)
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"proxy config shadows[{i}]: expected a mapping")
        unknown = sorted(set(item) - {"live", "candidate", "share", "max_in_flight"})
        if unknown:
            raise ConfigError(f"proxy config shadows[{i}]: unknown key(s) {', '.join(map(str, unknown))}")
        live, candidate = item.get("live"), item.get("candidate")
        if not isinstance(live, str) or not live or not isinstance(candidate, str) or not candidate:
            raise ConfigError(f"proxy config shadows[{i}]: live and candidate must be adapter names")
        share, limit = item.get("share"), item.get("max_in_flight", DEFAULT_SHADOW_MAX_IN_FLIGHT)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"proxy config shadows[{i}]: share must be a number in (0, 1], got {share!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"proxy config shadows[{i}]: max_in_flight must be an integer >= 1, got {limit!r}")
        out.append(ShadowConfig(live, candidate, float(share), limit))
    pairs = [(s.live, s.candidate) for s in out]
    for s in out:
        if s.live == s.candidate:
            raise ConfigError(f"proxy config shadows: {s.live} cannot shadow itself")
        if pairs.count((s.live, s.candidate)) > 1:
            raise ConfigError(f"proxy config shadows: {s.candidate} shadows {s.live} twice")
    return tuple(out)


@dataclass(frozen=True)
class ProxyConfig:
    upstream: str = ""
    contracts: Path | None = None
    host: str = "127.0.0.1"
    port: int = settings.PROXY_PORT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = 30.0
    upstream_timeout_s: float = 600.0
    head_timeout_s: float = 10.0
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    max_connections: int = 2048
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_key: str = field(default="", repr=False)
    public_metrics: bool = True
    log_requests: bool = True
    shadows: tuple[ShadowConfig, ...] = ()
    drain_timeout_s: float = 25.0
    promoted_set: Path | None = None
    promoted_poll_s: float = 5.0
    promoted_retry_s: float = 5.0
    promoted_retry_max_s: float = 300.0
    promoted_state: Path | None = None

    def server_limits(self) -> "ServerLimits":
        """The serving layer's limits (:class:`loragate.server.serving.ServerLimits`) from these settings."""
        from loragate.server.serving import ServerLimits

        return ServerLimits(head_timeout_s=self.head_timeout_s, max_head_bytes=self.max_head_bytes,
                            max_headers=self.max_headers, max_connections=self.max_connections)


def _coerce(name: str, value: Any, target: Any) -> Any:
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target is int:
            return int(value)
        if target is float:
            return float(value)
        if name == "api_keys":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(k.strip() for k in items if str(k).strip())
        if name in ("contracts", "promoted_set", "promoted_state"):
            return Path(value) if value else None
        if name == "shadows":
            return _shadows(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"proxy config {name}: cannot read {value!r} as {getattr(target, '__name__', target)}") from None


_TYPES = {"upstream": str, "contracts": Path, "host": str, "port": int, "max_body_bytes": int,
          "body_timeout_s": float, "upstream_timeout_s": float,
          "head_timeout_s": float, "max_head_bytes": int, "max_headers": int, "max_connections": int, "api_keys": tuple, "admin_key": str,
          "public_metrics": bool, "log_requests": bool, "shadows": tuple,
          "drain_timeout_s": float, "promoted_set": Path, "promoted_poll_s": float, "promoted_retry_s": float,
          "promoted_retry_max_s": float, "promoted_state": Path}


def load_config(file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                **overrides: Any) -> ProxyConfig:
    """Defaults, then ``file``, then ``env`` (``os.environ``), then non-``None`` ``overrides``."""
    values: dict[str, Any] = {}
    if file:
        try:
            data = yaml.safe_load(Path(file).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read proxy config {file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"proxy config {file} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"proxy config {file}: expected a mapping")
        unknown = sorted(set(data) - set(_TYPES))
        if unknown:
            raise ConfigError(f"proxy config {file}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_TYPES)}")
        values.update(data)
    env = os.environ if env is None else env
    for name in _TYPES:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = env[key]
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = ProxyConfig(**{k: _coerce(k, v, _TYPES[k]) for k, v in values.items()})
    if not config.upstream.startswith(("http://", "https://")):
        raise ConfigError("proxy needs --upstream http(s)://host:port (or LORAGATE_PROXY_UPSTREAM)")
    if config.max_body_bytes < 1024:
        raise ConfigError("max_body_bytes must be at least 1024")
    if config.max_head_bytes < 1024 or config.max_headers < 8 or config.max_connections < 1:
        raise ConfigError("max_head_bytes must be at least 1024, max_headers at least 8, max_connections at least 1")
    if config.head_timeout_s <= 0 or config.body_timeout_s <= 0 or config.upstream_timeout_s <= 0:
        raise ConfigError("timeouts must be positive")
    if config.shadows and config.contracts is None:
        raise ConfigError("shadows need the contracts (--contracts): live and candidate must be contract adapters")
    if config.drain_timeout_s < 0:
        raise ConfigError("drain_timeout_s must be 0 or more")
    if min(config.promoted_poll_s, config.promoted_retry_s, config.promoted_retry_max_s) <= 0:
        raise ConfigError("promoted_poll_s, promoted_retry_s and promoted_retry_max_s must be positive")
    return dataclasses.replace(config, upstream=config.upstream.rstrip("/"))
