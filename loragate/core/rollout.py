"""Waiting until every replica has applied a promoted set: what ``loragate rollout status`` and
the gate's ``--rollout-replica`` do.

Each replica's proxy reports its promoted-set reconciler at ``GET /promoted``
(:mod:`loragate.server.reconciler`): the revision of the file it reads, the revision it applied
(every entry attempted, removals done) and each adapter's state. A rollout of revision ``R`` is
done when every replica reports ``applied_revision == R``; it succeeded when, besides, no
replica reports an adapter that failed, conflicts or is invalid (those are reported per replica,
and the replicas keep retrying them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import httpx

#: Adapter states that make a rollout fail once every replica has applied it.
BAD_STATES = ("failed", "conflict", "invalid")


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica's answer (or why there is none)."""

    replica: str
    revision: str | None = None
    applied_revision: str | None = None
    states: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    unreachable: str | None = None

    def bad(self) -> dict[str, str]:
        """Adapters in a bad state: name -> what the replica says."""
        return {n: self.errors.get(n) or s for n, s in self.states.items() if s in BAD_STATES}

    def describe(self, want: str) -> str:
        if self.unreachable:
            return f"{self.replica}: unreachable ({self.unreachable})"
        if self.applied_revision != want:
            return (f"{self.replica}: waiting (applied {self.applied_revision or 'nothing'}, "
                    f"reads {self.revision or 'nothing'}, want {want})")
        bad = self.bad()
        if bad:
            return f"{self.replica}: applied {want}, with " + "; ".join(f"{n}: {e}" for n, e in sorted(bad.items()))
        return f"{self.replica}: applied {want} ({len(self.states)} adapters loaded)"


def parse_report(replica: str, report: Any) -> ReplicaStatus:
    """A ``/promoted`` document as a :class:`ReplicaStatus`."""
    if not isinstance(report, dict):
        return ReplicaStatus(replica, unreachable="not a /promoted report")
    raw = report.get("adapters")
    adapters: dict[Any, Any] = raw if isinstance(raw, dict) else {}
    states = {str(n): str(a.get("state")) for n, a in adapters.items() if isinstance(a, dict)}
    errors = {str(n): str(a.get("error")) for n, a in adapters.items() if isinstance(a, dict) and a.get("error")}
    for name, why in (report.get("invalid") or {}).items():
        states[str(name)], errors[str(name)] = "invalid", str(why)
    return ReplicaStatus(replica, report.get("revision"), report.get("applied_revision"), states, errors)


def fetch(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> ReplicaStatus:
    """``GET <url>/promoted`` of one replica's proxy."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(f"{url.rstrip('/')}/promoted", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return ReplicaStatus(url, unreachable=f"{type(exc).__name__}: {exc}")
    if resp.status_code != 200:
        return ReplicaStatus(url, unreachable=f"/promoted answered {resp.status_code}")
    try:
        return parse_report(url, resp.json())
    except ValueError:
        return ReplicaStatus(url, unreachable="/promoted answered no JSON")


@dataclass(frozen=True)
class RolloutResult:
    revision: str
    replicas: list[ReplicaStatus]
    done: bool          # every replica applied the revision
    seconds: float

    @property
    def ok(self) -> bool:
        return self.done and bool(self.replicas) and not any(r.bad() for r in self.replicas)


def wait(replicas: Callable[[], Iterable[ReplicaStatus]], revision: str, *, timeout_s: float,
         interval_s: float = 2.0, progress: Callable[[list[ReplicaStatus]], None] | None = None) -> RolloutResult:
    """Poll ``replicas()`` (the statuses of the replicas now) until each applied ``revision``,
    or ``timeout_s`` passes."""
    started = time.monotonic()
    while True:
        statuses = list(replicas())
        done = bool(statuses) and all(s.applied_revision == revision and not s.unreachable for s in statuses)
        if progress is not None:
            progress(statuses)
        elapsed = time.monotonic() - started
        if done or elapsed >= timeout_s:
            return RolloutResult(revision, statuses, done, elapsed)
        time.sleep(min(interval_s, max(0.0, timeout_s - elapsed)))
