"""Reading a streamed completion as it passes through: the proxy's streaming judge's input side.

vLLM streams ``/v1/completions`` and ``/v1/chat/completions`` answers as server-sent events,
one ``data: {json}\\n\\n`` event per chunk, ending with ``data: [DONE]\\n\\n``. Other
OpenAI-compatible servers frame events with CRLF (sse-starlette: ``\\r\\n\\r\\n``); the SSE
standard allows CRLF, LF or CR line ends, mixed, and an event ends at the first empty line. The
network may cut those bytes anywhere (inside an event, inside a UTF-8 character, between a CR
and its LF). :class:`StreamTally` takes the bytes as they come, forwards whole events only, and
collects per choice the text and ``finish_reason`` that
:func:`~loragate.core.judging.judge_completion` later judges, plus the model name and the
engine's usage report. How the bytes were cut never changes what it collects or forwards
(``tests/test_fuzz.py`` checks that on a real recorded vLLM stream).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loragate.core.fastjson import loads

#: The end of one server-sent event with LF line ends (vLLM's framing: the fast path).
EVENT_END = b"\n\n"
#: The end of one server-sent event with any line ends: a line end, then an empty line.
_ANY_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
_LINE_END = re.compile(rb"\r\n|\n|\r")


def event_ends(data: bytes, start: int = 0) -> list[int]:
    """The offsets just past each whole event in ``data`` from ``start`` (LF, CRLF or CR framing).

    A CR at the very end of ``data`` may be the first half of a CRLF still on its way, so an
    event whose end would be that CR is not whole yet.
    """
    ends: list[int] = []
    if b"\r" not in data:
        while (cut := data.find(EVENT_END, start)) >= 0:
            start = cut + 2
            ends.append(start)
        return ends
    for match in _ANY_EVENT_END.finditer(data, start):
        end = match.end()
        if end == len(data) and data.endswith(b"\r"):
            break
        ends.append(end)
    return ends


def event_data(event: bytes) -> bytes | None:
    """The ``data`` of one event (its ``data:`` lines joined with LF), or None when it has none."""
    if event.startswith(b"data: "):  # vLLM's framing: one data line
        body = event[6:].rstrip(b"\r\n")
        if b"\n" not in body and b"\r" not in body:
            return body
    lines = [line for line in _LINE_END.split(event) if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)


@dataclass
class ChoiceText:
    """One choice of a streamed answer, as far as it has come."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None


class StreamTally:
    """Collects a streamed answer's choices; see the module docstring.

    ``strip_usage``: drop the usage-only event (the proxy asked the engine for usage on the
    client's behalf, so the client, which did not ask, must not see it).
    """

    def __init__(self, strip_usage: bool = False) -> None:
        self.strip_usage = strip_usage
        self.choices: dict[int, ChoiceText] = {}
        self.usage: dict = {}
        #: The first ``model`` field seen, or ``None``.
        self.model: str | None = None
        #: Whether any choice has produced text yet (the first token has arrived).
        self.has_output = False
        #: Whether the ``data: [DONE]`` event has been read: the client has the whole answer.
        self.done = False
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take the next bytes; returns the whole events among them to forward (maybe ``b""``)."""
        data = self._buffer + chunk if self._buffer else chunk
        start = 0
        kept: list[bytes] = []
        dropped = False
        for end in event_ends(data):
            event = data if start == 0 and end == len(data) else data[start:end]
            if self._read(event):
                kept.append(event)
            else:
                dropped = True
            start = end
        self._buffer = data[start:] if start < len(data) else b""
        if dropped:
            return b"".join(kept)
        return data if start == len(data) else data[:start]  # every whole event, as it came

    def rest(self) -> bytes:
        """Bytes after the last whole event (forwarded unread when the stream ends)."""
        rest, self._buffer = self._buffer, b""
        return rest

    @property
    def complete(self) -> bool:
        """Every choice seen has a ``finish_reason`` (and at least one was seen)."""
        return bool(self.choices) and all(c.finish_reason is not None for c in self.choices.values())

    def outputs(self) -> list[tuple[str, str | None]]:
        """``(text, finish_reason)`` per choice, by index."""
        return [("".join(c.text), c.finish_reason) for _, c in sorted(self.choices.items())]

    def _read(self, event: bytes) -> bool:
        """Read one event; returns whether to forward it."""
        payload = event_data(event)
        if payload is None or not payload.startswith(b"{"):
            if payload is not None and payload.startswith(b"[DONE]"):
                self.done = True
            return True
        try:
            data = loads(payload)
        except (ValueError, RecursionError):  # also invalid UTF-8
            return True
        if not isinstance(data, dict):
            return True
        keep = True
        if self.model is None and isinstance(data.get("model"), str):
            self.model = data["model"]
        if data.get("usage"):
            self.usage = data["usage"]
            if self.strip_usage and not data.get("choices"):
                keep = False
        choices = data.get("choices")
        for c in choices if isinstance(choices, list) else ():
            if not isinstance(c, dict):
                continue
            index = c.get("index", 0)
            if not isinstance(index, int):
                index = 0
            slot = self.choices.get(index)
            if slot is None:
                slot = self.choices[index] = ChoiceText()
            piece = c.get("text")
            if piece is None:
                delta = c.get("delta")
                piece = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(piece, str) and piece:
                slot.text.append(piece)
                self.has_output = True
            if c.get("finish_reason") is not None:
                slot.finish_reason = c["finish_reason"]
        return keep
