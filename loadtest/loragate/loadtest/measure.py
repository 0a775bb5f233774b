"""What one streamed completion measures, and what a load run's samples add up to.

Every definition follows vLLM's ``vllm bench serve`` (``vllm/benchmarks/lib/endpoint_request_func.py``
and ``vllm/benchmarks/serve.py``), so the numbers compare with it and with guidellm:

- **send time**: the client's clock just before the request is sent.
- **TTFT** (time to first token): arrival of the first streamed chunk whose ``choices`` is
  non-empty, minus the send time. The trailing usage chunk (``choices: []``) is no token.
- **ITL** (inter-token latency): every gap between two consecutive chunks with non-empty
  ``choices``, pooled over all requests (a request of n such chunks gives n - 1 gaps). A chunk
  is timed when the read that completes it arrives, so chunks that arrive in one read (a burst:
  the engine or a proxy was behind and its writes coalesced) have a gap of exactly 0, where
  ``vllm bench serve`` stamps each parsed message and records microseconds of its own parsing.
  On a busy CPU host half the gaps can be bursts (a p50 of 0) straight from vLLM as well.
- **e2e** (end-to-end latency): arrival of the last chunk with non-empty ``choices`` minus the
  send time.
- **TPOT** (time per output token, first token excluded): ``(e2e - TTFT) / (output tokens - 1)``,
  for requests with more than one output token; output tokens come from the engine's usage
  report (``stream_options.include_usage``).
- **output tokens/s**: all output tokens of completed requests divided by the run's duration
  (first send to last completion), all users together.
- **goodput**: completed requests that meet every per-request objective, per second of the run.
  Per request the objectives are the load SLO's TTFT bar (``ttft_p95_ms``) and its inter-token
  bar applied to the request's TPOT (``itl_p95_ms``); vLLM calls these ``--goodput ttft:… tpot:…``.

Percentiles are computed here, from the raw samples, by linear interpolation between closest
ranks (numpy's default, as ``vllm bench serve`` uses), never from locust's rounded histogram.

Nothing here imports locust or gevent: the locustfile feeds bytes in, the runner reads samples out.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from loragate.core.contracts import LoadSLO
from loragate.core.judging import FinishClass, classify_finish
from loragate.core.stats import percentile  # noqa: F401  (the load test's percentiles)

#: ``finish_reason`` classes a load run counts, the proxy's label values (one definition:
#: :func:`loragate.core.judging.classify_finish`). ``length`` under load means the request's
#: ``max_tokens`` ran out: the load test's prompts are far below the served context.
FINISH_STOP: str = FinishClass.STOP.value
FINISH_LENGTH: str = FinishClass.LENGTH.value
FINISH_OTHER: str = FinishClass.OTHER.value


@dataclass
class RequestSample:
    """One request of a load run, as the client saw it. Times in seconds.

    ``ok`` is True when the stream delivered at least one chunk with choices and a
    ``finish_reason``, without an HTTP or stream error; only then are the timings meaningful.
    """

    ok: bool
    sent_at: float                      # wall clock (epoch seconds) at send
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    tokens_from_usage: bool = False     # False: usage absent, tokens counted as chunks with text
    finish_reason: str | None = None    # stop | length | other (judging.classify_finish)
    status: int | None = None           # HTTP status, None when no response came
    error: str | None = None

    @property
    def done_at(self) -> float:
        """Wall clock at the last chunk with choices (the send time when nothing came)."""
        return self.sent_at + (self.e2e_s or 0.0)

    @property
    def tpot_s(self) -> float | None:
        """``(e2e - TTFT) / (output tokens - 1)``; None for one token or less (as vLLM)."""
        if not self.ok or self.output_tokens <= 1 or self.e2e_s is None or self.ttft_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "RequestSample":
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class StreamError(Exception):
    """The server sent something that is not an OpenAI completion stream."""


class StreamTimer:
    """Times one SSE completion stream, chunk by chunk, as ``vllm bench serve`` does.

    Feed each piece of the body with the monotonic time it arrived (:meth:`feed`); events may be
    split across pieces or several may share one. :meth:`result` gives the sample.
    """

    def __init__(self, sent_mono: float, sent_wall: float) -> None:
        self.sent_mono = sent_mono
        self.sent_wall = sent_wall
        self._buffer = b""
        self._first: float | None = None
        self._last: float | None = None
        self.itl_s: list[float] = []
        self.finish_reason: Any = None
        self.usage_tokens: int | None = None
        self.text_chunks = 0
        self.done = False
        self.bytes_received = 0

    def feed(self, data: bytes, at_mono: float) -> None:
        self.bytes_received += len(data)
        self._buffer += data
        # SSE events end with a blank line; vLLM uses "\n\n" (tolerate "\r\n\r\n").
        self._buffer = self._buffer.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                self._line(line.strip(), at_mono)

    def _line(self, line: bytes, at: float) -> None:
        if not line or line.startswith(b":"):  # keep-alive comment
            return
        if not line.startswith(b"data:"):
            return  # event:/id:/retry: fields carry no payload here
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            data = json.loads(payload)
        except ValueError:
            raise StreamError(f"stream event is not JSON: {payload[:200]!r}") from None
        if not isinstance(data, dict):
            raise StreamError(f"stream event is not a JSON object: {payload[:200]!r}")
        if "error" in data:
            err = data["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise StreamError(f"error event in stream: {msg}")
        choices = data.get("choices")
        if choices:
            if self._first is None:
                self._first = at
            else:
                self.itl_s.append(at - self._last)  # type: ignore[operator]
            self._last = at
            choice = choices[0] if isinstance(choices[0], dict) else {}
            delta = choice.get("delta")
            if choice.get("text") or (isinstance(delta, dict) and delta.get("content")):  # completion or chat
                self.text_chunks += 1
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
        elif isinstance(data.get("usage"), dict):
            tokens = data["usage"].get("completion_tokens")
            if isinstance(tokens, int):
                self.usage_tokens = tokens

    def result(self, status: int | None = 200) -> RequestSample:
        """The sample; not ``ok`` when no chunk with choices or no ``finish_reason`` came."""
        sample = RequestSample(ok=False, sent_at=self.sent_wall, status=status, itl_s=self.itl_s)
        if self._first is not None:
            sample.ttft_s = self._first - self.sent_mono
            sample.e2e_s = self._last - self.sent_mono  # type: ignore[operator]
        if self.usage_tokens is not None:
            sample.output_tokens, sample.tokens_from_usage = self.usage_tokens, True
        else:
            sample.output_tokens = self.text_chunks
        if self._first is None:
            sample.error = "stream ended without a chunk with choices (no first token)"
        elif self.finish_reason is None:
            sample.error = "stream ended without a finish_reason (broken stream)"
        else:
            sample.ok = True
            sample.finish_reason = classify_finish(self.finish_reason).value
        return sample


# --------------------------------------------------------------------------- statistics


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def is_good(sample: RequestSample, slo: LoadSLO) -> bool:
    """Does one request count towards goodput: completed, TTFT within ``ttft_p95_ms`` and
    TPOT within ``itl_p95_ms`` (a request of one token has TPOT 0, as in vLLM)?"""
    if not sample.ok or sample.ttft_s is None:
        return False
    tpot = sample.tpot_s or 0.0
    return sample.ttft_s * 1000 <= slo.ttft_p95_ms and tpot * 1000 <= slo.itl_p95_ms


def summarize(samples: Iterable[RequestSample], slo: LoadSLO) -> dict[str, Any]:
    """The load run's numbers from its raw samples (definitions: the module docstring).

    Keys: ``requests`` (sent and answered or failed), ``completed``, ``failed``, ``error_rate``
    (failed / requests), ``duration_s`` (first send to last completion), ``ttft_p50_ms``,
    ``ttft_p95_ms``, ``itl_p50_ms``, ``itl_p95_ms``, ``itl_samples``, ``tpot_mean_ms``,
    ``tpot_p50_ms``, ``e2e_p50_ms``, ``e2e_p95_ms``, ``output_tokens``,
    ``output_tokens_per_s``, ``request_throughput`` (completed / s), ``good_requests``,
    ``goodput`` (good requests / s), ``stop``, ``length``, ``other`` (completions by finish
    class), ``stop_share`` and ``max_tokens_share`` (of completed requests: stopped by EOS /
    cut at ``max_tokens``). A number that cannot be measured (no completed request) is None.
    """
    samples = list(samples)
    done = [s for s in samples if s.ok]
    failed = len(samples) - len(done)
    ttfts = [s.ttft_s for s in done if s.ttft_s is not None]
    e2es = [s.e2e_s for s in done if s.e2e_s is not None]
    itls = [gap for s in done for gap in s.itl_s]
    tpots = [t for t in (s.tpot_s for s in done) if t is not None]
    if samples:
        start = min(s.sent_at for s in samples)
        end = max(max((s.done_at for s in samples), default=start), start)
        duration = end - start
    else:
        duration = 0.0
    tokens = sum(s.output_tokens for s in done)
    good = sum(1 for s in done if is_good(s, slo))
    finish = {k: sum(1 for s in done if s.finish_reason == k) for k in (FINISH_STOP, FINISH_LENGTH, FINISH_OTHER)}

    def per_s(n: float) -> float | None:
        return n / duration if duration > 0 else None

    def share(n: int) -> float | None:
        return n / len(done) if done else None

    return {
        "requests": len(samples),
        "completed": len(done),
        "failed": failed,
        "error_rate": failed / len(samples) if samples else None,
        "duration_s": duration,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p95_ms": _ms(percentile(ttfts, 95)),
        "itl_p50_ms": _ms(percentile(itls, 50)),
        "itl_p95_ms": _ms(percentile(itls, 95)),
        "itl_samples": len(itls),
        "tpot_mean_ms": _ms(_mean(tpots)),
        "tpot_p50_ms": _ms(percentile(tpots, 50)),
        "e2e_p50_ms": _ms(percentile(e2es, 50)),
        "e2e_p95_ms": _ms(percentile(e2es, 95)),
        "output_tokens": tokens,
        "output_tokens_per_s": per_s(tokens) if done else None,
        "request_throughput": per_s(len(done)) if done else None,
        "good_requests": good,
        "goodput": per_s(good) if done else None,
        **finish,
        "stop_share": share(finish[FINISH_STOP]),
        "max_tokens_share": share(finish[FINISH_LENGTH]),
    }


@dataclass(frozen=True)
class SLOCheck:
    """One objective of the load gate against its measured value."""

    name: str          # the LoadSLO field, e.g. "ttft_p95_ms"
    label: str         # what a reader sees, e.g. "TTFT p95"
    measured: float | None
    bar: float
    kind: str          # "max" (measured must be <= bar) or "min" (>= bar)
    unit: str

    @property
    def passed(self) -> bool:
        """Fail closed: an objective that could not be measured is not met."""
        if self.measured is None or math.isnan(self.measured):
            return False
        return self.measured <= self.bar if self.kind == "max" else self.measured >= self.bar

    def describe(self) -> str:
        """``"TTFT p95: 6120 ms > bar 5000 ms"``: what was measured against which bar."""
        op = ">" if self.kind == "max" else "<"
        if self.measured is None:
            return f"{self.label}: not measured (no sample) vs bar {format_value(self.bar, self.unit)}"
        rel = op if not self.passed else ("<=" if self.kind == "max" else ">=")
        return f"{self.label}: {format_value(self.measured, self.unit)} {rel} bar {format_value(self.bar, self.unit)}"


def format_value(value: float, unit: str) -> str:
    """``value`` for a reader: ``%`` shares as percent, ``ms`` rounded, others with one decimal."""
    if unit == "%":
        return f"{value * 100:.1f}%"
    if unit == "ms":
        return f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms"
    return f"{value:.1f} {unit}"


def slo_checks(metrics: Mapping[str, Any], slo: LoadSLO) -> list[SLOCheck]:
    """Each objective of ``slo`` against the measured ``metrics`` (from :func:`summarize`)."""
    return [
        SLOCheck("ttft_p50_ms", "TTFT p50", metrics.get("ttft_p50_ms"), slo.ttft_p50_ms, "max", "ms"),
        SLOCheck("ttft_p95_ms", "TTFT p95", metrics.get("ttft_p95_ms"), slo.ttft_p95_ms, "max", "ms"),
        SLOCheck("itl_p95_ms", "ITL p95", metrics.get("itl_p95_ms"), slo.itl_p95_ms, "max", "ms"),
        SLOCheck("max_error_rate", "error rate", metrics.get("error_rate"), slo.max_error_rate, "max", "%"),
        SLOCheck("min_output_tokens_per_s", "output tokens/s", metrics.get("output_tokens_per_s"),
                 slo.min_output_tokens_per_s, "min", "tok/s"),
        SLOCheck("max_runaway_share", "max_tokens share", metrics.get("max_tokens_share"),
                 slo.max_runaway_share, "max", "%"),
    ]
