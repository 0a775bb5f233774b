"""``loragate check-data``: training examples that fit, targets that would be cut.

Uses the demo build's real training data and tokenizer: at the truncated adapter's
``max_seq_length`` no example fits (the "0 of N fit" situation the demo reproduces); at the
good adapter's every example does. The tests of the formats (prompt/completion, Alpaca,
conversational ``messages`` and prompt/completion, ``--packing``, detection) need no engine:
they build their data in tmp_path and use the demo build's tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loragate.acceptance.data_check import (
    DataCheckError,
    alpaca_prompt,
    check_data,
    check_examples,
    load_tokenizer,
    read_data,
    read_examples,
)
from loragate.demo.artifacts import current_pointer
from loragate.demo.build import BuildConfig


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


# --------------------------------------------------------------------------- formats
# The tests below need no engine and no running stack: data files are built in tmp_path and
# tokenized with the demo build's tokenizer (read from LORAGATE_HOME, never changed: the
# conversational tests use a copy with a chat template that renders assistant turns).

#: Assistant turns end with EOS and a newline, like ``<|im_end|>\n`` in common templates.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}### Assistant:\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


@pytest.fixture(scope="module")
def demo_tokenizer() -> Path:
    """The demo build's tokenizer folder (``base/`` of the build ``current`` names), read-only."""
    pointer = current_pointer()
    assert pointer.is_file(), f"no demo build at {pointer.parent}: run `loragate build-demo` first"
    folder = pointer.parent / pointer.read_text().strip() / "base"
    assert (folder / "tokenizer.json").is_file(), f"no tokenizer in {folder}: run `loragate build-demo` first"
    return folder


def _copy_tokenizer(source: Path, target: Path, chat_template: str) -> Path:
    target.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())
    (target / "chat_template.jinja").write_text(chat_template)
    return target


@pytest.fixture(scope="module")
def chat_tokenizer(demo_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo tokenizer whose chat template renders user, system and assistant turns."""
    return _copy_tokenizer(demo_tokenizer, tmp_path_factory.mktemp("chat-tokenizer") / "tok", CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def chat_tok(chat_tokenizer: Path):
    return load_tokenizer(chat_tokenizer)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ids(tok, text: str, bos: bool = False) -> list[int]:
    return tok(text, add_special_tokens=bos)["input_ids"]


def _chat_len(tok, messages: list[dict], generation_prompt: bool = False) -> int:
    return len(_ids(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)))


def test_format_prompt_completion_strings(tmp_path: Path, demo_tokenizer: Path) -> None:
    tok = load_tokenizer(demo_tokenizer)
    rows = [{"prompt": "Title: A short one", "completion": "x y z"},
            {"prompt": "Title: " + "the model " * 20, "completion": "a longer completion here"}]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    p = [len(_ids(tok, r["prompt"], bos=True)) for r in rows]
    c = [len(_ids(tok, r["completion"])) for r in rows]
    length = p[1] + 2  # the first fits with its EOS; the second keeps 2 target tokens of its completion
    assert p[0] + c[0] + 1 <= length < p[1] + c[1] + 1
    result = check_data(data, demo_tokenizer, length)
    assert (result.format, result.total, result.fit, result.target_cut, result.target_fully_cut) == \
        ("prompt-completion", 2, 1, 1, 0)
    assert result.target_tokens == c[0] + c[1] + 2
    assert result.target_tokens_cut == p[1] + c[1] + 1 - length
    assert result.needed_max_seq_length == p[1] + c[1] + 1
    assert result.conversation is None and result.packing is None
    assert result.summary().splitlines()[0] == \
        "format: prompt-completion (detected from the keys prompt/completion; --format to force)"
    # Other field names still work, and are what the format is detected from.
    renamed = write_jsonl(tmp_path / "qa.jsonl", [{"question": r["prompt"], "answer": r["completion"]} for r in rows])
    again = check_data(renamed, demo_tokenizer, length, prompt_field="question", completion_field="answer")
    assert (again.fit, again.target_cut) == (1, 1)
    assert again.format_origin == "detected from the keys question/answer; --format to force"


def test_format_alpaca(tmp_path: Path, demo_tokenizer: Path) -> None:
    assert alpaca_prompt("Do it.", "the input") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo it.\n\n### Input:\nthe input\n\n### Response:\n")
    assert alpaca_prompt("Do it.") == alpaca_prompt("Do it.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo it.\n\n### Response:\n")
    rows = [{"instruction": "Lay out the paper.", "input": "Title: A", "output": "x y z"},
            {"instruction": "Say hello.", "input": "", "output": "hello"}]
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    dataset = read_data(data)
    assert dataset.format == "alpaca"
    assert dataset.origin == "detected from the keys instruction/input/output; --format to force"
    assert [r[1:] for r in dataset.rows] == [(alpaca_prompt("Lay out the paper.", "Title: A"), "x y z"),
                                             (alpaca_prompt("Say hello."), "hello")]
    tok = load_tokenizer(demo_tokenizer)
    sizes = [len(_ids(tok, p, bos=True)) + len(_ids(tok, c)) + 1 for _, p, c in dataset.rows]
    # Target = output + EOS: at the longer example's length minus one only its EOS is cut.
    result = check_data(data, demo_tokenizer, max(sizes) - 1)
    assert sizes[0] > sizes[1]
    assert (result.format, result.fit, result.target_cut, result.eos_only_cut) == ("alpaca", 1, 1, 1)
    assert check_data(data, demo_tokenizer, max(sizes)).ok
    assert "format: alpaca (detected from the keys instruction/input/output; --format to force)" in result.summary()


def test_alpaca_prepared_long_trained_short_fits_none(tmp_path: Path, demo_tokenizer: Path) -> None:
    """The report's layout: inputs prepared at twice the length trained at: 0 of N fit, exit 1."""
    tok = load_tokenizer(demo_tokenizer)
    max_seq_length, n = 128, 12
    rows = []
    for i in range(n):
        text = " ".join(f"Section {j}: the encoder measures recall on benchmark {i + j}." for j in range(18))
        assert len(_ids(tok, text)) >= 2 * max_seq_length  # "prepared at 8,192 tokens, trained at 4,096"
        rows.append({"instruction": "Lay out the paper as JSON.", "input": text, "output": '{"sections": 18}'})
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    proc = run_cli("--data", str(data), "--tokenizer", str(demo_tokenizer), "--max-seq-length", str(max_seq_length))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "format: alpaca (detected from the keys instruction/input/output; --format to force)" in proc.stdout
    assert f"0 of {n} fit" in proc.stdout
    assert f"fit (prompt + completion + EOS):  0 of {n}" in proc.stdout
    assert f"whole target cut (prompt >= max_seq_length): {n}" in proc.stdout


def test_format_messages_last_assistant_turn_cut(tmp_path: Path, chat_tokenizer: Path, chat_tok) -> None:
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    two_turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
                 {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"},
                 {"role": "assistant", "content": "four five six seven eight nine ten eleven twelve"}]
    long_question = [{"role": "user", "content": "the model " * 30}, {"role": "assistant", "content": "yes"}]
    data = write_jsonl(tmp_path / "messages.jsonl", [{"messages": m} for m in (short, two_turns, long_question)])

    def spans(messages: list[dict]) -> list[tuple[int, int]]:
        """Each assistant turn: from the prefix before it (with the generation prompt) to the prefix with it."""
        return [(_chat_len(chat_tok, messages[:i], True), _chat_len(chat_tok, messages[: i + 1]))
                for i, m in enumerate(messages) if m["role"] == "assistant"]

    s_short, s_two, s_long = spans(short), spans(two_turns), spans(long_question)
    # The template ends a turn with "</s>\n": the spans end there, and the EOS is second-last.
    text = chat_tok.apply_chat_template(short, tokenize=False)
    assert chat_tok.decode(_ids(chat_tok, text)[s_short[0][0]:s_short[0][1]]) == "hello</s>\n"
    # At this length: the short example fits; the two-turn one keeps its first turn but loses
    # (part of) its last; the long question leaves no room for its answer at all.
    length = max(s_short[0][1], s_two[0][1])
    assert s_two[1][1] > length and s_long[0][0] >= length
    result = check_data(data, chat_tokenizer, length)
    assert result.format == "messages"
    assert result.format_origin == "detected from the key messages; --format to force"
    assert (result.total, result.fit, result.target_cut, result.target_fully_cut) == (3, 1, 2, 1)
    assert result.first_cut_lines == (2, 3)
    conv = result.conversation
    assert conv is not None
    assert (conv.assistant_turns, conv.assistant_turns_cut, conv.last_turn_cut, conv.every_turn_cut,
            conv.last_turn_without_eos) == (4, 2, 2, 1, 0)
    every = s_short + s_two + s_long
    assert result.target_tokens == sum(e - s for s, e in every)
    assert result.target_tokens_cut == (s_two[1][1] - max(s_two[1][0], length)) + (s_long[0][1] - s_long[0][0])
    assert result.needed_max_seq_length == max(s_short[-1][1], s_two[-1][1], s_long[-1][1])
    out = result.summary()
    assert "fit (last assistant turn + EOS):  1 of 3" in out and "every assistant turn cut:" in out
    assert not result.ok
    # The short example's content fits but its EOS does not (the newline after it is cut too).
    tight = check_data(data, chat_tokenizer, s_short[0][1] - 2)
    assert tight.eos_only_cut == 1 and tight.fit == 0
    assert check_data(data, chat_tokenizer, result.needed_max_seq_length).ok
    # Packing: a conversation does not end with EOS here (a newline follows it), so one is appended.
    packed = check_data(data, chat_tokenizer, 10_000, packing=True).packing
    assert packed is not None
    assert packed.tokens == sum(_chat_len(chat_tok, m) + 1 for m in (short, two_turns, long_question))
    assert (packed.windows, packed.examples_split, packed.targets_straddling) == (1, 0, 0)


def test_format_chat_prompt_completion(tmp_path: Path, chat_tokenizer: Path, chat_tok) -> None:
    # A few-shot assistant turn inside the prompt is not a target; the completion's turn is.
    prompt = [{"role": "system", "content": "answer in one word"}, {"role": "user", "content": "one"},
              {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}]
    completion = [{"role": "assistant", "content": "four"}]
    data = write_jsonl(tmp_path / "chat_pc.jsonl", [{"prompt": prompt, "completion": completion}])
    start = _chat_len(chat_tok, prompt, generation_prompt=True)
    end = _chat_len(chat_tok, prompt + completion)
    result = check_data(data, chat_tokenizer, end)
    assert result.format == "chat-prompt-completion"
    assert result.format_origin == "detected from the keys prompt/completion (lists of messages); --format to force"
    assert result.ok and result.target_tokens == end - start
    assert result.conversation is not None and result.conversation.assistant_turns == 1
    assert result.prompt_tokens.min == start
    cut = check_data(data, chat_tokenizer, start)  # the prompt fills the window: the whole target is cut
    assert (cut.fit, cut.target_fully_cut, cut.target_tokens_cut) == (0, 1, end - start)
    # A template that renders no assistant turn cannot train one: a clear error, not a silent 0.
    user_only = _copy_tokenizer(chat_tokenizer, tmp_path / "user-only",
                                "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n"
                                "{% endif %}{% endfor %}")
    with pytest.raises(DataCheckError, match=r"chat_pc.jsonl:1: the chat template renders no tokens for the "
                                             r"assistant turn \(message 5\)"):
        check_data(data, user_only, 512)


def test_packing_counts_derived_by_hand(tmp_path: Path, demo_tokenizer: Path) -> None:
    tok = load_tokenizer(demo_tokenizer)
    # Token counts of the pieces (prompts with BOS, completions without): checked, then used by hand.
    assert [len(_ids(tok, "a", bos=True)), len(_ids(tok, "x y z", bos=True))] == [2, 6]
    assert [len(_ids(tok, s)) for s in ("x y z", "abc", "a", "x y", "ab")] == [5, 2, 1, 3, 1]
    rows = [("a", "x y z"),    # 2 + 5 + EOS = 8: tokens [0, 8),   target [2, 8)
            ("x y z", "abc"),  # 6 + 2 + EOS = 9: tokens [8, 17),  target [14, 17): crosses 16
            ("x y z", "a"),    # 6 + 1 + EOS = 8: tokens [17, 25), target [23, 25): crosses 24
            ("a", "x y"),      # 2 + 3 + EOS = 6: tokens [25, 31), target [27, 31): within [24, 32)
            ("x y z", "ab")]   # 6 + 1 + EOS = 8: tokens [31, 39), target [37, 39): within [32, 40)
    data = write_jsonl(tmp_path / "pack.jsonl", [{"prompt": p, "completion": c} for p, c in rows])
    proc = run_cli("--data", str(data), "--tokenizer", str(demo_tokenizer), "--max-seq-length", "8",
                   "--packing", "--json")
    result = json.loads(proc.stdout)
    # 39 tokens in windows of 8: 5 windows; examples 2, 3 and 5 are split (at 16, 24, 32);
    # the targets of 2 and 3 straddle a boundary. Unpacked, only example 2 (9 tokens) is cut,
    # and only its EOS (6 + 2 = 8 tokens fit).
    assert result["packing"] == {"tokens": 39, "windows": 5, "examples_split": 3, "targets_straddling": 2}
    assert (result["fit"], result["target_cut"], result["eos_only_cut"], result["first_cut_lines"]) == (4, 1, 1, [2])
    assert proc.returncode == 1  # the exit status is the truncation's


def test_format_detection_and_forcing(tmp_path: Path, demo_tokenizer: Path, chat_tokenizer: Path) -> None:
    # Keys of two formats on every line: prompt/completion wins (TRL's order) unless --format says otherwise.
    both = write_jsonl(tmp_path / "both.jsonl", [
        {"prompt": "p", "completion": "c", "instruction": "Say hello.", "input": "", "output": "hello"}])
    detected = check_data(both, demo_tokenizer, 512)
    assert detected.format_line() == \
        "format: prompt-completion (detected from the keys prompt/completion; --format to force)"
    forced = check_data(both, demo_tokenizer, 512, format="alpaca")
    assert forced.format_line() == "format: alpaca (forced with --format)"
    assert forced.prompt_tokens.min == len(load_tokenizer(demo_tokenizer)(alpaca_prompt("Say hello."))["input_ids"])
    no_input = write_jsonl(tmp_path / "no_input.jsonl", [{"instruction": "Say hello.", "output": "hello"}])
    assert read_data(no_input).origin == "detected from the keys instruction/output; --format to force"
    # A format forced on lines that are not in it: an error naming the line.
    proc = run_cli("--data", str(both), "--tokenizer", str(chat_tokenizer), "--max-seq-length", "512",
                   "--format", "messages")
    assert proc.returncode == 2
    assert "both.jsonl:1: not a messages example: field 'messages' missing" in proc.stderr
    with pytest.raises(DataCheckError, match="unknown format"):
        read_data(both, "sharegpt")


def test_mixed_formats_and_non_matching_lines_exit_2(tmp_path: Path, demo_tokenizer: Path) -> None:
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}])
    proc = run_cli("--data", str(mixed), "--tokenizer", str(demo_tokenizer), "--max-seq-length", "512")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "mixed.jsonl:3: mixed formats: this line is messages, line 1 is prompt-completion" in proc.stderr
    stray = write_jsonl(tmp_path / "stray.jsonl", [
        {"instruction": "i", "input": "", "output": "o"}, {"instruction": "i", "input": "", "response": "o"}])
    with pytest.raises(DataCheckError, match=r"stray.jsonl:2: does not match the detected format alpaca \(line 1\): "
                                             r"field 'output' missing"):
        read_data(stray)
    bad_message = write_jsonl(tmp_path / "bad_message.jsonl", [{"messages": [{"content": "no role"}]}])
    with pytest.raises(DataCheckError, match=r"bad_message.jsonl:1: message 1 is not a \{role, content\} object"):
        read_data(bad_message)
    no_assistant = write_jsonl(tmp_path / "no_assistant.jsonl", [{"messages": [{"role": "user", "content": "u"}]}])
    with pytest.raises(DataCheckError, match=r"no_assistant.jsonl:1: it has no assistant turn"):
        read_data(no_assistant)


# --------------------------------------------------------------------------- contracts
# ``--contracts FILE --adapter NAME``: the targets judged with the gate's judging. Contracts are
# written in tmp_path; the demo build's own data and adapters file are read, never changed.

LAYOUT_SCHEMA = {
    "type": "object", "required": ["title", "panels"], "additionalProperties": False,
    "properties": {"title": {"type": "string", "minLength": 1},
                   "panels": {"type": "array", "minItems": 1, "items": {"type": "string"}}},
}


@pytest.fixture()
def contracts_file(tmp_path: Path) -> Path:
    """A JSON adapter (json_validity 0.9, the default), a strict one (0.99), a text one and a chat one."""
    import yaml

    doc = {
        "base_model": "loragate-demo-base",
        "adapters": {
            "layout": {"output": "json", "json_schema": LAYOUT_SCHEMA, "prompt_template": "Paper: {input}\nLayout:\n"},
            "layout-strict": {"output": "json", "json_schema": LAYOUT_SCHEMA,
                              "thresholds": {"json_validity": 0.99}},
            "notes": {"output": "text"},
            "chat-layout": {"api": "chat", "output": "json", "json_schema": LAYOUT_SCHEMA},
        },
    }
    path = tmp_path / "adapters.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def layout(i: int, **extra: object) -> str:
    return json.dumps({"title": f"Paper {i}", "panels": ["Method", "Results"], **extra})


def completions(tmp_path: Path, name: str, targets: list[str]) -> Path:
    return write_jsonl(tmp_path / name, [{"prompt": f"Paper: title {i}\nLayout:\n", "completion": t}
                                         for i, t in enumerate(targets)])


@pytest.fixture(scope="module")
def demo_build_dir(demo_tokenizer: Path) -> Path:
    """The demo build folder (training data, adapters/adapters.yaml), read-only."""
    return demo_tokenizer.parent


def test_contract_empty_targets_are_flagged(tmp_path: Path, demo_tokenizer: Path, contracts_file: Path) -> None:
    # The report's case: every target empty, every example "fits".
    data = completions(tmp_path, "empty.jsonl", [""] * 12)
    proc = run_cli("--data", str(data), "--tokenizer", str(demo_tokenizer), "--max-seq-length", "512",
                   "--contracts", str(contracts_file), "--adapter", "layout")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "OK: every target fits." in proc.stdout  # the lengths alone pass
    assert "    empty:                       12 of 12 (first at line 1)" in proc.stdout
    assert "    valid JSON, schema included: 0 of 12" in proc.stdout
    assert "PROBLEM: 12 of 12 targets are empty (first at line 1)" in proc.stdout
    # One empty target among valid ones fails too, though 19 of 20 valid clears json_validity 0.9.
    one = completions(tmp_path, "one_empty.jsonl", [layout(i) for i in range(19)] + ["  \n"])
    result = check_data(one, demo_tokenizer, 512, contracts=contracts_file, adapter="layout")
    t = result.targets
    assert t is not None and result.fits and not result.ok
    assert (t.total, t.empty, t.valid, t.not_json, t.first_lines) == (20, 1, 19, 0, {"empty": 20})
    assert t.json_validity == 0.95 and t.json_validity_floor == 0.9
    assert [p.split(" (")[0] for p in t.problems] == ["1 of 20 targets are empty"]
    # A text adapter's targets: only empty ones are counted.
    text = check_data(one, demo_tokenizer, 512, contracts=contracts_file, adapter="notes").targets
    assert text is not None and (text.empty, text.valid, text.schema_mismatch, text.ok) == (1, None, None, False)
    assert "valid JSON" not in "\n".join(text.summary_lines())
    assert check_data(completions(tmp_path, "words.jsonl", ["a note", "another"]), demo_tokenizer, 512,
                      contracts=contracts_file, adapter="notes").ok


def test_contract_schema_drift_is_flagged_with_its_error(tmp_path: Path, demo_tokenizer: Path,
                                                         contracts_file: Path) -> None:
    # Valid JSON, but the schema's "panels" renamed "blocks" in every target.
    drift = [json.dumps({"title": f"Paper {i}", "blocks": ["Method"]}) for i in range(10)]
    data = completions(tmp_path, "drift.jsonl", drift)
    proc = run_cli("--data", str(data), "--tokenizer", str(demo_tokenizer), "--max-seq-length", "512",
                   "--contracts", str(contracts_file), "--adapter", "layout", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    t = report["targets"]
    assert (report["fits"], report["ok"], t["ok"]) == (True, False, False)
    assert (t["total"], t["valid"], t["schema_mismatch"], t["empty"], t["not_json"]) == (10, 0, 10, 0, 0)
    assert t["json_validity"] == 0.0 and t["first_lines"] == {"schema_mismatch": 1}
    assert "'blocks' was unexpected" in t["schema_error"]
    assert t["problems"] == [("0 of 10 targets are valid JSON (0.0%), below the contract's json_validity 0.9: "
                              "the adapter learns to write what the gate rejects")]
    # One drifted target of 20: 95% valid clears the default 0.9 but not a 0.99 bar.
    mixed = completions(tmp_path, "mixed.jsonl", [layout(i) for i in range(19)] + [layout(19, blocks=[])])
    default = check_data(mixed, demo_tokenizer, 512, contracts=contracts_file, adapter="layout")
    assert default.ok and default.targets is not None
    assert (default.targets.valid, default.targets.schema_mismatch, default.targets.first_lines) == \
        (19, 1, {"schema_mismatch": 20})
    assert "schema mismatch:             1 of 20 (first at line 20); first error: (root): Additional properties " \
           "are not allowed ('blocks' was unexpected)" in default.summary()
    assert default.summary().endswith("OK: no target is empty; 19 of 20 targets are valid JSON (95.0%), at least "
                                      "the contract's json_validity 0.9.")
    strict = check_data(mixed, demo_tokenizer, 512, contracts=contracts_file, adapter="layout-strict")
    assert not strict.ok and strict.fits
    assert strict.targets is not None and strict.targets.problems[0].startswith("19 of 20 targets are valid JSON")


def test_contract_fenced_and_chatty_targets_are_flagged(tmp_path: Path, demo_tokenizer: Path,
                                                        contracts_file: Path) -> None:
    targets = [
        layout(0), layout(1), layout(2),                                       # valid
        "```json\n" + layout(3) + "\n```", "```\n" + layout(4) + "\n```",      # fenced
        "```json\n{\"title\": \"cut",                                     # fenced, and cut
        layout(6) + "\nThis layout puts the method first.",                    # text after the JSON
        layout(7) + "\n" + layout(7),                                          # two documents
        "Sure! Here is the layout:\n" + layout(8),                             # chatty preamble
        "I cannot lay out this paper.",                                        # not JSON at all
    ]
    data = completions(tmp_path, "chatty.jsonl", targets)
    result = check_data(data, demo_tokenizer, 512, contracts=contracts_file, adapter="layout")
    t = result.targets
    assert t is not None
    assert (t.valid, t.fenced, t.text_around_json, t.not_json, t.schema_mismatch, t.empty) == (3, 3, 3, 1, 0, 0)
    assert t.first_lines == {"fenced": 4, "text_around_json": 7, "not_json": 10}
    assert t.json_validity == 0.3 and not result.ok and result.fits
    out = result.summary()
    assert "    in a ``` code fence:         3 of 10 (first at line 4)" in out
    assert "    JSON with text around it:    3 of 10 (first at line 7)" in out
    assert "    not JSON:                    1 of 10 (first at line 10)" in out
    assert out.endswith("PROBLEM: 3 of 10 targets are valid JSON (30.0%), below the contract's json_validity 0.9: "
                        "the adapter learns to write what the gate rejects.")


def test_contract_good_demo_data_passes(tmp_path: Path, demo_build_dir: Path) -> None:
    """The demo's own training data against the demo's own contracts: every target valid."""
    adapters = demo_build_dir / "adapters" / "adapters.yaml"
    lines = (demo_build_dir / "train.jsonl").read_text().splitlines()[:40]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    proc = run_cli("--data", str(data), "--tokenizer", str(demo_build_dir / "base"), "--max-seq-length", "512",
                   "--contracts", str(adapters), "--adapter", "poster-good")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"contract: poster-good (output json, api completions) in {adapters.resolve()}" in proc.stdout
    assert "    valid JSON, schema included: 40 of 40" in proc.stdout
    assert proc.stdout.rstrip().endswith("OK: no target is empty; 40 of 40 targets are valid JSON (100.0%), at least "
                                         "the contract's json_validity 0.9.")
    # The chat adapter's conversations (few-shot turns before the last): the last turn is the target.
    chat_lines = (demo_build_dir / "train_chat.jsonl").read_text().splitlines()[:20]
    chat = tmp_path / "train_chat.jsonl"
    chat.write_text("\n".join(chat_lines) + "\n")
    result = check_data(chat, demo_build_dir / "base", 512, contracts=adapters, adapter="chat-good")
    assert result.ok and result.targets is not None
    assert (result.format, result.targets.total, result.targets.valid) == ("messages", 20, 20)
    assert "note:" not in result.summary()
    # The same conversations against the completions adapter: a note, not a failure.
    other = check_data(chat, demo_build_dir / "base", 512, contracts=adapters, adapter="poster-good")
    assert other.ok and "note: the contract serves poster-good through /v1/completions" in other.summary()


def test_contract_judges_the_last_assistant_turn(tmp_path: Path, chat_tokenizer: Path, contracts_file: Path) -> None:
    def conversation(last: object) -> dict:
        return {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": layout(0)},
                             {"role": "user", "content": "two"}, {"role": "assistant", "content": last}]}

    rows = [conversation(layout(1)),
            conversation("```json\n" + layout(2) + "\n```"),                   # a good few-shot turn does not count
            conversation([{"type": "text", "text": layout(3)}]),               # content as a list of parts
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = check_data(data, chat_tokenizer, 512, contracts=contracts_file, adapter="chat-layout")
    t = result.targets
    assert t is not None and t.api == "chat"
    assert (t.total, t.valid, t.fenced, t.empty) == (4, 2, 1, 1)
    assert t.first_lines == {"fenced": 2, "empty": 4} and not result.ok


def test_contract_options_go_together_and_name_known_adapters(tmp_path: Path, demo_tokenizer: Path,
                                                              contracts_file: Path) -> None:
    data = completions(tmp_path, "good.jsonl", [layout(i) for i in range(3)])
    base = ("--data", str(data), "--tokenizer", str(demo_tokenizer), "--max-seq-length", "512")
    proc = run_cli(*base, "--contracts", str(contracts_file))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--contracts needs --adapter NAME" in proc.stderr and not proc.stdout
    proc = run_cli(*base, "--adapter", "layout")
    assert proc.returncode == 2 and "--adapter needs --contracts FILE" in proc.stderr
    proc = run_cli(*base, "--contracts", str(contracts_file), "--adapter", "poster")
    assert proc.returncode == 2
    assert "adapter 'poster' has no contract" in proc.stderr
    assert "known adapters: chat-layout, layout, layout-strict, notes" in proc.stderr
    with pytest.raises(DataCheckError, match="pass both or neither"):
        check_data(data, demo_tokenizer, 512, contracts=contracts_file)
