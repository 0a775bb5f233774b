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

When the proxy asked the engine for usage on the client's behalf (``strip_usage``), the tally
also gives the client back the stream vLLM would have sent it: vLLM then moves
``system_fingerprint`` from each choice's last event (the one with its ``finish_reason``) onto
the usage event. The tally drops the usage event and puts its fingerprint back on those
events; to do that it holds the events from the first choice's last event on until the usage
event comes (for one choice, that is the very next event), at most :data:`HOLD_LIMIT` bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from loragate.core.fastjson import loads

#: The end of one server-sent event with LF line ends (vLLM's framing: the fast path).
EVENT_END = b"\n\n"
#: The end of one server-sent event with any line ends: a line end, then an empty line.
_ANY_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
_LINE_END = re.compile(rb"\r\n|\n|\r")
#: Most bytes of events held for their fingerprint; beyond, they go out as the engine sent them.
HOLD_LIMIT = 1 << 20


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
    #: vLLM's ``stop_reason``: the stop string or token id that ended the choice (None: EOS).
    stop_reason: object = None
    #: A chat choice's ``delta.role`` (None for completions).
    role: str | None = None


class StreamTally:
    """Collects a streamed answer's choices; see the module docstring.

    ``strip_usage``: the proxy asked the engine for usage on the client's behalf, so the client,
    which did not ask, must get the stream without it: the usage-only event is dropped and its
    ``system_fingerprint`` put back on each choice's last event.
    """

    def __init__(self, strip_usage: bool = False) -> None:
        self.strip_usage = strip_usage
        self.choices: dict[int, ChoiceText] = {}
        self.usage: dict = {}
        #: The first ``model`` field seen, or ``None``.
        self.model: str | None = None
        #: Whether any choice has produced text yet (the first token has arrived).
        self.has_output = False
        #: Whether the choices are chat ones (they carry a ``delta``).
        self.chat = False
        #: Whether the ``data: [DONE]`` event has been read: the client has the whole answer.
        self.done = False
        self._buffer = b""
        #: Events held for the fingerprint (``strip_usage`` only): ``[event, is_a_choices_last]``.
        self._held: list[list] = []
        self._held_bytes = 0
        self._holding = strip_usage
        #: The usage event's ``system_fingerprint``, as JSON.
        self._fingerprint: bytes | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Take the next bytes; returns the whole events among them to forward (maybe ``b""``)."""
        data = self._buffer + chunk if self._buffer else chunk
        start = 0
        kept: list[bytes] = []
        changed = False
        for end in event_ends(data):
            event = data if start == 0 and end == len(data) else data[start:end]
            verdict = self._read(event)
            if (verdict is _FORWARD or verdict is _DONE) and not self._held:
                kept.append(event)
            else:
                changed = True
                self._take(event, verdict, kept)
            start = end
        self._buffer = data[start:] if start < len(data) else b""
        if changed:
            return b"".join(kept)
        return data if start == len(data) else data[:start]  # every whole event, as it came

    def release(self) -> bytes:
        """The events held for their fingerprint, as the engine sent them (the stream ended or
        broke before the usage event)."""
        held = b"".join(e for e, _ in self._held)
        self._held.clear()
        self._held_bytes = 0
        self._holding = False
        return held

    def rest(self) -> bytes:
        """Held events and the bytes after the last whole event (forwarded when the stream ends)."""
        rest, self._buffer = self._buffer, b""
        return self.release() + rest

    def _take(self, event: bytes, verdict: object, kept: list[bytes]) -> None:
        """Hold, drop or forward one event (the slow path: usage stripped, fingerprints restored)."""
        if verdict is _USAGE:  # the usage event the client did not ask for: its fingerprint goes back
            fingerprint = self._fingerprint
            for entry in self._held:
                event_held, last = entry
                cut = event_held.rfind(b"}")
                if last and fingerprint is not None and cut > 0:
                    entry[0] = event_held[:cut] + b',"system_fingerprint":' + fingerprint + event_held[cut:]
            kept.extend(e for e, _ in self._held)
            self._held.clear()
            self._held_bytes = 0
            self._holding = False
            return
        if verdict is _DONE:
            kept.append(self.release())
            kept.append(event)
            return
        if self._holding and (self._held or verdict is _LAST):
            self._held.append([event, verdict is _LAST])
            self._held_bytes += len(event)
            if self._held_bytes > HOLD_LIMIT:
                kept.append(self.release())
            return
        kept.append(event)

    @property
    def complete(self) -> bool:
        """Every choice seen has a ``finish_reason`` (and at least one was seen)."""
        return bool(self.choices) and all(c.finish_reason is not None for c in self.choices.values())

    def outputs(self) -> list[tuple[str, str | None]]:
        """``(text, finish_reason)`` per choice, by index."""
        return [("".join(c.text), c.finish_reason) for _, c in sorted(self.choices.items())]

    def _read(self, event: bytes) -> object:
        """Read one event; returns what it is to the forwarding (:data:`_FORWARD` and the like)."""
        payload = event_data(event)
        if payload is None or not payload.startswith(b"{"):
            if payload is not None and payload.startswith(b"[DONE]"):
                self.done = True
                return _DONE
            return _FORWARD
        try:
            data = loads(payload)
        except (ValueError, RecursionError):  # also invalid UTF-8
            return _FORWARD
        if not isinstance(data, dict):
            return _FORWARD
        verdict = _FORWARD
        if self.model is None and isinstance(data.get("model"), str):
            self.model = data["model"]
        choices = data.get("choices")
        if data.get("usage"):
            self.usage = data["usage"]
            if self.strip_usage and not choices:
                fingerprint = data.get("system_fingerprint")
                self._fingerprint = json.dumps(fingerprint, ensure_ascii=False).encode() if isinstance(fingerprint, str) else None
                return _USAGE
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
                if isinstance(delta, dict):
                    self.chat = True
                    piece = delta.get("content")
                    if isinstance(delta.get("role"), str) and slot.role is None:
                        slot.role = delta["role"]
            if isinstance(piece, str) and piece:
                slot.text.append(piece)
                self.has_output = True
            if c.get("finish_reason") is not None:
                slot.finish_reason = c["finish_reason"]
                slot.stop_reason = c.get("stop_reason")
                if self.strip_usage and "system_fingerprint" not in data:
                    verdict = _LAST
        return verdict


#: What an event is to the forwarding: forwarded as it came; the usage event the client did not
#: ask for; a choice's last event (its fingerprint moved to the usage event); ``[DONE]``.
_FORWARD, _USAGE, _LAST, _DONE = object(), object(), object(), object()
