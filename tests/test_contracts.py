"""Adapter contracts: parsing, defaults, and clear errors for bad files."""

import pytest
import yaml

from loragate.core.contracts import Thresholds, load_contracts
from loragate.core.errors import ContractError


def write(tmp_path, doc):
    path = tmp_path / "adapters.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


GOOD = {
    "base_model": "base",
    "defaults": {"thresholds": {"stop_rate": 0.8}},
    "adapters": {
        "a": {"output": "json", "json_schema": {"type": "object"}, "max_tokens": 64,
              "prompt_template": "Q: {input}\nA:", "thresholds": {"json_validity": 0.99}},
        "b": {"path": "sub/b"},
    },
}


def test_contracts_parse_with_defaults_and_overrides(tmp_path):
    cs = load_contracts(write(tmp_path, GOOD))
    assert cs.names == ["a", "b"]
    a, b = cs["a"], cs["b"]
    assert a.expects_json and not b.expects_json
    assert a.thresholds.stop_rate == 0.8 and a.thresholds.json_validity == 0.99
    assert b.thresholds.json_validity == Thresholds().json_validity
    assert a.path == (tmp_path / "a").resolve() and b.path == (tmp_path / "sub" / "b").resolve()
    assert a.render_prompt("2+2") == "Q: 2+2\nA:"
    assert a.base_model == "base"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["adapters"]["a"].update(output="xml"), "output"),
        (lambda d: d["adapters"]["a"].update(max_tokens=0), "max_tokens"),
        (lambda d: d["adapters"]["a"].update(colour="red"), "unknown key"),
        (lambda d: d["adapters"]["a"].update(thresholds={"stop_rate": "high"}), "expected a number"),
        (lambda d: d["adapters"]["a"].update(prompt_template="no placeholder"), "{input}"),
        (lambda d: d["adapters"]["b"].update(path="../../etc"), "escapes"),
        (lambda d: d["adapters"]["a"].update(json_schema={"type": 12}), "JSON Schema"),
        (lambda d: d.pop("base_model"), "base_model"),
    ],
)
def test_bad_contracts_fail_with_a_message_naming_the_field(tmp_path, mutate, message):
    import copy

    doc = copy.deepcopy(GOOD)
    mutate(doc)
    with pytest.raises(ContractError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_contracts(write(tmp_path, doc))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ContractError, match="not found"):
        load_contracts(tmp_path / "nope.yaml")
    with pytest.raises(ContractError, match="not valid YAML"):
        load_contracts(write(tmp_path, "adapters: [unclosed"))


def test_unknown_adapter_lists_known_ones(tmp_path):
    cs = load_contracts(write(tmp_path, GOOD))
    with pytest.raises(ContractError, match="known adapters: a, b"):
        cs["zzz"]


def test_a_chat_contract_renders_its_conversation_and_completion_contracts_are_unchanged(tmp_path):
    cs = load_contracts(write(tmp_path, {"base_model": "base", "adapters": {
        "chat": {"api": "chat", "system_prompt": "Be brief.", "user_template": "Ticket: {input}", "output": "json"},
        "bare": {"api": "chat"},
        "plain": {"prompt_template": "Q: {input}\nA:"}}}))
    assert cs["chat"].is_chat and cs["chat"].render_messages("x") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ticket: x"}]
    assert cs["bare"].render_messages("x") == [{"role": "user", "content": "x"}]
    assert not cs["plain"].is_chat and cs["plain"].api == "completions" and cs["plain"].render_prompt("x") == "Q: x\nA:"


@pytest.mark.parametrize("adapter, message", [
    ({"api": "messages"}, "adapters.a.api: expected 'completions' or 'chat'"),
    ({"system_prompt": "s"}, "adapters.a.system_prompt: only allowed with api: chat"),
    ({"user_template": "{input}"}, "adapters.a.user_template: only allowed with api: chat"),
    ({"api": "chat", "prompt_template": "Q: {input}"}, "adapters.a.prompt_template: only for api: completions"),
    ({"api": "chat", "user_template": "no placeholder"}, "adapters.a.user_template: must be a string containing"),
    ({"api": "chat", "system_prompt": 3}, "adapters.a.system_prompt: expected a string"),
])
def test_bad_chat_fields_name_the_field(tmp_path, adapter, message):
    with pytest.raises(ContractError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_contracts(write(tmp_path, {"base_model": "base", "adapters": {"a": adapter}}))

