"""Promotion: the record of a PROMOTE verdict and the promoted set the chart serves.

Under the promoted folder (``settings.promoted_dir()``, ``.loragate/promoted/`` by default)::

    promoted.json              the promoted set: adapter -> path, sha256, base, record, numbers
    values.yaml                the same set as chart values: ``adapters.promoted`` (helm upgrade -f)
    promoted-set.json          the same set as the file a proxy's reconciler applies
                               (loragate.core.promoted_set; ``loragate proxy --promoted-set``), its
                               paths under the local adapters folder
    records/<time>-<adapter>-<sha>.json   one promotion record per PROMOTE, never rewritten
    .lock                      serialises updates (flock)

``promoted.json`` is the source of truth; ``values.yaml`` and ``promoted-set.json`` are
regenerated from it on every update. Every file is written atomically (temporary file in the same folder, ``fsync``,
``os.replace``, ``fsync`` of the folder), so a process killed mid-write leaves the previous
version whole; updates hold an exclusive lock, so two gate runs promoting different adapters
at once both land. A REJECT never calls into this module.

``values.yaml`` entries follow the chart's schema (``charts/loragate/values.schema.json``):
``name``, ``path`` (relative to the adapters mount, which holds the adapters file), ``output``,
``smokePrompt`` (a held-out prompt in the adapter's template) and ``maxTokens``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from loragate.core import promoted_set as promoted_set_file
from loragate.core import settings
from loragate.core.contracts import Contract, resolve_under
from loragate.core.errors import GateError

#: Seconds an update waits for another gate run's lock before giving up.
LOCK_TIMEOUT_S = 60.0
#: Adapter names the chart accepts (values.schema.json ``adapters.promoted[].name``).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Weight files whose sha256 identifies an adapter version, in order of preference.
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

_SET_VERSION = 1
#: The promoted set as a reconciler's file (loragate.core.promoted_set), beside promoted.json.
RECONCILED_FILE = "promoted-set.json"


class PromotionError(GateError):
    """The promotion could not be recorded; the promoted set is left as it was."""


def promoted_dir(override: str | os.PathLike[str] | None = None) -> Path:
    return Path(override).resolve() if override else settings.promoted_dir()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(adapter_dir: Path) -> tuple[str, str]:
    """``(file name, sha256)`` of the adapter's weights file."""
    for name in WEIGHT_FILES:
        path = adapter_dir / name
        if path.is_file():
            return name, sha256_file(path)
    raise PromotionError(f"no weights file ({' or '.join(WEIGHT_FILES)}) in {adapter_dir}")


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def promoted_lock(folder: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock of the promoted folder (released by the kernel if the holder dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise PromotionError(f"another promotion holds {folder / '.lock'} for over {timeout_s:.0f}s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@dataclass(frozen=True)
class PromotedEntry:
    """One adapter of the promoted set."""

    name: str
    path: str                   # relative to the adapters folder (the chart's adapters mount)
    output: str
    sha256: str
    base_model: str
    record: str                 # the promotion record's file name under records/
    promoted_at: str
    prompt_template: str
    smoke_prompt: str | None
    max_tokens: int
    #: Greedy rates measured at promotion (``stop_rate``, ``json_validity``), for regression.
    measured: Mapping[str, float]
    #: The API it is served through (its contract's ``api``); the smoke check speaks it.
    api: str = "completions"

    def chart_values(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "path": self.path, "output": self.output,
                                 "maxTokens": self.max_tokens}
        if self.api != "completions":
            entry["api"] = self.api
        if self.smoke_prompt:
            entry["smokePrompt"] = self.smoke_prompt
        return entry


def read_promoted(folder: Path) -> dict[str, PromotedEntry]:
    """The promoted set (empty when nothing was promoted); a corrupt file is an error, not empty."""
    path = folder / "promoted.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise PromotionError(f"cannot read the promoted set {path}: {exc}") from None
    try:
        return {name: PromotedEntry(**entry) for name, entry in (data.get("adapters") or {}).items()}
    except TypeError as exc:
        raise PromotionError(f"{path}: unexpected content ({exc})") from None


def _values_yaml(entries: Mapping[str, PromotedEntry]) -> bytes:
    header = ("# The promoted set, written by `loragate gate` on PROMOTE (do not edit by hand).\n"
              "# helm upgrade <release> charts/loragate -f values.yaml\n")
    body = {"adapters": {"promoted": [entries[n].chart_values() for n in sorted(entries)]}}
    return (header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=1000)).encode()


def _set_json(entries: Mapping[str, PromotedEntry]) -> bytes:
    doc = {"version": _SET_VERSION, "adapters": {n: dataclasses.asdict(entries[n]) for n in sorted(entries)}}
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def relative_adapter_path(contract: Contract, adapters_dir: Path) -> str:
    """The adapter's folder relative to the adapters folder; it may not escape it."""
    resolved = resolve_under(adapters_dir, contract.path, f"adapter {contract.name!r}")
    rel = resolved.relative_to(adapters_dir.resolve()).as_posix()
    return rel or "."


@dataclass(frozen=True)
class Promotion:
    """What a promotion wrote."""

    record_path: Path
    values_path: Path
    set_path: Path
    entry: PromotedEntry
    #: The reconciler's file of the set, and its revision (what replicas report once applied).
    promoted_set_path: Path | None = None
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"record": str(self.record_path), "values": str(self.values_path), "set": str(self.set_path),
                "sha256": self.entry.sha256, "promoted_at": self.entry.promoted_at,
                "promoted_set": str(self.promoted_set_path) if self.promoted_set_path else None,
                "revision": self.revision}


def promote(contract: Contract, *, adapters_dir: Path, folder: Path, thresholds: Mapping[str, Any],
            measured: Mapping[str, Any], checks: list[Mapping[str, Any]], smoke_prompt: str | None,
            report: str | None, endpoint: str) -> Promotion:
    """Write the promotion record, then add (or replace) the adapter in the promoted set."""
    if not NAME_PATTERN.match(contract.name):
        raise PromotionError(f"adapter name {contract.name!r} is not a valid chart name ({NAME_PATTERN.pattern})")
    rel = relative_adapter_path(contract, adapters_dir)
    weights_file, digest = weights_sha256(Path(contract.path))
    now = dt.datetime.now(dt.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
    record = {
        "adapter": contract.name,
        "verdict": "PROMOTE",
        "promoted_at": now.isoformat(),
        "weights": {"file": weights_file, "sha256": digest},
        "path": rel,
        "base_model": contract.base_model,
        "output": contract.output,
        "thresholds": dict(thresholds),
        "measured": dict(measured),
        "checks": checks,
        "report": report,
        "endpoint": endpoint,
    }
    record_path = folder / "records" / f"{stamp}-{contract.name}-{digest[:12]}.json"
    atomic_write(record_path, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode())
    entry = PromotedEntry(
        name=contract.name, path=rel, output=contract.output, sha256=digest, base_model=contract.base_model,
        record=record_path.name, promoted_at=now.isoformat(), prompt_template=contract.prompt_template,
        smoke_prompt=smoke_prompt, max_tokens=contract.max_tokens, api=contract.api,
        measured={k: float(v) for k, v in measured.items() if isinstance(v, (int, float))},
    )
    with promoted_lock(folder):
        entries = read_promoted(folder)
        entries[contract.name] = entry
        set_path, values_path = folder / "promoted.json", folder / "values.yaml"
        reconciled_path = folder / RECONCILED_FILE
        reconciled = promoted_set_file.render(str(adapters_dir.resolve()), [(n, entries[n].path) for n in sorted(entries)])
        atomic_write(set_path, _set_json(entries))
        atomic_write(values_path, _values_yaml(entries))
        atomic_write(reconciled_path, reconciled)
    return Promotion(record_path=record_path, values_path=values_path, set_path=set_path, entry=entry,
                     promoted_set_path=reconciled_path, revision=promoted_set_file.revision(reconciled))


def current_values(folder: Path) -> dict[str, Any]:
    """``values.yaml`` parsed (``{}`` when absent)."""
    path = folder / "values.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        return {}
