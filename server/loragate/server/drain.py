"""Stopping the proxy without cutting a request: the drain that follows SIGTERM.

In a pod, the kubelet runs the preStop hooks (a sleep, so the endpoints controller, kube-proxy
and gateways stop routing new requests here first), then sends SIGTERM to every container at
once. vLLM, started with ``--shutdown-timeout``, finishes the requests it has and refuses new
ones; the proxy in front of it must stay up as long, relaying the answers to the end.

:class:`DrainingServer` is uvicorn's server with that behaviour. On the first SIGTERM (or
SIGINT) it does not stop at once; it drains:

- the app is told (:attr:`ProxyApp.draining <loragate.server.app.ProxyApp>`): ``/ready`` answers
  503, and every new request to the engine gets a 503 OpenAI-style error with
  ``Connection: close`` and ``Retry-After`` (counted in ``loragate_rejected_requests_total``
  with reason ``draining``), so a client with a kept-alive connection is told to go elsewhere
  instead of finding the connection closed under its request; ``/health`` and ``/metrics``
  keep answering;
- the requests in flight run to their end, as long as ``drain_timeout_s`` allows;
- when none is left, or the time is up, the server shuts down as uvicorn does (the listener
  closes; requests still running at the deadline are cancelled, which closes their engine
  connections and makes vLLM abort them).

A second signal stops at once. One JSON log line (``"event": "drained"``) tells what the drain
did: requests in flight at the signal, how many finished, how many were cut at the deadline,
how many new requests were refused, and how long it took.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from loragate.server.app import ProxyApp

log = logging.getLogger("loragate.proxy")

#: Seconds uvicorn's own shutdown still waits once the drain is over (requests refused in the
#: last moments of the drain finish in microseconds).
SHUTDOWN_GRACE_S = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining for up to ``drain_timeout_s`` after the first SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config, app: ProxyApp, drain_timeout_s: float) -> None:
        config.timeout_graceful_shutdown = int(SHUTDOWN_GRACE_S)
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._signalled_at: float | None = None
        self._deadline = 0.0
        self._at_signal: set[asyncio.Task[Any]] = set()
        self._refused_before = 0
        self._logged_start = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled_at is None and not self.should_exit:
            # Runs between two bytecodes of the main thread (the event loop's), like uvicorn's
            # own handler: from the next request on, the app refuses new work.
            self._captured_signals.append(sig)
            self._signalled_at = time.monotonic()
            self._deadline = self._signalled_at + self._drain_timeout_s
            self._at_signal = set(self.server_state.tasks)
            self._refused_before = self._app.drain_refused
            self._app.draining = True
            return
        super().handle_exit(sig, frame)
        self.should_exit = self.force_exit = True  # a second signal: stop now

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self._signalled_at is None:
            return False
        if not self._logged_start:
            self._logged_start = True
            log.info(json.dumps({"event": "draining", "in_flight": len(self._at_signal),
                                 "drain_timeout_s": self._drain_timeout_s}))
        if not self.server_state.tasks or time.monotonic() >= self._deadline:
            self._report(self._at_signal & self.server_state.tasks)
            return True
        return False

    def _report(self, running: set[asyncio.Task[Any]]) -> None:
        assert self._signalled_at is not None
        cut = len(running)
        log.log(logging.WARNING if cut else logging.INFO, json.dumps({
            "event": "drained", "in_flight_at_signal": len(self._at_signal),
            "finished": len(self._at_signal) - cut, "cut": cut,
            "refused": self._app.drain_refused - self._refused_before,
            "seconds": round(time.monotonic() - self._signalled_at, 3)}))
