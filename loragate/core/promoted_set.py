"""The promoted set as a file: what every replica's reconciler applies, and its revision.

The chart renders ``adapters.promoted`` into a ConfigMap holding one file, ``promoted.json``,
mounted into each pod (never into the pod template: a new set restarts nothing); the gate
writes the same file for its promoted set (``.loragate/promoted/promoted-set.json``). Its form::

    {"base": "/adapters",
     "adapters": [{"name": "poster-good", "path": "poster-good"}, ...]}

- ``base``: the folder adapter paths are relative to (the adapters mount in a pod);
- each entry: ``name``, the model name clients send (:data:`NAME_PATTERN`), and ``path``, the
  adapter's folder under ``base`` (it may not leave it).

The **revision** of a set is the first 16 hex digits of the SHA-256 of the file's bytes
(:func:`revision`): the chart computes it the same way (``sha256sum``), a reconciler reports
the revision it applied, and ``loragate rollout status`` waits for it on every replica.

:func:`parse` never raises for one bad entry: each entry is checked on its own, so one wrong
name or path is reported (:attr:`PromotedSet.invalid`) and the others are still applied.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from loragate.core.errors import LoragateError

#: Model names an entry may take (the chart's values.schema.json ``adapters.promoted[].name``).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Most entries a set may hold (each becomes label values of the reconciler's metrics).
MAX_ENTRIES = 256
#: The file name in the chart's ConfigMap and the gate's promoted folder.
FILE_NAME = "promoted.json"


class PromotedSetError(LoragateError):
    """The file is not a promoted set at all (not JSON, not the expected shape)."""


@dataclass(frozen=True)
class PromotedEntry:
    name: str
    #: Absolute path of the adapter's folder (``base`` joined with the entry's path).
    path: str


@dataclass(frozen=True)
class PromotedSet:
    revision: str
    base: str
    entries: dict[str, PromotedEntry]
    #: Entries that cannot be applied, by name (or ``#<index>`` when the name itself is bad): why.
    invalid: dict[str, str] = field(default_factory=dict)


def revision(data: bytes) -> str:
    """The revision of a set file's bytes: 16 hex digits of their SHA-256."""
    return hashlib.sha256(data).hexdigest()[:16]


def render(base: str, entries: list[tuple[str, str]]) -> bytes:
    """The file for ``entries`` (name, path relative to ``base``), as the chart renders it: compact
    JSON with sorted keys (Helm's ``toJson``)."""
    doc = {"adapters": [{"name": n, "path": p} for n, p in entries], "base": base}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _checked_path(base: str, path: Any) -> str:
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValueError("path must be a non-empty string")
    rel = PurePosixPath(path)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"path {path!r} must stay under {base} (relative, no '..')")
    return str(PurePosixPath(base) / rel)


def parse(data: bytes) -> PromotedSet:
    """Read a set file; raises :class:`PromotedSetError` only when the whole file is unusable."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise PromotedSetError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("adapters"), list):
        raise PromotedSetError('expected {"base": ..., "adapters": [...]}')
    base = doc.get("base")
    if not isinstance(base, str) or not base.startswith("/"):
        raise PromotedSetError("base must be an absolute path")
    if len(doc["adapters"]) > MAX_ENTRIES:
        raise PromotedSetError(f"more than {MAX_ENTRIES} adapters")
    entries: dict[str, PromotedEntry] = {}
    invalid: dict[str, str] = {}
    for index, raw in enumerate(doc["adapters"]):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            invalid[f"#{index}"] = f"entry {index}: name must match {NAME_PATTERN.pattern}, got {name!r}"
            continue
        if name in entries or name in invalid:
            invalid[name] = f"entry {index}: {name!r} is listed twice"
            entries.pop(name, None)
            continue
        try:
            entries[name] = PromotedEntry(name, _checked_path(base, raw.get("path")))
        except ValueError as exc:
            invalid[name] = f"entry {index} ({name}): {exc}"
    return PromotedSet(revision(data), base, entries, invalid)
