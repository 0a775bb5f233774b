"""Static checks on the demo build's real adapters and base weights, against a described engine."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path


from loragate.acceptance.static import RankLimit, StaticInputs, run_static_checks
from loragate.core.engine import EngineModels, ServedModel


def engine_for(build, contracts, *, base_name: str = "loragate-demo-base", roots: dict | None = None,
               max_model_len: int = 4096) -> EngineModels:
    models = [ServedModel(base_name, str(build.base_dir), None, max_model_len)]
    for c in contracts:
        models.append(ServedModel(c.name, str((roots or {}).get(c.name, c.path)), base_name, None))
    return EngineModels("http://engine", tuple(models))


def by_id(results) -> dict:
    return {r.id.split(".", 1)[1]: r for r in results}


def static(build, contracts, name: str, *, limit: RankLimit = RankLimit(8, "test"), **kw):
    contract = kw.pop("contract", None) or contracts[name]
    engine = kw.pop("engine", None) or engine_for(build, contracts)
    return by_id(run_static_checks(StaticInputs(contract=contract, engine=engine, rank_limit=limit, **kw)))


def test_good_adapter_passes_every_gating_static_check(build, contracts) -> None:
    results = static(build, contracts, "poster-good")
    failing = [r.summary for r in results.values() if r.failed_gate]
    assert not failing
    assert results["target_modules"].measured["base_modules_matched"] == 14  # 7 projections x 2 layers
    assert results["lora_rank"].measured == {"rank": 8, "max_lora_rank": 8, "source": "test"}
    assert not results["pad_eos"].warning
    assert "trained at 512 tokens, served at 4096" in results["training_length"].summary


def test_pad_equal_to_eos_is_flagged_with_the_explanation(build, contracts) -> None:
    results = static(build, contracts, "poster-eos-masked")
    pad = results["pad_eos"]
    assert pad.warning and not pad.gating
    assert "pad_token == eos_token" in pad.summary and "every EOS label was masked" in pad.summary
    assert "never trained to emit EOS" in pad.detail


def test_cut_targets_in_training_metadata_are_reported(build, contracts) -> None:
    length = static(build, contracts, "poster-truncated")["training_length"]
    assert length.warning and not length.gating
    assert "2400 of 2400 examples with their target cut" in length.summary
    assert "trained at 80 tokens, served at 4096" in length.summary


def test_rank_over_the_served_limit_or_unknown_fails(build, contracts) -> None:
    over = static(build, contracts, "poster-good", limit=RankLimit(1, "--max-lora-rank"))["lora_rank"]
    assert over.failed_gate and "8 exceeds the served --max-lora-rank 1 (from --max-lora-rank)" in over.summary
    unknown = static(build, contracts, "poster-good", limit=RankLimit(None, "nowhere"))["lora_rank"]
    assert unknown.failed_gate and "pass --max-lora-rank" in unknown.summary


def copy_adapter(build, tmp_path: Path, edit) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(build.adapter_path("poster-good"), target)
    cfg = json.loads((target / "adapter_config.json").read_text())
    edit(cfg)
    (target / "adapter_config.json").write_text(json.dumps(cfg))
    return target


def test_target_module_missing_from_the_base_fails(build, contracts, tmp_path: Path) -> None:
    path = copy_adapter(build, tmp_path, lambda cfg: cfg.update(target_modules=["q_proj", "c_attn"]))
    contract = dataclasses.replace(contracts["poster-good"], path=path)
    engine = engine_for(build, contracts, roots={"poster-good": path})
    result = static(build, contracts, "poster-good", contract=contract, engine=engine)["target_modules"]
    assert result.failed_gate and "no module of the base matches c_attn" in result.summary


def test_weights_that_do_not_fit_the_base_fail(build, contracts, tmp_path: Path) -> None:
    # A base with other layer sizes: same module names, different shapes.
    base = tmp_path / "base"
    base.mkdir()
    import torch
    from safetensors.torch import save_file

    save_file({f"model.layers.{i}.{m}.weight": torch.zeros(64, 64)
               for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
              str(base / "model.safetensors"))
    result = static(build, contracts, "poster-good", base_dir=base)["target_modules"]
    assert result.failed_gate and "LoRA weight(s) do not fit the base" in result.summary


def test_other_base_model_fails(build, contracts, tmp_path: Path) -> None:
    path = copy_adapter(build, tmp_path, lambda cfg: cfg.update(base_model_name_or_path="meta-llama/Llama-3.1-8B"))
    contract = dataclasses.replace(contracts["poster-good"], path=path)
    engine = engine_for(build, contracts, roots={"poster-good": path})
    result = static(build, contracts, "poster-good", contract=contract, engine=engine)["base_model"]
    assert result.failed_gate and "trained on 'meta-llama/Llama-3.1-8B'" in result.summary
    served_other = engine_for(build, contracts, base_name="some-other-base")
    result = static(build, contracts, "poster-good", engine=served_other)["base_model"]
    assert result.failed_gate and "is not served" in result.summary


def test_engine_serving_other_weights_under_the_name_fails(build, contracts) -> None:
    engine = engine_for(build, contracts, roots={"poster-good": build.adapter_path("poster-eos-masked")})
    result = static(build, contracts, "poster-good", engine=engine)["engine_serves"]
    assert result.failed_gate and "other weights answer under this name" in result.summary
    missing = EngineModels("http://engine", (ServedModel("loragate-demo-base", str(build.base_dir), None, 4096),))
    result = static(build, contracts, "poster-good", engine=missing)["engine_serves"]
    assert result.failed_gate and "does not serve adapter 'poster-good'" in result.summary


def test_unreadable_adapter_config_and_short_context_fail(build, contracts, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    contract = dataclasses.replace(contracts["poster-good"], path=broken)
    results = static(build, contracts, "poster-good", contract=contract,
                     engine=engine_for(build, contracts, roots={"poster-good": broken}))
    assert results["adapter_config"].failed_gate and "peft cannot read" in results["adapter_config"].summary
    assert results["lora_rank"].failed_gate and results["target_modules"].failed_gate
    short = static(build, contracts, "poster-good", engine=engine_for(build, contracts, max_model_len=700))["context"]
    assert short.failed_gate and "promises prompts of 600 tokens plus 160" in short.summary
