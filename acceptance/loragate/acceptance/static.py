"""Static checks of an adapter, before any request: with peft and transformers, no hub access.

Gating (a failure rejects the adapter):

- ``static.adapter_config``: peft reads ``adapter_config.json`` (a LoRA config) and the weights
  file is there.
- ``static.engine_serves``: the engine lists the adapter, on the contract's base model, from the
  candidate's folder (not other weights under the same name).
- ``static.base_model``: the adapter's ``base_model_name_or_path`` and the contract's
  ``base_model`` name the base the engine serves (its served name or its weights' folder).
- ``static.lora_rank``: the adapter's rank ``r`` (largest of ``rank_pattern`` and of the
  weights' shapes) is within the served ``--max-lora-rank``; the report says where that limit
  was read. An unknown limit fails: the gate does not assume.
- ``static.target_modules``: every target module matches modules of the base (read from its
  safetensors names), and every LoRA weight's shape fits the base layer it adapts.
- ``static.context``: the engine's ``max_model_len`` holds the contract's longest promised
  prompt plus its ``max_tokens``.

Reported, not gating (warnings when suspicious):

- ``static.pad_eos``: ``pad_token == eos_token`` in the training metadata or the adapter's
  tokenizer, with the explanation of EOS masking.
- ``static.training_length``: the declared training length versus the served context, and the
  training metadata's count of examples whose target was cut.

Training metadata: an optional ``loragate_training.json`` beside the weights, written by the
trainer, with ``pad_token``, ``eos_token``, ``pad_masked_in_labels``, ``max_seq_length``,
``examples_total``, ``examples_fit``, ``examples_target_cut`` (any may be absent).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from loragate.acceptance.results import CheckResult
from loragate.core.contracts import Contract
from loragate.core.engine import EngineModels

#: Adapter weight files, in the order peft looks for them.
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: Optional training facts beside the weights (see the module docstring).
TRAINING_METADATA = "loragate_training.json"

EOS_MASKING_EXPLANATION = (
    "pad_token == eos_token: a collator that masks pad ids in the labels (-100, as "
    "DataCollatorForLanguageModeling does) masks every EOS label too, so the adapter is never "
    "trained to emit EOS and runs on to max_tokens. Use a distinct pad token, or make sure only "
    "padding positions are masked."
)


@dataclass(frozen=True)
class RankLimit:
    """The served ``--max-lora-rank`` and where it was read (``None`` when unknown)."""

    value: int | None
    source: str


@dataclass(frozen=True)
class StaticInputs:
    contract: Contract
    engine: EngineModels
    rank_limit: RankLimit
    #: The base model's folder (Hugging Face format); ``None``: the engine's ``root`` when local.
    base_dir: Path | None = None
    #: The candidate's folder as the engine sees it (``None``: the contract's path).
    engine_adapter_path: str | None = None


def _result(id_: str, name: str, passed: bool, summary: str, *, gating: bool = True, detail: str = "",
            warning: bool = False, measured: dict | None = None, bar: dict | None = None) -> CheckResult:
    return CheckResult(id=f"static.{id_}", phase="static", name=name, passed=passed, gating=gating,
                       summary=summary, detail=detail, warning=warning, measured=measured or {}, bar=bar)


def _same_path(a: str | os.PathLike[str] | None, b: str | os.PathLike[str] | None) -> bool:
    if not a or not b:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return str(a).rstrip("/") == str(b).rstrip("/")


def read_training_metadata(adapter_dir: Path) -> dict[str, Any] | None:
    """The adapter's ``loragate_training.json``, ``None`` when absent or unreadable."""
    try:
        data = json.loads((adapter_dir / TRAINING_METADATA).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_peft_config(adapter_dir: Path) -> Any:
    """peft's config object for the adapter folder (raises ValueError when unreadable)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(adapter_dir))


def check_adapter_config(adapter_dir: Path) -> tuple[CheckResult, Any]:
    if not adapter_dir.is_dir():
        return _result("adapter_config", "adapter config", False,
                       f"adapter config: folder {adapter_dir} does not exist"), None
    try:
        config = load_peft_config(adapter_dir)
    except Exception as exc:  # peft raises ValueError, TypeError, JSON errors, ...
        return _result("adapter_config", "adapter config", False,
                       f"adapter config: peft cannot read {adapter_dir / 'adapter_config.json'}: {exc}"), None
    peft_type = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "?")))
    weights = [name for name in WEIGHT_FILES if (adapter_dir / name).is_file()]
    if peft_type != "LORA":
        return _result("adapter_config", "adapter config", False,
                       f"adapter config: peft_type is {peft_type}, not LORA (vLLM serves LoRA adapters)"), config
    if not weights:
        return _result("adapter_config", "adapter config", False,
                       f"adapter config: no weights file ({' or '.join(WEIGHT_FILES)}) in {adapter_dir}"), config
    return _result("adapter_config", "adapter config", True,
                   f"adapter config: LoRA r={config.r}, alpha={config.lora_alpha}, weights {weights[0]}",
                   measured={"r": config.r, "lora_alpha": config.lora_alpha, "weights": weights[0],
                             "peft_version": getattr(config, "peft_version", None)}), config


def check_engine_serves(inputs: StaticInputs) -> CheckResult:
    contract, engine = inputs.contract, inputs.engine
    served = engine.get(contract.name)
    names = ", ".join(m.id for m in engine.adapters) or "none"
    if served is None:
        return _result("engine_serves", "served by the engine", False,
                       f"served by the engine: {engine.endpoint} does not serve adapter {contract.name!r} "
                       f"(adapters served: {names}); load it (--load-into-engine) or fix the name")
    if not served.is_adapter:
        return _result("engine_serves", "served by the engine", False,
                       f"served by the engine: {contract.name!r} is a base model on {engine.endpoint}, not an adapter")
    if served.parent != contract.base_model:
        return _result("engine_serves", "served by the engine", False,
                       f"served by the engine: {contract.name!r} runs on {served.parent!r}, the contract "
                       f"says {contract.base_model!r}")
    expected = inputs.engine_adapter_path or str(contract.path)
    if served.root and not _same_path(served.root, expected):
        return _result("engine_serves", "served by the engine", False,
                       f"served by the engine: {contract.name!r} is served from {served.root}, not from the "
                       f"candidate's folder {expected}: other weights answer under this name")
    return _result("engine_serves", "served by the engine", True,
                   f"served by the engine: {contract.name!r} on {served.parent!r} from {served.root or expected}")


def check_base_model(inputs: StaticInputs, peft_config: Any) -> CheckResult:
    contract, engine = inputs.contract, inputs.engine
    base = engine.get(contract.base_model)
    bases = ", ".join(m.id for m in engine.bases) or "none"
    if base is None or base.is_adapter:
        return _result("base_model", "base model", False,
                       f"base model: the contract's base {contract.base_model!r} is not served by "
                       f"{engine.endpoint} (base models served: {bases})")
    declared = getattr(peft_config, "base_model_name_or_path", None) if peft_config is not None else None
    if not declared:
        return _result("base_model", "base model", False,
                       "base model: adapter_config.json has no base_model_name_or_path; cannot tell what it was "
                       "trained on")
    accepted = {base.id}
    if base.root:
        accepted |= {base.root, base.root.rstrip("/"), Path(base.root).name}
    if declared in accepted or _same_path(declared, base.root):
        return _result("base_model", "base model", True,
                       f"base model: adapter trained on {declared!r}, engine serves {base.id!r} ({base.root})",
                       measured={"adapter": declared, "served": base.id, "served_root": base.root})
    return _result("base_model", "base model", False,
                   f"base model: adapter was trained on {declared!r}, the engine serves {base.id!r} "
                   f"from {base.root!r}", measured={"adapter": declared, "served": base.id})


def adapter_weight_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of the adapter's safetensors weights (headers only)."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def base_weight_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of the base model's safetensors (sharded or not), headers only."""
    from safetensors import safe_open

    files: list[Path]
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = sorted({base_dir / f for f in weight_map.values()})
    else:
        files = sorted(base_dir.glob("*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


def find_base_dir(inputs: StaticInputs) -> Path | None:
    if inputs.base_dir is not None:
        return inputs.base_dir
    base = inputs.engine.get(inputs.contract.base_model)
    if base is not None and base.root and (Path(base.root) / "config.json").is_file():
        return Path(base.root)
    return None


def _lora_module(name: str) -> tuple[str, str] | None:
    """``(base module, 'A'|'B')`` of a saved LoRA tensor name, else ``None``."""
    for part in ("A", "B"):
        marker = f".lora_{part}."
        if marker in name:
            module = name.split(marker, 1)[0]
            if module.startswith("base_model.model."):
                module = module[len("base_model.model."):]
            return module, part
    return None


def adapter_rank(peft_config: Any, shapes: dict[str, tuple[int, ...]]) -> int:
    """The largest LoRA rank the adapter uses: ``r``, ``rank_pattern`` and the weights' shapes."""
    ranks = [int(peft_config.r)] + [int(v) for v in (getattr(peft_config, "rank_pattern", None) or {}).values()]
    for name, shape in shapes.items():
        found = _lora_module(name)
        if found and len(shape) == 2:
            ranks.append(shape[0] if found[1] == "A" else shape[1])
    return max(ranks)


def check_lora_rank(peft_config: Any, shapes: dict[str, tuple[int, ...]], limit: RankLimit) -> CheckResult:
    rank = adapter_rank(peft_config, shapes)
    measured = {"rank": rank, "max_lora_rank": limit.value, "source": limit.source}
    if limit.value is None:
        return _result("lora_rank", "LoRA rank", False,
                       f"LoRA rank: adapter rank {rank}, but the served --max-lora-rank is unknown "
                       f"({limit.source}); pass --max-lora-rank N (the engine's setting)",
                       measured=measured, bar={"kind": "limit", "value": None})
    ok = rank <= limit.value
    verb = "within" if ok else "exceeds"
    return _result("lora_rank", "LoRA rank", ok,
                   f"LoRA rank: {rank} {verb} the served --max-lora-rank {limit.value} (from {limit.source})"
                   + ("" if ok else "; vLLM refuses to load it"),
                   measured=measured, bar={"kind": "limit", "value": limit.value})


def check_target_modules(peft_config: Any, adapter_shapes: dict[str, tuple[int, ...]],
                         base_dir: Path | None) -> CheckResult:
    if base_dir is None:
        return _result("target_modules", "target modules", False,
                       "target modules: the base model's weights are not readable here (the engine's root is "
                       "not a local folder); pass --base-dir so the gate can check them")
    try:
        base_shapes = base_weight_shapes(base_dir)
    except Exception as exc:
        return _result("target_modules", "target modules", False,
                       f"target modules: cannot read the base weights in {base_dir}: {exc}")
    if not base_shapes:
        return _result("target_modules", "target modules", False,
                       f"target modules: no safetensors weights in {base_dir}")
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = sorted({k.rsplit(".", 1)[0] for k in base_shapes if k.endswith(".weight")})
    targets = peft_config.target_modules
    missing: list[str] = []
    matched: set[str] = set()
    if isinstance(targets, str):
        matched = {m for m in modules if check_target_module_exists(peft_config, m)}
        if not matched:
            missing.append(targets)
    else:
        for target in sorted(targets or ()):
            one = dataclasses.replace(peft_config, target_modules={target})
            hits = {m for m in modules if check_target_module_exists(one, m)}
            if not hits:
                missing.append(target)
            matched |= hits
    mismatched: list[str] = []
    fan_in_fan_out = bool(getattr(peft_config, "fan_in_fan_out", False))
    for name, shape in sorted(adapter_shapes.items()):
        found = _lora_module(name)
        if not found or len(shape) != 2:
            continue
        module, part = found
        base = base_shapes.get(f"{module}.weight")
        if base is None:
            mismatched.append(f"{module} (no such layer in the base)")
            continue
        if len(base) != 2:
            continue
        out_f, in_f = (base[1], base[0]) if fan_in_fan_out else (base[0], base[1])
        if (part == "A" and shape[1] != in_f) or (part == "B" and shape[0] != out_f):
            mismatched.append(f"{module} (lora_{part} {list(shape)} vs base {list(base)})")
    measured = {"targets": sorted(targets) if not isinstance(targets, str) else targets,
                "base_modules_matched": len(matched), "missing": missing, "shape_mismatches": mismatched[:10]}
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"no module of the base matches {', '.join(missing)}")
        if mismatched:
            parts.append(f"{len(mismatched)} LoRA weight(s) do not fit the base: {'; '.join(mismatched[:3])}")
        return _result("target_modules", "target modules", False, "target modules: " + "; ".join(parts),
                       measured=measured)
    return _result("target_modules", "target modules", True,
                   f"target modules: {', '.join(measured['targets']) if isinstance(measured['targets'], list) else targets} "
                   f"match {len(matched)} layers of the base; {sum(1 for n in adapter_shapes if _lora_module(n))} "
                   "LoRA weights fit their layers", measured=measured)


def check_context(contract: Contract, engine: EngineModels) -> CheckResult:
    served = engine.max_model_len(contract.name) or engine.max_model_len(contract.base_model)
    promised = contract.max_input_tokens
    measured = {"max_model_len": served, "max_input_tokens": promised, "max_tokens": contract.max_tokens}
    if served is None:
        return _result("context", "served context", False,
                       "served context: the engine does not report max_model_len for the adapter or its base",
                       measured=measured)
    need = (promised or 0) + contract.max_tokens
    if promised is not None and need > served:
        return _result("context", "served context", False,
                       f"served context: the contract promises prompts of {promised} tokens plus {contract.max_tokens} "
                       f"output tokens ({need}), the engine's max_model_len is {served}", measured=measured,
                       bar={"kind": "limit", "value": served})
    what = f"prompts up to {promised} tokens" if promised else "the whole served context"
    return _result("context", "served context", True,
                   f"served context: max_model_len {served} holds {what} plus max_tokens {contract.max_tokens}",
                   measured=measured, bar={"kind": "limit", "value": served})


def _tokenizer_tokens(folder: Path) -> tuple[str | None, str | None] | None:
    """``(pad_token, eos_token)`` of a tokenizer saved in ``folder``, ``None`` when there is none."""
    if not (folder / "tokenizer_config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return tok.pad_token, tok.eos_token
    except Exception:
        try:
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            return None
        def text(v: Any) -> str | None:
            return v.get("content") if isinstance(v, dict) else v
        return text(cfg.get("pad_token")), text(cfg.get("eos_token"))


def check_pad_eos(adapter_dir: Path, meta: dict[str, Any] | None) -> CheckResult:
    sources: list[str] = []
    flagged: list[str] = []
    masked = bool(meta.get("pad_masked_in_labels")) if meta else False
    if meta and ("pad_token" in meta or "eos_token" in meta):
        pad, eos = meta.get("pad_token"), meta.get("eos_token")
        sources.append(f"training metadata: pad {pad!r}, eos {eos!r}"
                       + (", pad ids masked in labels" if masked else ""))
        if pad is not None and pad == eos:
            flagged.append("training metadata")
    tokens = _tokenizer_tokens(adapter_dir)
    if tokens is not None:
        pad, eos = tokens
        sources.append(f"adapter tokenizer: pad {pad!r}, eos {eos!r}")
        if pad is not None and pad == eos:
            flagged.append("adapter tokenizer")
    measured = {"flagged_in": flagged, "pad_masked_in_labels": masked if meta else None}
    if not sources:
        return _result("pad_eos", "pad token vs EOS", True, gating=False,
                       summary="pad token vs EOS: no training metadata or tokenizer beside the adapter; not checked",
                       measured=measured)
    if flagged:
        worst = " and pad ids were masked in the labels: every EOS label was masked" if masked else ""
        return _result("pad_eos", "pad token vs EOS", False, gating=False, warning=True,
                       summary=f"pad token vs EOS: pad_token == eos_token ({'; '.join(sources)}){worst}; "
                               "expect the adapter not to stop",
                       detail=EOS_MASKING_EXPLANATION, measured=measured)
    return _result("pad_eos", "pad token vs EOS", True, gating=False,
                   summary=f"pad token vs EOS: distinct ({'; '.join(sources)})", measured=measured)


def check_training_length(contract: Contract, engine: EngineModels, meta: dict[str, Any] | None) -> CheckResult:
    served = engine.max_model_len(contract.name) or engine.max_model_len(contract.base_model)
    declared = contract.train_seq_len
    meta_len = meta.get("max_seq_length") if meta else None
    total, fit, cut = ((meta.get("examples_total"), meta.get("examples_fit"), meta.get("examples_target_cut"))
                       if meta else (None, None, None))
    measured = {"contract_train_seq_len": declared, "metadata_max_seq_length": meta_len,
                "served_max_model_len": served, "max_input_tokens": contract.max_input_tokens,
                "examples_total": total, "examples_fit": fit, "examples_target_cut": cut}
    parts = []
    train_len = declared or meta_len
    if train_len:
        parts.append(f"trained at {train_len} tokens, served at {served}")
        if served and served > train_len:
            parts.append(f"inputs beyond {train_len} tokens were never seen in training: long-context probes measure them")
    else:
        parts.append(f"training length not declared (contract train_seq_len / {TRAINING_METADATA}); served at {served}")
    warning = False
    if declared and meta_len and declared != meta_len:
        parts.append(f"the contract says {declared}, the training metadata {meta_len}")
        warning = True
    if isinstance(cut, int) and cut > 0:
        of = f" of {total}" if isinstance(total, int) else ""
        parts.append(f"the training metadata reports {cut}{of} examples with their target cut "
                     f"(only {fit}{of} fit max_seq_length {meta_len}): the adapter may never have seen a "
                     "whole answer; `loragate check-data` shows the lengths")
        warning = True
    return _result("training_length", "training length", not warning, gating=False, warning=warning,
                   summary="training length: " + "; ".join(parts), measured=measured)


def _chat_template(folder: Path | None) -> str | None:
    """The chat template a tokenizer folder ships (``tokenizer_config.json`` or
    ``chat_template.jinja``), or None."""
    if folder is None:
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) else None


def check_chat_template(contract: Contract, base_dir: Path | None) -> CheckResult:
    """A chat adapter answers through the engine's chat template (the base model's). When the
    adapter folder ships a tokenizer with another template, it was trained on prompts the
    engine will never send it: a classic cause of an adapter that worked in training only.
    Reported, not gating (the behavioural checks decide)."""
    ours = _chat_template(Path(contract.path))
    served = _chat_template(base_dir)
    if ours is None:
        return _result("chat_template", "chat template", True,
                       "chat template: the adapter ships none; the engine's is used", gating=False)
    if served is None:
        return _result("chat_template", "chat template", False,
                       "chat template: the adapter ships one, but the served base model has none to compare "
                       "(the engine may format conversations differently than in training)", gating=False)
    if ours.strip() != served.strip():
        return _result("chat_template", "chat template", False,
                       "chat template: the adapter's tokenizer ships a chat template that differs from the one "
                       "the engine serves (the base model's): it was trained on conversations formatted "
                       "differently from what it will be sent", gating=False)
    return _result("chat_template", "chat template", True,
                   "chat template: the adapter's is the one the engine serves", gating=False)


def run_static_checks(inputs: StaticInputs, progress: Callable[[str], None] = lambda _: None) -> list[CheckResult]:
    """Every static check of the candidate, in order; none raises for a bad adapter."""
    contract = inputs.contract
    adapter_dir = Path(contract.path)
    progress("static: reading the adapter with peft")
    config_result, peft_config = check_adapter_config(adapter_dir)
    results = [config_result, check_engine_serves(inputs), check_context(contract, inputs.engine)]
    if peft_config is None:
        results.append(_result("base_model", "base model", False,
                               "base model: not checked, the adapter config is unreadable"))
        results.append(_result("lora_rank", "LoRA rank", False, "LoRA rank: not checked, the adapter config is unreadable"))
        results.append(_result("target_modules", "target modules", False,
                               "target modules: not checked, the adapter config is unreadable"))
    else:
        try:
            shapes = adapter_weight_shapes(adapter_dir)
        except Exception as exc:
            shapes = {}
            results.append(_result("adapter_weights", "adapter weights", False,
                                   f"adapter weights: cannot read adapter_model.safetensors: {exc}"))
        results.append(check_base_model(inputs, peft_config))
        results.append(check_lora_rank(peft_config, shapes, inputs.rank_limit))
        progress("static: matching target modules against the base weights")
        results.append(check_target_modules(peft_config, shapes, find_base_dir(inputs)))
    meta = read_training_metadata(adapter_dir)
    results.append(check_pad_eos(adapter_dir, meta))
    if contract.is_chat:
        results.append(check_chat_template(contract, find_base_dir(inputs)))
    results.append(check_training_length(contract, inputs.engine, meta))
    return results


def failed(results: Iterable[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.failed_gate]
