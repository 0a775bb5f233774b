"""Reading JSONL input files (prompts, training data): one JSON object a line.

One reader, so every command reports a bad file the same way: the file and line, what was
wrong, and blank lines skipped. Errors are raised as the caller's own error class (a
:class:`~loragate.core.errors.LoragateError` subclass), so each command keeps its exit status.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from loragate.core.errors import LoragateError


def read_objects(path: str | os.PathLike[str], *, what: str, error: type[LoragateError],
                 expected: str = "a JSON object") -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of the JSONL file at ``path``.

    ``what`` names the file in messages ("prompts file", "data file"); ``expected`` says what a
    line must be when it parses to something other than an object.
    """
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise error(f"{what} not found: {source}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {source}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise error(f"{source}:{number}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise error(f"{source}:{number}: expected {expected}")
        yield number, record
