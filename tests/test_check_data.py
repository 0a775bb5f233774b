"""``loragate check-data``: training examples that fit, targets that would be cut.

Uses the demo build's real training data and tokenizer: at the truncated adapter's
``max_seq_length`` no example fits (the "0 of N fit" situation the demo reproduces); at the
good adapter's every example does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loragate.acceptance.data_check import DataCheckError, check_data, check_examples, load_tokenizer, read_examples
from loragate.demo.artifacts import current_build
from loragate.demo.build import BuildConfig


@pytest.fixture(scope="module")
def build(stack):
    """The demo build the stack serves (the fixture builds it when missing)."""
    b = current_build()
    assert b is not None
    return b


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loragate.cli", "check-data", *args],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_truncated_length_fits_no_example_and_exits_non_zero(build) -> None:
    config = BuildConfig()
    proc = run_cli("--data", str(build.train_data), "--tokenizer", str(build.base_dir),
                   "--max-seq-length", str(config.truncated_max_seq_length), "--json")
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    total = sum(1 for line in build.train_data.read_text().splitlines() if line.strip())
    assert result["total"] == total == config.train_examples
    assert result["fit"] == 0 and result["target_cut"] == total
    # Every prompt alone is longer than 80 tokens: no target token is ever trained.
    assert result["target_fully_cut"] == total
    assert result["prompt_tokens"]["min"] > config.truncated_max_seq_length
    # The same counts the builder recorded while training the truncated adapter.
    meta = json.loads((build.adapter_path("poster-truncated") / "loragate_training.json").read_text())
    assert (meta["examples_fit"], meta["examples_target_cut"]) == (result["fit"], result["target_fully_cut"])


def test_good_length_fits_every_example(build) -> None:
    proc = run_cli("--data", str(build.train_data), "--tokenizer", str(build.base_dir), "--max-seq-length", "512")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"fit (prompt + completion + EOS):  {BuildConfig().train_examples} of {BuildConfig().train_examples}" in proc.stdout
    assert "OK: every target fits." in proc.stdout
    # The distribution is printed: min, p50, p95, max of each length.
    assert "example tokens:    min " in proc.stdout and "p95" in proc.stdout


def test_eos_only_cut_is_counted(build) -> None:
    tokenizer = load_tokenizer(build.base_dir)
    rows = read_examples(build.train_data)[:50]
    p = tokenizer(rows[0][1])["input_ids"]
    c = tokenizer(rows[0][2], add_special_tokens=False)["input_ids"]
    # Exactly prompt + completion: the EOS is the one token that does not fit.
    result = check_examples(rows[:1], tokenizer, len(p) + len(c))
    assert (result.fit, result.target_cut, result.eos_only_cut, result.target_fully_cut) == (0, 1, 1, 0)
    assert check_examples(rows[:1], tokenizer, len(p) + len(c) + 1).ok
    assert check_examples(rows[:1], tokenizer, len(p) + len(c), add_eos=False).ok


def test_bad_input_is_a_clear_error(tmp_path: Path, build) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(DataCheckError, match=r"bad.jsonl:2: not valid JSON"):
        read_examples(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataCheckError, match=r"field 'prompt' missing.*fields found: answer, question"):
        read_examples(missing)
    assert len(read_examples(missing, "question", "answer")) == 1
    with pytest.raises(DataCheckError, match="data file not found"):
        check_data(tmp_path / "nope.jsonl", build.base_dir, 512)
    with pytest.raises(DataCheckError, match="tokenizer folder not found"):
        check_data(missing, tmp_path / "no-tokenizer", 512, prompt_field="question", completion_field="answer")
    proc = run_cli("--data", str(missing), "--tokenizer", str(build.base_dir), "--max-seq-length", "512")
    assert proc.returncode == 2 and "field 'prompt' missing" in proc.stderr
