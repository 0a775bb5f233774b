"""Which model names may become ``adapter`` label values, and what the engine serves.

Known names are the contracts' adapters and base model, plus every model the engine lists on
``GET /v1/models`` (adapters loaded at run time included). Any other name maps to
:data:`~loragate.server.metrics.OTHER_ADAPTER`, so a client sending random model names can
never grow the metrics. The engine's list is refreshed at start, periodically, and (rate
limited) when an unknown name is seen, so an adapter loaded at run time gets its own label
within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable

from loragate.core.contracts import Contract, ContractSet
from loragate.core.engine import parse_models
from loragate.server.metrics import OTHER_ADAPTER
from loragate.server.upstream import Upstream, UpstreamError

log = logging.getLogger("loragate.proxy")

#: Seconds between two refreshes of the engine's model list triggered by unknown names.
REFRESH_MIN_INTERVAL_S = 5.0
#: Seconds between periodic refreshes.
REFRESH_PERIOD_S = 60.0
#: Upper bound on distinct adapter label values taken from the engine's list.
MAX_ENGINE_NAMES = 1000


class AdapterNames:
    """Bounded adapter labels, contracts by name, and each served model's ``max_model_len``."""

    def __init__(self, contracts: ContractSet | None, upstream: Upstream,
                 on_new_names: Callable[[Iterable[str]], None] | None = None) -> None:
        self.contracts = contracts
        self._upstream = upstream
        #: Called with the names the engine lists that were not known before (their series are
        #: created at 0, so a first error of an adapter loaded at run time is seen by increase()).
        self._on_new_names = on_new_names
        self._static = set(contracts.names) | {contracts.base_model} if contracts else set()
        self._engine: set[str] = set()
        self.max_model_len: dict[str, int] = {}
        self._last_refresh = float("-inf")
        self._refreshing: asyncio.Task | None = None

    @property
    def known(self) -> frozenset[str]:
        return frozenset(self._static | self._engine)

    def label(self, name: object) -> str:
        """The label value for a model name: itself when known, else ``__other__``."""
        if isinstance(name, str) and (name in self._static or name in self._engine):
            return name
        if isinstance(name, str):
            self.refresh_soon()
        return OTHER_ADAPTER

    def contract(self, name: str) -> Contract | None:
        if self.contracts is not None and name in self.contracts:
            return self.contracts[name]
        return None

    def context_limit(self, name: str) -> int | None:
        return self.max_model_len.get(name)

    def refresh_soon(self) -> None:
        """Refresh the engine's list in the background, at most every few seconds."""
        if time.monotonic() - self._last_refresh < REFRESH_MIN_INTERVAL_S:
            return
        if self._refreshing is None or self._refreshing.done():
            try:
                self._refreshing = asyncio.get_running_loop().create_task(self.refresh())
            except RuntimeError:
                pass

    async def refresh(self) -> bool:
        """Read ``/v1/models``; returns whether it answered."""
        self._last_refresh = time.monotonic()
        try:
            document = await self._upstream.get_json("/v1/models", timeout_s=5.0)
            if not isinstance(document, dict):
                raise AttributeError("not a model list")
            models = document.get("data") or []
        except (UpstreamError, AttributeError) as exc:
            log.debug("model list refresh failed: %s", exc)
            return False
        self._take(models)
        return True

    def _take(self, models: Iterable[dict]) -> None:
        # the one reading of /v1/models (loragate.core.engine), adapters' inherited context included
        served = parse_models(self._upstream.base_url, models if isinstance(models, list) else [],
                              skip_malformed=True)
        for m in served.models:
            limit = served.max_model_len(m.id)
            if limit:
                self.max_model_len[m.id] = limit
        engine = set(sorted(m.id for m in served.models)[:MAX_ENGINE_NAMES])
        new = engine - self._engine - self._static
        self._engine = engine
        if new and self._on_new_names is not None:
            self._on_new_names(sorted(new))

    async def run_periodic(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(REFRESH_PERIOD_S)
