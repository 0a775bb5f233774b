"""Diagnosis: *why* an adapter fails, from the engine's own likelihoods, in seconds.

For a held-out prompt with a reference answer, one scoring request to the engine on
``prompt + reference + stop token`` (lm-eval's form: ``echo: true, max_tokens: 0, logprobs: 1``)
gives, for one model:

- **p(stop)**: the probability of the token that ends a complete answer, right after the
  reference (for completions the tokenizer's EOS; for chat the first token the chat template puts
  after an assistant turn, e.g. ``</s>`` or ``<|im_end|>``). An adapter that never learned to stop
  keeps the base model's tiny value; one that did puts it near the top.
- **reference NLL**: the mean negative log-likelihood, nats per token, of the reference answer's
  tokens. An adapter that learned the answer has it well below the base model's; one trained on
  targets cut away stays near the base.

Each is measured for the candidate, the base model and the promoted adapter (when one is
served), and decided with 95% intervals over prompts against bars in
:class:`~loragate.core.contracts.Thresholds` (``diagnosis_*``):

- ``answer never learned``: the candidate's mean NLL gain over the base is, with 95% confidence,
  under ``diagnosis_min_gain_share`` of the promoted adapter's gain (or, with none promoted,
  under ``diagnosis_min_nll_gain``). Usual cause: targets cut in training (run ``check-data``).
- ``EOS never learned``: the mean log10 p(stop) is, with 95% confidence, under
  ``diagnosis_min_eos_probability``. Usual cause: ``pad_token == eos_token`` with a collator that
  masks pad ids. (An adapter that never learned the answer never saw its end either: that finding
  comes first.)

The tokens are the engine's: the prompt and the prompt+reference are tokenised by the engine's
``/tokenize`` (the chat template applied by the engine for chat), the stop token id is appended
to the ids, and the scoring request sends token ids, whose echo the engine returns; the answer's
span is where the two tokenisations part, so a last prompt token that merges with the answer's
first character counts to the answer, and nothing is ever re-tokenised on this side. An engine
that does not return prompt log-probabilities gives "diagnosis not available".

References come from the prompts file's ``expected`` (text, or JSON serialised per the
contract's ``target_json_format``), else from the promoted adapter's greedy answers when it
stops (the report says which).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import httpx

from loragate.core import engine as eng
from loragate.core.contracts import Contract
from loragate.core.stats import MeanInterval, mean_interval

#: Held-out prompts a diagnosis scores (each: one scoring request per model, three models).
DEFAULT_DIAGNOSIS_PROMPTS = 16
#: Scoring requests in flight at once.
DIAGNOSIS_CONCURRENCY = 1
#: Per request (scoring one prompt is one forward pass).
REQUEST_TIMEOUT_S = 60.0

#: Finding ids, in the order reasons name them.
ANSWER_NOT_LEARNED = "answer_not_learned"
EOS_NOT_LEARNED = "eos_not_learned"

USUAL_CAUSES = {
    ANSWER_NOT_LEARNED: "usual cause: training targets cut off (sequences longer than max_seq_length, the "
                        "answer after the input) - run loragate check-data",
    EOS_NOT_LEARNED: "usual cause: pad_token == eos_token with a collator masking pad ids to -100, so no EOS "
                     "label was ever trained",
}


class DiagnosisUnavailable(Exception):
    """The diagnosis cannot be made (no references, no stop token, no prompt log-probabilities)."""


@dataclass(frozen=True)
class Reference:
    """One held-out prompt (a plan prompt: rendered text, or a chat conversation as a JSON array)
    and the complete answer it should get."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Scoring:
    """What the engine will score: the token ids of prompt + answer + stop token, and where the
    answer lies in them (``ids[start:end]``; ``ids[end]`` is the stop token)."""

    ids: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Score:
    """One model on one reference."""

    stop_logprob: float
    stop_top1: bool
    nll: float
    answer_tokens: int


@dataclass
class ModelSummary:
    """One model over every reference."""

    role: str  # candidate | base | promoted
    model: str
    scores: list[Score]

    @property
    def log10_stop(self) -> list[float]:
        return [s.stop_logprob / math.log(10) for s in self.scores]

    @property
    def median_stop_p(self) -> float:
        return 10 ** statistics.median(self.log10_stop)

    @property
    def nll(self) -> list[float]:
        return [s.nll for s in self.scores]

    def to_dict(self) -> dict[str, Any]:
        lp = mean_interval(self.log10_stop)
        nll = mean_interval(self.nll)
        return {"role": self.role, "model": self.model, "n": len(self.scores),
                "stop_p_median": float(f"{self.median_stop_p:.3g}"),
                "stop_log10_p": lp.to_dict(),
                "stop_top1_share": round(sum(s.stop_top1 for s in self.scores) / len(self.scores), 4),
                "nll": nll.to_dict(), "nll_median": round(statistics.median(self.nll), 4),
                "per_prompt": [{"stop_p": float(f"{math.exp(s.stop_logprob):.3g}"), "nll": round(s.nll, 4),
                                "answer_tokens": s.answer_tokens} for s in self.scores]}


@dataclass
class Diagnosis:
    """The diagnosis of one adapter: per-model numbers and what they say."""

    available: bool
    reason: str = ""  # why not available
    reference_source: str = ""
    stop_token: str = ""
    models: list[ModelSummary] = field(default_factory=list)
    #: ``(finding id, sentence with the numbers)``, causes first.
    findings: list[tuple[str, str]] = field(default_factory=list)
    #: Interval behind each decision, for the report.
    evidence: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def model(self, role: str) -> ModelSummary | None:
        return next((m for m in self.models if m.role == role), None)

    def to_dict(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason, "reference_source": self.reference_source,
                "stop_token": self.stop_token, "models": [m.to_dict() for m in self.models],
                "findings": [{"id": f, "text": t} for f, t in self.findings], "evidence": self.evidence,
                "seconds": round(self.seconds, 2)}


# --------------------------------------------------------------------------- the engine's tokens


def _post(client: httpx.Client, url: str, body: Mapping[str, Any]) -> Any:
    try:
        resp = client.post(url, json=body, timeout=REQUEST_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise eng.EndpointError(f"POST {url} failed ({type(exc).__name__}: {exc})") from None
    if resp.status_code != 200:
        raise eng.EndpointError(f"POST {url} answered HTTP {resp.status_code}: {resp.text[:300]}")
    try:
        return resp.json()
    except ValueError:
        raise eng.EndpointError(f"POST {url}: the answer is not JSON") from None


def _tokens(client: httpx.Client, endpoint: str, body: Mapping[str, Any]) -> list[int]:
    data = _post(client, f"{endpoint}/tokenize", body)
    ids = data.get("tokens") if isinstance(data, Mapping) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise eng.EndpointError(f"POST {endpoint}/tokenize: no token ids in the answer")
    return ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def eos_token_text(folders: Sequence[Path | None]) -> str | None:
    """The EOS token's text from the first ``tokenizer_config.json`` among ``folders``."""
    for folder in folders:
        if folder is None or not (Path(folder) / "tokenizer_config.json").is_file():
            continue
        try:
            config = json.loads((Path(folder) / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        eos = config.get("eos_token")
        if isinstance(eos, Mapping):
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def engine_eos_id(client: httpx.Client, endpoint: str, model: str, eos_text: str) -> int:
    """The engine's id for ``eos_text``, which must be one token."""
    ids = _tokens(client, endpoint, {"model": model, "prompt": eos_text, "add_special_tokens": False})
    if len(ids) != 1:
        raise DiagnosisUnavailable(f"the EOS token {eos_text!r} is {len(ids)} tokens for the engine, not one")
    return ids[0]


def completion_scoring(client: httpx.Client, endpoint: str, model: str, prompt: str, answer: str,
                       eos_id: int) -> Scoring:
    """Token ids of a completions prompt + answer + EOS, as the engine tokenises them."""
    prompt_ids = _tokens(client, endpoint, {"model": model, "prompt": prompt})
    full = _tokens(client, endpoint, {"model": model, "prompt": prompt + answer})
    start = _common_prefix(prompt_ids, full)
    if start == len(full):
        raise DiagnosisUnavailable("a reference answer is empty in tokens")
    return Scoring(tuple(full) + (eos_id,), start, len(full))


def chat_scoring(client: httpx.Client, endpoint: str, model: str, messages: list[dict[str, Any]], answer: str,
                 eos_id: int | None) -> Scoring:
    """Token ids of a conversation + assistant answer + the token the chat template puts after an
    assistant turn (else EOS), with the engine's chat template applied."""
    prompt_ids = _tokens(client, endpoint, {"model": model, "messages": messages, "add_generation_prompt": True})
    turn = [*messages, {"role": "assistant", "content": answer}]
    open_ = _tokens(client, endpoint, {"model": model, "messages": turn, "add_generation_prompt": False,
                                       "continue_final_message": True})
    closed = _tokens(client, endpoint, {"model": model, "messages": turn, "add_generation_prompt": False})
    start = _common_prefix(prompt_ids, open_)
    if start == len(open_):
        raise DiagnosisUnavailable("a reference answer is empty in tokens")
    if len(closed) > len(open_) and closed[:len(open_)] == open_:
        stop = closed[len(open_)]
    elif eos_id is not None:
        stop = eos_id
    else:
        raise DiagnosisUnavailable("the chat template puts nothing after an assistant turn and the EOS token "
                                   "is not known")
    return Scoring(tuple(open_) + (stop,), start, len(open_))


def score(client: httpx.Client, endpoint: str, model: str, scoring: Scoring) -> Score:
    """One scoring request: the log-probability of every token of ``scoring.ids`` given the ones
    before it, as the engine computed it on exactly those ids."""
    body = {"model": model, "prompt": list(scoring.ids), "echo": True, "max_tokens": 0, "logprobs": 1,
            "temperature": 0, "return_tokens_as_token_ids": True}
    data = _post(client, f"{endpoint}/v1/completions", body)
    try:
        logprobs = data["choices"][0]["logprobs"]
        token_logprobs = logprobs["token_logprobs"]
        tokens = logprobs["tokens"]
        top = logprobs.get("top_logprobs") or []
    except (KeyError, IndexError, TypeError):
        raise DiagnosisUnavailable("the engine returned no prompt log-probabilities (echo with logprobs)") from None
    echoed = [_token_id(t) for t in tokens]
    if echoed != list(scoring.ids):
        raise eng.EndpointError(f"the engine scored other tokens than it was sent ({len(echoed)} echoed, "
                                f"{len(scoring.ids)} sent)")
    answer = token_logprobs[scoring.start:scoring.end]
    stop = token_logprobs[scoring.end]
    if stop is None or any(v is None for v in answer):
        raise DiagnosisUnavailable("the engine left prompt log-probabilities out")
    best = top[scoring.end] if scoring.end < len(top) and isinstance(top[scoring.end], Mapping) else {}
    top1 = bool(best) and _token_id(max(best, key=lambda k: best[k])) == scoring.ids[scoring.end]
    return Score(stop_logprob=float(stop), stop_top1=top1, nll=-sum(answer) / len(answer), answer_tokens=len(answer))


def _token_id(token: Any) -> int:
    """``token_id:123`` (``return_tokens_as_token_ids``) to 123."""
    if isinstance(token, str) and token.startswith("token_id:"):
        return int(token[len("token_id:"):])
    raise DiagnosisUnavailable(f"the engine did not return token ids ({token!r})")


# --------------------------------------------------------------------------- references


def references_from_expected(contract: Contract, records: Sequence[Any], limit: int) -> list[Reference]:
    """Held-out records (``prompt``, ``expected``) that carry a reference answer."""
    out: list[Reference] = []
    for record in records:
        if record.expected is not None and len(out) < limit:
            answer = contract.reference_text(record.expected)
            if answer:
                out.append(Reference(record.prompt, answer))
    return out


def references_from_model(client: httpx.Client, endpoint: str, contract: Contract, model: str,
                          prompts: Sequence[str]) -> list[Reference]:
    """The greedy answers of ``model`` that stopped (finish_reason ``stop``), as references."""
    from loragate.acceptance.prompts import chat_messages

    def one(prompt: str) -> Reference | None:
        if contract.is_chat:
            data = _post(client, f"{endpoint}/v1/chat/completions", {
                "model": model, "messages": chat_messages(prompt), "max_tokens": contract.max_tokens,
                "temperature": 0})
            choice = data["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
        else:
            data = _post(client, f"{endpoint}/v1/completions", {
                "model": model, "prompt": prompt, "max_tokens": contract.max_tokens, "temperature": 0})
            choice = data["choices"][0]
            text = choice.get("text") or ""
        return Reference(prompt, text) if choice.get("finish_reason") == "stop" and text else None

    with ThreadPoolExecutor(DIAGNOSIS_CONCURRENCY) as pool:
        return [r for r in pool.map(one, prompts) if r is not None]


# --------------------------------------------------------------------------- the diagnosis


def _p(log10_p: float) -> str:
    return f"{10 ** log10_p:.1g}"


def decide(contract: Contract, candidate: ModelSummary, base: ModelSummary | None,
           promoted: ModelSummary | None) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Findings (causes first) and the intervals behind them (see the module docstring)."""
    t = contract.thresholds
    findings: list[tuple[str, str]] = []
    evidence: dict[str, Any] = {}
    answer_missing = False
    if base is not None and len(base.scores) == len(candidate.scores):
        gain = mean_interval([b - c for b, c in zip(base.nll, candidate.nll)])
        evidence["nll_gain_over_base"] = gain.to_dict()
        if promoted is not None and len(promoted.scores) == len(candidate.scores):
            promoted_gain = statistics.fmean(b - p for b, p in zip(base.nll, promoted.nll))
            bar = t.diagnosis_min_gain_share * promoted_gain
            evidence["nll_gain_bar"] = {"value": round(bar, 4), "from": f"{t.diagnosis_min_gain_share:g} x the "
                                        f"promoted adapter's gain {promoted_gain:.3f}"}
            answer_missing = promoted_gain > 0 and gain.high < bar
        else:
            bar = t.diagnosis_min_nll_gain
            evidence["nll_gain_bar"] = {"value": bar, "from": "diagnosis_min_nll_gain"}
            answer_missing = gain.high < bar
        if answer_missing:
            vs = f"base {statistics.fmean(base.nll):.2f}"
            if promoted is not None:
                vs += f" and promoted {statistics.fmean(promoted.nll):.2f}"
            findings.append((ANSWER_NOT_LEARNED, (
                f"answer never learned: reference NLL {statistics.fmean(candidate.nll):.2f} nats/token vs {vs}, "
                f"gain over the base {gain.mean:.2f} [95% CI {gain.low:.2f} to {gain.high:.2f}] under the bar "
                f"{bar:.2f}; {USUAL_CAUSES[ANSWER_NOT_LEARNED]}")))
    stop = mean_interval(candidate.log10_stop)
    bar_log10 = math.log10(t.diagnosis_min_eos_probability)
    evidence["stop_log10_p"] = {**stop.to_dict(), "bar": round(bar_log10, 4)}
    if stop.high < bar_log10:
        parts = [f"p(EOS) after a complete answer {candidate.median_stop_p:.1g}"]
        if base is not None:
            parts.append(f"like the base's {base.median_stop_p:.1g}" if abs(
                statistics.median(candidate.log10_stop) - statistics.median(base.log10_stop)) < 2
                else f"base {base.median_stop_p:.1g}")
        text = "EOS never learned: " + ", ".join(parts)
        if promoted is not None:
            text += f" (promoted: {promoted.median_stop_p:.1g})"
        text += f"; 95% CI of its geometric mean {_p(stop.low)} to {_p(stop.high)} under the bar " \
                f"{t.diagnosis_min_eos_probability:g}"
        if answer_missing:
            text += " (it never saw the end of an answer either)"
        else:
            text += f"; {USUAL_CAUSES[EOS_NOT_LEARNED]}"
        findings.append((EOS_NOT_LEARNED, text))
    return findings, evidence


def diagnose(contract: Contract, endpoint: str, references: Sequence[Reference], *, reference_source: str,
             promoted: str | None = None, eos_text: str | None = None, api_key: str | None = None,
             progress: Callable[[str], None] = lambda _: None) -> Diagnosis:
    """Score ``references`` for the candidate (``contract.name``), its base model and ``promoted``;
    decide. Never raises for an engine that cannot score: the diagnosis is then not available."""
    from loragate.acceptance.prompts import chat_messages

    t0 = time.monotonic()
    if not references:
        return Diagnosis(False, reason="no reference answers (no `expected` in the prompts file and no promoted "
                                       "adapter's stopped greedy answers)", seconds=time.monotonic() - t0)
    endpoint = eng.normalize_endpoint(endpoint)
    client = httpx.Client(headers=eng.auth_headers(api_key))
    try:
        eos_id = engine_eos_id(client, endpoint, contract.name, eos_text) if eos_text else None
        if eos_id is None and not contract.is_chat:
            raise DiagnosisUnavailable("the EOS token is not known (no tokenizer_config.json beside the adapter "
                                       "or in the base model's folder)")
        progress(f"diagnosis: tokenising {len(references)} references with the engine")

        def plan(ref: Reference) -> Scoring:
            if contract.is_chat:
                return chat_scoring(client, endpoint, contract.name, chat_messages(ref.prompt), ref.answer, eos_id)
            assert eos_id is not None
            return completion_scoring(client, endpoint, contract.name, ref.prompt, ref.answer, eos_id)

        with ThreadPoolExecutor(DIAGNOSIS_CONCURRENCY) as pool:
            scorings = list(pool.map(plan, references))
            roles = [("candidate", contract.name), ("base", contract.base_model)]
            if promoted and promoted != contract.name:
                roles.append(("promoted", promoted))
            progress(f"diagnosis: scoring {len(scorings)} references on {', '.join(m for _, m in roles)}")
            summaries = []
            for role, model in roles:
                scores = list(pool.map(lambda s, m=model: score(client, endpoint, m, s), scorings))
                summaries.append(ModelSummary(role, model, scores))
        stop_id = scorings[0].ids[scorings[0].end]
        stop_text = "".join(_post(client, f"{endpoint}/detokenize", {"model": contract.name, "tokens": [stop_id]})
                            .get("prompt", "")) if stop_id is not None else ""
    except (DiagnosisUnavailable, eng.EndpointError) as exc:
        return Diagnosis(False, reason=str(exc), reference_source=reference_source, seconds=time.monotonic() - t0)
    finally:
        client.close()
    by_role = {m.role: m for m in summaries}
    findings, evidence = decide(contract, by_role["candidate"], by_role.get("base"), by_role.get("promoted"))
    return Diagnosis(True, reference_source=reference_source, stop_token=stop_text, models=summaries,
                     findings=findings, evidence=evidence, seconds=time.monotonic() - t0)


# --------------------------------------------------------------------------- the gate's phase


def diagnose_adapter(contract: Contract, endpoint: str, prompts: Path, models: eng.EngineModels, *,
                     baseline: Any, base_dir: Path | None = None, api_key: str | None = None,
                     limit: int = DEFAULT_DIAGNOSIS_PROMPTS,
                     progress: Callable[[str], None] = lambda _: None) -> Diagnosis:
    """The diagnosis of ``contract``'s adapter on the first ``limit`` held-out prompts of
    ``prompts``: references from their ``expected``, else the promoted adapter's stopped greedy
    answers; compared with the base and, when the baseline is a served adapter, with it."""
    from loragate.acceptance.prompts import read_prompts

    endpoint = eng.normalize_endpoint(endpoint)
    promoted = baseline.model if getattr(baseline, "kind", None) == "promoted" else None
    records = read_prompts(prompts, contract)
    references = references_from_expected(contract, records, limit)
    source = f"the prompts file's expected answers ({prompts.name})"
    if not references and promoted:
        progress(f"diagnosis: no expected answers; taking {promoted}'s greedy answers as references")
        with httpx.Client(headers=eng.auth_headers(api_key)) as client:
            try:
                references = references_from_model(client, endpoint, contract, promoted,
                                                   [r.prompt for r in records[:limit]])
            except (eng.EndpointError, KeyError, IndexError, TypeError) as exc:
                return Diagnosis(False, reason=f"reference answers from {promoted}: {exc}")
        source = f"{promoted}'s greedy answers that stopped ({len(references)} of {min(limit, len(records))})"
    base = models.get(contract.base_model)
    folders = [contract.path, base_dir, Path(base.root) if base is not None and base.root else None]
    return diagnose(contract, endpoint, references, reference_source=source, promoted=promoted,
                    eos_text=eos_token_text(folders), api_key=api_key, progress=progress)


def diagnosis_checks(contract: Contract, diagnosis: Diagnosis) -> list[Any]:
    """The diagnosis as the gate's checks: one per finding (gating only with the contract's
    ``gate_on_diagnosis``), or one saying nothing was found, or that it was not available."""
    from loragate.acceptance.results import CheckResult

    gating = contract.gate_on_diagnosis
    if not diagnosis.available:
        return [CheckResult(id="diagnosis.available", phase="diagnosis", name="diagnosis", passed=not gating,
                            gating=gating, warning=not gating,
                            summary=f"diagnosis not available: {diagnosis.reason}")]
    candidate = diagnosis.model("candidate")
    assert candidate is not None
    measured = {"stop_p_median": float(f"{candidate.median_stop_p:.3g}"),
                "nll_mean": round(statistics.fmean(candidate.nll), 4), **diagnosis.evidence}
    if not diagnosis.findings:
        numbers = [f"p(EOS) after a complete answer {candidate.median_stop_p:.1g}",
                   f"reference NLL {statistics.fmean(candidate.nll):.2f}"]
        base = diagnosis.model("base")
        if base is not None:
            numbers[-1] += f" (base {statistics.fmean(base.nll):.2f})"
        return [CheckResult(id="diagnosis.causes", phase="diagnosis", name="diagnosis", passed=True, gating=gating,
                            summary="diagnosis: no cause found (" + ", ".join(numbers) + ")", measured=measured)]
    return [CheckResult(id=f"diagnosis.{finding}", phase="diagnosis", name="diagnosis", passed=False, gating=gating,
                        warning=not gating, summary=text, measured=measured)
            for finding, text in diagnosis.findings]


# --------------------------------------------------------------------------- views


def render_table(adapter: str, diagnosis: Diagnosis) -> str:
    """The diagnosis for a terminal: per model p(stop) and reference NLL, then the findings."""
    if not diagnosis.available:
        return f"diagnosis of {adapter}: not available: {diagnosis.reason}"
    lines = [f"diagnosis of {adapter}: references: {diagnosis.reference_source}; stop token {diagnosis.stop_token!r}",
             f"{'role':10} {'model':28} {'p(stop) median':>15} {'stop top-1':>10} {'NLL mean [95% CI]':>26}"]
    for m in diagnosis.models:
        nll = mean_interval(m.nll)
        top1 = sum(s.stop_top1 for s in m.scores)
        lines.append(f"{m.role:10} {m.model:28} {m.median_stop_p:>15.2g} {f'{top1}/{len(m.scores)}':>10} "
                     f"{f'{nll.mean:.3f} [{nll.low:.3f}-{nll.high:.3f}]':>26}")
    for _, text in diagnosis.findings or [("", "no cause found")]:
        lines.append(f"  {text}")
    lines.append(f"time: {diagnosis.seconds:.1f}s")
    return "\n".join(lines)
