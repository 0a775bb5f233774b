"""The promoted set, reconciled into the local vLLM at run time: no restart to promote.

The chart mounts the promoted set (:mod:`loragate.core.promoted_set`) from a ConfigMap into the
pod; ``helm upgrade`` with a new set changes that file in place (the kubelet swaps it), not the
pod template, so nothing restarts. The proxy, started with ``--promoted-set FILE``, runs this
reconciler, which makes the engine beside it serve what the file says, through vLLM's runtime
LoRA API (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``; the engine needs
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``):

- it reads the file at start and whenever its bytes change (checked every ``poll_s``);
- it loads every entry the engine does not serve, and adopts an entry the engine already serves
  from the same folder (e.g. a candidate the gate loaded and then promoted);
- it unloads an adapter it manages once the set no longer holds it, after its requests in
  flight are done: from the moment it is removed, new requests for it get a 404 from the proxy
  (``adapter_retiring``), so its in-flight count can only fall; an entry whose path changed is
  unloaded the same way, then loaded from its new folder;
- a failed load or unload is retried with exponential backoff (``retry_s`` doubling up to
  ``retry_max_s``); a bad entry (a wrong name or path, a folder the engine cannot load) is
  reported and never blocks the others;
- it never touches an adapter it does not manage: one the engine serves that it did not load
  or adopt is left alone, and an entry whose name the engine already serves from another folder
  is reported as a ``conflict``, not replaced. What it manages is kept in ``state_file`` (the
  chart puts it on the pod's emptyDir), so a restarted proxy still knows what it loaded.

Why in the proxy process and not a sidecar: only the proxy sees every request, so only it can
hold back new requests for an adapter being removed and know exactly when the last one in
flight is done; its ``/ready`` already gates the pod's readiness (the pod is not ready until
the set read at start has been applied: every entry loaded, or reported as failed); and a
second container would cost the pod another image, process and probe for what is one asyncio
task here.

It reports per pod: ``GET /promoted`` (JSON: the file's revision, the revision applied, each
adapter's state and error) and the metrics ``loragate_promoted_set_info``,
``loragate_promoted_set_converged``, ``loragate_promoted_adapter_state`` and
``loragate_promoted_operations_total``. The *applied* revision is the last whose every entry
was attempted (loaded, or failed and reported) and whose removals are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from loragate.core import fastjson
from loragate.core import metric_names as names
from loragate.core.promoted_set import PromotedEntry, PromotedSet, PromotedSetError, parse
from loragate.server.upstream import Upstream, UpstreamError

log = logging.getLogger("loragate.proxy.promoted")

#: The route reporting the reconciler's state.
ROUTE = "/promoted"
#: States of an adapter of the set (``loragate_promoted_adapter_state``'s ``state`` values).
STATES = names.PROMOTED_ADAPTER_STATES
#: Seconds a load or unload call may take (loading reads the weights from the volume).
CALL_TIMEOUT_S = 120.0

Send = Callable[[dict], Awaitable[None]]


@dataclass
class AdapterStatus:
    """What the reconciler knows of one adapter it manages or was asked to serve."""

    name: str
    path: str
    state: str = "pending"
    error: str | None = None
    attempts: int = 0
    next_try: float = 0.0

    def report(self) -> dict[str, Any]:
        return {"path": self.path, "state": self.state, "error": self.error, "attempts": self.attempts}


class Admission:
    """The requests in flight to the engine (their bodies), and the adapters being removed.

    The proxy calls :meth:`enter` with a request's body before forwarding it and :meth:`leave`
    when it is done. While an adapter is being removed, :meth:`enter` refuses requests for it;
    :meth:`in_flight` counts the requests for an adapter (each body is read at most once, and
    only while some adapter is being removed).
    """

    def __init__(self) -> None:
        self._next = 0
        self._bodies: dict[int, bytes] = {}
        self._models: dict[int, object] = {}
        self.retiring: set[str] = set()
        self.changed = asyncio.Event()

    def enter(self, body: bytes) -> int | None:
        """A ticket for the request, or ``None`` when it asks for an adapter being removed."""
        self._next += 1
        ticket = self._next
        if self.retiring and self._model(ticket, body) in self.retiring:
            self._models.pop(ticket, None)
            return None
        self._bodies[ticket] = body
        return ticket

    def leave(self, ticket: int) -> None:
        self._bodies.pop(ticket, None)
        self._models.pop(ticket, None)
        if self.retiring:
            self.changed.set()

    def in_flight(self, name: str) -> int:
        return sum(1 for ticket, body in list(self._bodies.items()) if self._model(ticket, body) == name)

    def _model(self, ticket: int, body: bytes) -> object:
        """The request's ``model`` when it may be an adapter being removed, else ``None``."""
        if ticket in self._models:
            return self._models[ticket]
        # a body that names none of the adapters being removed, even escaped, is for none of them
        # (not remembered: the adapters being removed change)
        if b"\\u" not in body and not any(name.encode() in body for name in self.retiring):
            return None
        try:
            request = fastjson.loads(body)
        except (ValueError, RecursionError):
            request = None
        model = request.get("model") if isinstance(request, dict) else None
        self._models[ticket] = model
        return model


def _same_folder(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


class Reconciler:
    """Applies the promoted set in ``path`` to the engine; see the module docstring."""

    def __init__(self, path: Path, upstream: Callable[[], Upstream], metrics: Any, *,
                 poll_s: float = 5.0, retry_s: float = 5.0, retry_max_s: float = 300.0,
                 state_file: Path | None = None, on_change: Callable[[], Any] | None = None) -> None:
        self.path = path
        self._upstream = upstream
        self._metrics = metrics
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.state_file = state_file
        self._on_change = on_change
        self.admission = Admission()
        self.desired: PromotedSet | None = None
        self.file_error: str | None = None
        self.applied_revision: str | None = None
        self.statuses: dict[str, AdapterStatus] = {}
        self.managed: dict[str, str] = self._load_state()
        self.unmanaged: list[str] = []
        self._bytes: bytes | None = None
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ what others read
    def ready(self) -> tuple[bool, str]:
        """The pod's readiness: the set read at start has been applied."""
        if self.applied_revision is not None:
            return True, "ready"
        return False, f"promoted set {self.path} not applied yet" + (f": {self.file_error}" if self.file_error else "")

    @property
    def converged(self) -> bool:
        return (self.desired is not None and self.applied_revision == self.desired.revision
                and not self.desired.invalid and all(s.state == "loaded" for s in self.statuses.values()))

    def report(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "revision": self.desired.revision if self.desired else None,
            "applied_revision": self.applied_revision,
            "converged": self.converged,
            "ready": self.ready()[0],
            "error": self.file_error,
            "adapters": {name: {**s.report(), **({"in_flight": self.admission.in_flight(name)}
                                                 if s.state == "draining" else {})}
                         for name, s in sorted(self.statuses.items())},
            "invalid": dict(self.desired.invalid) if self.desired else {},
            "unmanaged": self.unmanaged,
        }

    async def endpoint(self, scope: dict[str, Any], send: Send) -> None:
        body = json.dumps(self.report(), indent=1).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        while True:
            try:
                self._read_file()
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug must not stop the loop; it is logged and retried
                log.exception("promoted set: reconcile failed")
            self._export()
            await self._sleep()

    async def _sleep(self) -> None:
        delay = self.poll_s
        now = time.monotonic()
        waiting = [s.next_try - now for s in self.statuses.values() if s.state in ("failed", "pending")]
        if waiting:
            delay = max(0.05, min(delay, min(waiting)))
        if self.admission.retiring:
            delay = min(delay, 0.5)
            self.admission.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.admission.changed.wait()
            return
        await asyncio.sleep(delay)

    def _read_file(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self.file_error = f"cannot read {self.path}: {exc.strerror}"
            return
        if data == self._bytes:
            return
        try:
            desired = parse(data)
        except PromotedSetError as exc:
            self.file_error = f"{self.path}: {exc}"
            log.error(json.dumps({"event": "promoted_set_invalid", "file": str(self.path), "error": str(exc)}))
            self._bytes = data
            return
        self._bytes = data
        self.file_error = None
        self.desired = desired
        for name, entry in desired.entries.items():
            status = self.statuses.get(name)
            if status is None or status.path != entry.path:
                if status is not None and name in self.managed:
                    continue  # a new folder for a managed adapter: unloaded first (reconcile)
                self.statuses[name] = AdapterStatus(name, entry.path)
            elif status.state in ("failed", "conflict"):
                status.next_try = 0.0  # a new revision: try again now
        log.info(json.dumps({"event": "promoted_set", "revision": desired.revision,
                             "adapters": sorted(desired.entries), "invalid": desired.invalid}))

    async def reconcile(self) -> None:
        """One pass: unload what left the set (once drained), load what is missing."""
        desired = self.desired
        if desired is None:
            return
        served = await self._served()
        if served is None:
            return  # the engine does not answer: nothing can be decided
        self.unmanaged = sorted(n for n in served if n not in self.managed and n not in desired.entries)
        changed = False
        # removals first: an adapter that left the set, or whose folder changed
        for name, path in list(self.managed.items()):
            entry = desired.entries.get(name)
            if entry is not None and entry.path == path:
                continue
            changed |= await self._retire(name, served)
        now = time.monotonic()
        for name, entry in desired.entries.items():
            status = self.statuses.setdefault(name, AdapterStatus(name, entry.path))
            if name in self.admission.retiring or (name in self.managed and self.managed[name] != entry.path):
                status.state = "draining" if name in self.admission.retiring else status.state
                continue  # its old version is still being drained and unloaded
            status.path = entry.path
            if name in served:
                if name in self.managed or _same_folder(served[name], entry.path):
                    if name not in self.managed:
                        self._manage(name, entry.path)
                        log.info(json.dumps({"event": "promoted_adopted", "adapter": name, "path": entry.path}))
                    status.state, status.error = "loaded", None
                else:
                    status.state = "conflict"
                    status.error = (f"the engine already serves {name!r} from {served[name]}, not loaded by this "
                                    f"reconciler; it is left alone")
                continue
            if status.state in ("failed", "pending", "loaded", "conflict") and status.next_try <= now:
                changed |= await self._load(status, entry)
        for name in [n for n in self.statuses if n not in desired.entries and n not in self.managed]:
            del self.statuses[name]
        pending = [s for s in self.statuses.values() if s.state in ("pending", "loading", "draining")]
        if not pending and not self.admission.retiring and self.applied_revision != desired.revision:
            self.applied_revision = desired.revision
            log.info(json.dumps({"event": "promoted_set_applied", "revision": desired.revision,
                                 "states": {n: s.state for n, s in sorted(self.statuses.items())}}))
        if changed and self._on_change is not None:
            self._on_change()

    async def _served(self) -> dict[str, str] | None:
        """Adapters the engine serves now: name -> folder (its ``root``)."""
        try:
            document: Any = await self._upstream().get_json("/v1/models", timeout_s=10.0)
            models = document["data"]
            return {m["id"]: str(m.get("root") or "") for m in models
                    if isinstance(m, dict) and isinstance(m.get("id"), str) and m.get("parent")}
        except (UpstreamError, KeyError, TypeError, ValueError):
            return None

    async def _retire(self, name: str, served: dict[str, str]) -> bool:
        """Drain then unload ``name``; whether it was unloaded in this pass."""
        status = self.statuses.setdefault(name, AdapterStatus(name, self.managed[name]))
        if name not in self.admission.retiring:
            self.admission.retiring.add(name)
            log.info(json.dumps({"event": "promoted_draining", "adapter": name,
                                 "in_flight": self.admission.in_flight(name)}))
        status.state = "draining"
        if self.admission.in_flight(name):
            return False
        if name in served:
            if status.next_try > time.monotonic():
                return False
            ok, error = await self._call("/v1/unload_lora_adapter", {"lora_name": name}, "unload")
            if not ok and "cannot be found" not in (error or ""):
                self._failed(status, f"unload failed: {error}")
                status.state = "draining"
                return False
        self.admission.retiring.discard(name)
        served.pop(name, None)
        old_path = self.managed.pop(name)
        self._save_state()
        entry = self.desired.entries.get(name) if self.desired else None
        if entry is None:
            self.statuses.pop(name, None)
        else:  # a new folder: load it next
            self.statuses[name] = AdapterStatus(name, entry.path)
        log.info(json.dumps({"event": "promoted_unloaded", "adapter": name, "path": old_path}))
        return True

    async def _load(self, status: AdapterStatus, entry: PromotedEntry) -> bool:
        status.state = "loading"
        status.attempts += 1
        ok, error = await self._call("/v1/load_lora_adapter", {"lora_name": entry.name, "lora_path": entry.path},
                                     "load")
        if ok:
            self._manage(entry.name, entry.path)
            status.state, status.error, status.next_try = "loaded", None, 0.0
            log.info(json.dumps({"event": "promoted_loaded", "adapter": entry.name, "path": entry.path}))
            return True
        self._failed(status, f"load failed: {error}")
        return False

    def _failed(self, status: AdapterStatus, error: str) -> None:
        delay = min(self.retry_max_s, self.retry_s * 2 ** max(0, status.attempts - 1))
        status.state, status.error, status.next_try = "failed", error, time.monotonic() + delay
        log.warning(json.dumps({"event": "promoted_failed", "adapter": status.name, "error": error,
                                "attempts": status.attempts, "retry_in_s": round(delay, 1)}))

    async def _call(self, path: str, payload: dict[str, str], operation: str) -> tuple[bool, str | None]:
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json")]
        try:
            resp = await self._upstream().send("POST", path, headers, body, timeout_s=CALL_TIMEOUT_S)
            try:
                content = await resp.read()
            finally:
                resp.close()
        except UpstreamError as exc:
            self._metrics.promoted_operations.labels(operation, "error").inc()
            return False, f"the engine did not answer ({exc.kind}): {exc}"
        if resp.status == 200:
            self._metrics.promoted_operations.labels(operation, "ok").inc()
            return True, None
        self._metrics.promoted_operations.labels(operation, "error").inc()
        if resp.status == 404 and b"Not Found" in content and b"error" not in content:
            return False, "the engine's runtime LoRA API is off (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
        try:
            message = json.loads(content)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = content[:500].decode("utf-8", "replace")
        return False, f"{resp.status}: {message}"

    # ------------------------------------------------------------------ state and metrics
    def _manage(self, name: str, path: str) -> None:
        self.managed[name] = path
        self._save_state()

    def _load_state(self) -> dict[str, str]:
        if self.state_file is None:
            return {}
        try:
            data = json.loads(self.state_file.read_text())
            return {str(k): str(v) for k, v in data.get("managed", {}).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_state(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"managed": self.managed}))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning(json.dumps({"event": "promoted_state_not_saved", "file": str(self.state_file),
                                    "error": exc.strerror}))

    def _export(self) -> None:
        m = self._metrics
        m.promoted_set_info.clear()
        m.promoted_set_info.labels(self.desired.revision if self.desired else "", self.applied_revision or "").set(1)
        m.promoted_set_converged.set(1 if self.converged else 0)
        m.promoted_adapter_state.clear()
        for name, status in self.statuses.items():
            for state in STATES:
                m.promoted_adapter_state.labels(name, state).set(1 if status.state == state else 0)
        if self.desired is not None:
            for name in self.desired.invalid:
                if name not in self.statuses:
                    for state in STATES:
                        m.promoted_adapter_state.labels(name, state).set(1 if state == "invalid" else 0)
