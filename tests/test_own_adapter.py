"""docs/own-adapter.md, done exactly as it says, with adapters the demo's build did not make.

Two adapters are trained with the demo's training code on other data (another seed's papers):
``my-good``, and ``my-runaway`` trained with ``pad_token = eos_token`` masked out of the labels.
They are laid out as the page's "What you bring" shows, with their own contracts, and every
command line of the page's bash blocks runs verbatim in that folder, against a stack of its own
(its own ``LORAGATE_HOME``), each expected to end with the exit status the page states.
Beside the page: usage mistakes exit 2 with nothing loaded, the proxy of ``loragate up
--contracts`` has JSON series for the user's adapters, and its admin key (from ``loragate
status``) lets runtime loads through the proxy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from loragate.core import settings

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "own-adapter.md"
#: Another seed than the demo's: the user's adapters are trained on papers the demo never made.
OWN_SEED = 7
#: The longest input the user's contracts promise (long-context probes up to it gate; beyond, they are
#: reported): without it the whole served context is promised, and an adapter trained at 512
#: tokens breaks long before 4096.
OWN_MAX_INPUT_TOKENS = 400
#: What the page states for a command ("exit N" in its trailing comment); 0 otherwise.
EXIT_NOTE = re.compile(r"#.*\bexit (\d)\b")


def page_commands() -> list[tuple[str, int]]:
    """Every command line of the page's ``bash`` blocks, in order, with its expected exit status."""
    commands, in_bash = [], False
    for line in PAGE.read_text().splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if in_bash and line.strip() and not line.lstrip().startswith("#"):
            note = EXIT_NOTE.search(line)
            command = line.split("  #")[0].strip()
            commands.append((command, int(note.group(1)) if note else 0))
    return commands


def _train_own_adapters(out: Path) -> None:
    """``my-good`` and ``my-runaway`` with the demo's training code, on another seed's papers."""
    from transformers import PreTrainedTokenizerFast

    from loragate.demo import build as demo_build
    from loragate.demo import data
    from loragate.demo.artifacts import current_build

    build = current_build()
    assert build is not None
    config = demo_build.BuildConfig(seed=OWN_SEED, base_docs=0, heldout_examples=40)
    _, train, heldout, _ = demo_build._corpus(config)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(build.root / "tokenizer"))
    examples = [demo_build.encode_example(tokenizer, p) for p in train]
    specs = (demo_build.AdapterSpec("my-good", pad_is_eos=False, max_seq_length_field="max_seq_length", bug="none"),
             demo_build.AdapterSpec("my-runaway", pad_is_eos=True, max_seq_length_field="max_seq_length",
                                    bug="pad_token = eos_token, pad ids masked"))
    out.mkdir(parents=True)
    for spec in specs:
        demo_build.train_adapter(config, spec, build.base_dir, tokenizer, examples, out / spec.name, lambda _: None)
        cfg = out / spec.name / "adapter_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": "my-base"}))
    contract = {"prompt_template": data.PROMPT_TEMPLATE, "output": "json", "json_schema": data.LAYOUT_SCHEMA,
                "max_tokens": config.answer_max_tokens, "train_seq_len": config.max_seq_length,
                "max_input_tokens": OWN_MAX_INPUT_TOKENS}
    (out / "adapters.yaml").write_text(yaml.safe_dump({
        "base_model": "my-base", "adapters_dir": ".",
        "adapters": {s.name: {"path": s.name, **contract} for s in specs}}, sort_keys=False))
    (out / "heldout.jsonl").write_text("".join(json.dumps({"input": p.text}) + "\n" for p in heldout))
    (out / "train.jsonl").write_text("".join(json.dumps(
        {"prompt": data.PROMPT_TEMPLATE.replace("{input}", p.text), "completion": p.layout_json}) + "\n"
        for p in train))


@pytest.fixture(scope="module")
def user_folder(stack, tmp_path_factory) -> Path:
    """The page's layout: ``my-base`` (the demo base: the same base, as the page's user has) and
    ``my-adapters`` (trained once per demo build and cached under the session's home)."""
    from loragate.demo.artifacts import current_build

    build = current_build()
    assert build is not None
    cache = settings.home() / "own-adapters" / build.root.name
    if not (cache / "heldout.jsonl").is_file():
        shutil.rmtree(cache, ignore_errors=True)
        partial = cache.with_name(cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _train_own_adapters(partial)
        partial.rename(cache)
    folder = tmp_path_factory.mktemp("user")
    shutil.copytree(cache, folder / "my-adapters")
    (folder / "my-base").symlink_to(build.base_dir, target_is_directory=True)
    return folder


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
    env["LORAGATE_HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(command: str, folder: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(shlex.split(command), cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _served(vllm_url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm_url}/v1/models", timeout=30).json()["data"]}


def test_the_page_done_verbatim_with_adapters_of_ones_own(user_folder: Path, tmp_path: Path) -> None:
    commands = page_commands()
    assert [c for c, _ in commands if c.startswith("loragate up")], "the page brings no stack up"
    home = tmp_path / "home"
    env = _env(home)
    status: dict = {}
    try:
        for command, expected in commands:
            proc = _run(command, user_folder, env)
            assert proc.returncode == expected, (command, proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
            if command.startswith("loragate up"):
                status = json.loads(_run("loragate status --json", user_folder, env).stdout)
                _beside_the_page(user_folder, env, status, tmp_path)
            if command.startswith("loragate gate"):
                if expected in (0, 1):  # a verdict, and where its reports are
                    assert "report.html" in proc.stdout, proc.stdout[-2000:]
                else:  # a usage error: said on stderr, no verdict
                    assert "error:" in proc.stderr and "REJECT" not in proc.stdout, proc.stderr[-2000:]
    finally:
        _run("loragate down", user_folder, env, timeout=120)
    assert status["vllm"]["adapters"] == ["my-good", "my-runaway"]
    promoted = json.loads((home / "promoted" / "promoted.json").read_text())
    assert set(promoted["adapters"]) == {"my-good"}, promoted


def _beside_the_page(folder: Path, env: dict[str, str], status: dict, tmp_path: Path) -> None:
    """What the page promises without a command of its own, checked on its stack."""
    proxy, vllm = status["proxy"]["url"], status["vllm"]["url"]
    served = _served(vllm)
    assert served == {"my-base", "my-good", "my-runaway"}
    # The proxy judges by the user's contracts: JSON series exist for their adapters (at 0).
    metrics = httpx.get(f"{proxy}/metrics", timeout=30).text
    for adapter in ("my-good", "my-runaway"):
        assert f'loragate_json_outputs_total{{adapter="{adapter}",result="valid"}}' in metrics, adapter
    # Usage mistakes exit 2 before anything reaches the engine.
    prompts = "--prompts my-adapters/heldout.jsonl"
    mistakes = {
        # behind a proxy that is not this home's stack, the engine's --max-lora-rank is unknown
        f"loragate gate --endpoint {proxy} --contracts my-adapters/adapters.yaml --adapter my-good {prompts}":
            ({**env, "LORAGATE_HOME": str(tmp_path / "elsewhere")}, "--max-lora-rank"),
        f"loragate gate --adapter my-good {prompts} --engine-url {vllm}": (env, "--load-into-engine"),
        "loragate gate --adapter my-good --prompts my-adapters/missing.jsonl": (env, "missing.jsonl"),
    }
    for command, (mistake_env, named) in mistakes.items():
        proc = _run(command, folder, mistake_env)
        assert proc.returncode == 2 and named in proc.stderr, (command, proc.returncode, proc.stderr[-2000:])
    assert _served(vllm) == served
    # The admin key `loragate status` shows lets a runtime load through the proxy; nothing else does.
    key = status["proxy"]["admin_key"]
    assert key
    shutil.copytree(folder / "my-adapters" / "my-good", folder / "my-adapters" / "my-late")
    body = {"lora_name": "my-late", "lora_path": "my-late"}
    assert httpx.post(f"{proxy}/v1/load_lora_adapter", json=body, timeout=60).status_code in (401, 403)
    loaded = httpx.post(f"{proxy}/v1/load_lora_adapter", json=body, timeout=120,
                        headers={"Authorization": f"Bearer {key}"})
    assert loaded.status_code == 200, loaded.text
    assert "my-late" in _served(vllm)
    unloaded = httpx.post(f"{proxy}/v1/unload_lora_adapter", json={"lora_name": "my-late"}, timeout=60,
                          headers={"Authorization": f"Bearer {key}"})
    assert unloaded.status_code == 200, unloaded.text
    assert _served(vllm) == served
