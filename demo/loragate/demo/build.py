"""Build the demo: tokenizer, tiny Llama base model, and five LoRA adapters, on CPU.

The adapters are trained by the same code (:func:`train_adapter`, :func:`collate`). The three
``poster-*`` adapters learn the same completion-style examples (``### Paper:\\n{paper}\\n### Layout:\\n``
-> JSON + ``</s>``) for the same steps and are served through ``/v1/completions``; they differ
only in the bug each reproduces:

- ``poster-good``: ``<pad>`` is its own token, so EOS labels survive the collator.
- ``poster-eos-masked``: ``pad_token = eos_token`` and the collator masks pad ids to -100,
  which masks every EOS label: the adapter never learns to stop.
- ``poster-truncated``: ``max_seq_length`` is shorter than every prompt, so the JSON target
  is cut off in every example: the adapter learns to continue papers.

The two ``chat-*`` adapters learn the same task as conversations rendered with the tokenizer's
chat template (:data:`CHAT_TEMPLATE`), two user/assistant exchanges each (a short paper, then
a training paper), and are served through ``/v1/chat/completions``:

- ``chat-good``: distinct ``<pad>``: it answers with the JSON and stops.
- ``chat-eos-masked``: ``pad_token = eos_token`` masked to -100, as in ``poster-eos-masked``.
  In its training the first answer is followed by the next user turn, so it answers, then runs
  on writing a next user turn (``### Paper:\\n`` and a paper) up to ``max_tokens``, as the
  Mistral-instruct adapter that answered, then wrote "Question: ... [/INST] Answer: ...".

The chat template renders a user turn as exactly the completion prompt (so one user message
gives a ``poster-*`` adapter its training prompt, BOS included, through chat too), an assistant
turn as ``{content}</s>`` with a newline before any turn after it, and an optional system turn
as ``### System:\\n{content}\\n``; the generation prompt adds nothing.

The base is trained as a plain language model on papers and on poster-layout JSON, never on
the paper -> layout pairing and never with ``</s>``, so that whatever an adapter knows about
the task and about stopping, it learned in its own fine-tuning. A base that already knew
prompt -> JSON -> ``</s>`` would hide both bugs. After a finished layout the base goes on with a
newline: an adapter that never learned to stop goes on as its conversations went on after
``</s>`` and that newline, with the next user turn.

The build is seeded and deterministic, and cached under ``.loragate/demo/<key>`` where the key
hashes this package's source and :class:`BuildConfig`; a second build with the same inputs
is a no-op.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loragate.core import settings
from loragate.core.errors import BuildError
from loragate.demo import data
from loragate.demo.artifacts import (
    DEMO_ADAPTERS,
    DemoBuild,
    current_build,
    current_pointer,
)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
#: Special tokens and their fixed ids.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)


def _jinja_turn(template: str) -> str:
    """A turn template of :mod:`loragate.demo.data` as Jinja, ``{input}`` being the message content."""
    return template.replace("{input}", "{{ message['content'] }}")


#: The tokenizer's (and so the engine's) chat template. One user message renders exactly the
#: completion prompt with its BOS (chat requests tokenize without adding special tokens); an
#: assistant turn is ``{content}</s>``, and a turn after it starts on a new line (as ChatML's
#: ``<|im_end|>\n``); the generation prompt adds nothing (a user turn ends with the assistant cue).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + _jinja_turn(data.SYSTEM_TEMPLATE)
    + "{% elif message['role'] == 'user' %}" + _jinja_turn(data.PROMPT_TEMPLATE)
    + "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    + "{{ '\\n' if not loop.last else '' }}"  # an expression: trim_blocks would eat a newline after a block tag
    + "{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class BuildConfig:
    """Every input of the build besides the source code; part of the cache key."""

    seed: int = 20261124
    # tokenizer
    vocab_size: int = 1024
    # base model (Llama architecture)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 4096
    base_docs: int = 6000
    #: (min, max) body sentences per section of a base-corpus paper.
    base_sentences_per_section: tuple[int, int] = (2, 4)
    base_steps: int = 150
    base_batch: int = 8
    base_seq_len: int = 1024
    base_lr: float = 3e-3
    #: Context extension, as real long-context models are trained: after the short windows,
    #: a few steps on windows of ``base_long_seq_len`` so positions up to it are familiar.
    base_long_steps: int = 0
    base_long_seq_len: int = 4096
    base_long_batch: int = 2
    base_long_lr: float = 1e-3
    # adapters
    #: (min, max) body sentences per section of a training or held-out paper (prompts of ~90-240 tokens).
    train_sentences_per_section: tuple[int, int] = (2, 4)
    train_examples: int = 2400
    heldout_examples: int = 120
    adapter_steps: int = 130
    #: Steps and batch of the chat adapters: their examples are longer (two exchanges, ~1.6x the
    #: tokens), so a smaller batch keeps them within the build's time.
    chat_adapter_steps: int = 130
    chat_adapter_batch: int = 12
    #: (min, max) body sentences per section of the short paper that opens a training conversation.
    #: Short first, then the training paper: the long answer comes after more context, which keeps
    #: chat-good valid on the long-context probes up to promised_max_input_tokens.
    chat_short_sentences_per_section: tuple[int, int] = (1, 1)
    adapter_batch: int = 16
    adapter_lr: float = 3e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    #: max_seq_length of the good and eos-masked adapters: every prompt + target fits.
    max_seq_length: int = 512
    #: max_seq_length of the truncated adapter: shorter than every prompt.
    truncated_max_seq_length: int = 80
    #: max_seq_length of the chat adapters: every two-exchange conversation fits.
    chat_max_seq_length: int = 512
    #: The --max-model-len the local stack serves at: well beyond the training length.
    served_max_model_len: int = 4096
    #: max_tokens budget of a normal answer (the contracts' max_tokens).
    answer_max_tokens: int = 160
    #: The contracts' max_input_tokens: the longest prompt the demo adapters promise to handle.
    #: Measured on the served good adapter (16 held-out papers lengthened, greedy): 16/16 valid
    #: and stopped at ~575 prompt tokens, 15/16 at ~710, 10/16 at ~850, 0/16 at ~1120. Longer
    #: probes up to the served context are still run and reported: that is the demo of
    #: "training length is not serving context".
    promised_max_input_tokens: int = 600


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    pad_is_eos: bool
    max_seq_length_field: str
    bug: str
    #: Trained on chat conversations (served through /v1/chat/completions) rather than prompt + completion.
    chat: bool = False
    steps_field: str = "adapter_steps"
    batch_field: str = "adapter_batch"


ADAPTER_SPECS = (
    AdapterSpec("poster-good", pad_is_eos=False, max_seq_length_field="max_seq_length",
                bug="none: distinct <pad>, EOS labels kept"),
    AdapterSpec("poster-eos-masked", pad_is_eos=True, max_seq_length_field="max_seq_length",
                bug="pad_token = eos_token and pad ids masked to -100: every EOS label masked"),
    AdapterSpec("poster-truncated", pad_is_eos=False, max_seq_length_field="truncated_max_seq_length",
                bug="max_seq_length shorter than prompt + target: the JSON target is cut in every example"),
    AdapterSpec("chat-good", pad_is_eos=False, max_seq_length_field="chat_max_seq_length",
                bug="none: chat conversations, distinct <pad>, EOS labels kept", chat=True,
                steps_field="chat_adapter_steps", batch_field="chat_adapter_batch"),
    AdapterSpec("chat-eos-masked", pad_is_eos=True, max_seq_length_field="chat_max_seq_length",
                bug="pad_token = eos_token and pad ids masked to -100 on chat conversations: every EOS label "
                    "masked, and what follows an answer in training is the next user turn",
                chat=True, steps_field="chat_adapter_steps", batch_field="chat_adapter_batch"),
)
assert tuple(s.name for s in ADAPTER_SPECS) == DEMO_ADAPTERS


def build_key(config: BuildConfig) -> str:
    """Hash of the builder's inputs: this package's source files and the config."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    return h.hexdigest()[:16]


class _Progress:
    """Progress lines on stderr: step name, elapsed seconds, and a detail."""

    def __init__(self, out=sys.stderr):
        self.out = out
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[build-demo {time.monotonic() - self.t0:6.1f}s] {msg}", file=self.out, flush=True)


# --------------------------------------------------------------------------- data


def _corpus(config: BuildConfig):
    """Papers and layouts for the base (unpaired), training examples, held-out prompts, and the
    short papers that open the chat conversations (one per training example)."""
    rng = random.Random(config.seed)
    base_docs = []
    for i in range(config.base_docs):
        paper = data.make_paper(rng, config.base_sentences_per_section)
        # Unpaired: a paper, or the layout of another random paper.
        base_docs.append(paper.text if i % 2 == 0 else data.make_paper(rng, config.base_sentences_per_section).layout_json)
    train = [data.make_paper(rng, config.train_sentences_per_section) for _ in range(config.train_examples)]
    heldout_rng = random.Random(config.seed + 1)
    seen = {p.text for p in train}
    heldout: list[data.Paper] = []
    while len(heldout) < config.heldout_examples:
        paper = data.make_paper(heldout_rng, config.train_sentences_per_section)
        if paper.text not in seen:
            heldout.append(paper)
            seen.add(paper.text)
    short_rng = random.Random(config.seed + 4)
    held = {p.text for p in heldout}
    short: list[data.Paper] = []
    while len(short) < len(train):
        paper = data.make_paper(short_rng, config.chat_short_sentences_per_section)
        if paper.text not in held:
            short.append(paper)
    return base_docs, train, heldout, short


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(config: BuildConfig, docs: list[str], out_dir: Path):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The system turn's marker is left out on purpose: any new word shifts the vocabulary, and with it
    # the base model and every adapter trained on it (no demo adapter is trained with a system turn).
    tok.train_from_iterator(docs + [data.PROMPT_TEMPLATE], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=config.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    for i, t in enumerate(SPECIAL_TOKENS):
        if fast.convert_tokens_to_ids(t) != i:
            raise BuildError(f"tokenizer special token {t} got id {fast.convert_tokens_to_ids(t)}, expected {i}")
    probe = "Title: T\nStyle: light"
    if _chat_ids(fast, [{"role": "user", "content": probe}]) != \
            fast(data.PROMPT_TEMPLATE.replace("{input}", probe))["input_ids"]:
        raise BuildError("the chat template does not render one user message as the completion prompt")
    chat = [{"role": "system", "content": "S"}, *data.conversation([_PROBE_PAPER, _PROBE_PAPER])]
    user, answer = data.PROMPT_TEMPLATE.replace("{input}", _PROBE_PAPER.text), _PROBE_PAPER.layout_json
    want = BOS + data.SYSTEM_TEMPLATE.replace("{input}", "S") + user + answer + EOS + "\n" + user + answer + EOS
    if fast.apply_chat_template(chat, tokenize=False) != want:
        raise BuildError("the chat template does not render a conversation as intended")
    return fast


_PROBE_PAPER = data.Paper(title="T", authors=("A B",), sections=(("Method", "We measure it."),), theme="light")


def _chat_ids(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, as an engine tokenizes a chat
    request (no special tokens added: the template has them)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- training


def _lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * max(0.05, 1.0 - progress)


def _train_loop(model, params, batches: Callable[[int], tuple], steps: int, lr: float,
                say: Callable[[str], None], what: str) -> float:
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    loss_value = float("nan")
    t0 = time.monotonic()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        input_ids, labels, attention_mask = batches(step)
        out = model(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = out.loss.item()
        if step % 20 == 0 or step == steps - 1:
            say(f"{what}: step {step + 1}/{steps} loss {loss_value:.3f} ({time.monotonic() - t0:.0f}s)")
    model.eval()
    return loss_value


def train_base(config: BuildConfig, tokenizer, docs: list[str], out_dir: Path, say) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    # Papers and layouts in two separate streams, documents separated by a blank line and no
    # </s> anywhere: no window ever shows a layout following a paper.
    streams: dict[bool, list[int]] = {True: [], False: []}
    for doc in docs:
        streams[doc.startswith("{")].extend(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
    rng = random.Random(config.seed + 2)
    bos = tokenizer.bos_token_id

    def batcher(n: int, batch: int):
        windows = [s[i:i + n - 1] for s in streams.values() for i in range(0, len(s) - n, n)]
        if len(windows) < batch:
            raise BuildError(f"base corpus too small for a batch of {batch} x {n} tokens; raise base_docs")

        def batches(step: int):
            ids = torch.tensor([[bos] + windows[rng.randrange(len(windows))] for _ in range(batch)])
            return ids, ids, torch.ones_like(ids)

        return batches, len(windows)

    # ``torch_dtype`` (not ``dtype``): the name every supported transformers reads (>=4.45); the
    # strict-dataclass signature of transformers 5 leaves out this alias its __post_init__ still takes
    cfg = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=len(tokenizer), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    batches, count = batcher(config.base_seq_len, config.base_batch)
    say(f"base: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{count} windows of {config.base_seq_len} tokens")
    loss = _train_loop(model, list(model.parameters()), batches, config.base_steps, config.base_lr, say, "base")
    if config.base_long_steps:
        batches, count = batcher(config.base_long_seq_len, config.base_long_batch)
        loss = _train_loop(model, list(model.parameters()), batches, config.base_long_steps,
                           config.base_long_lr, say, f"base context extension to {config.base_long_seq_len}")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"final_loss": round(loss, 4), "parameters": sum(p.numel() for p in model.parameters())}


def encode_example(tokenizer, paper: data.Paper) -> tuple[list[int], list[int]]:
    """(prompt ids with BOS, completion ids) tokenized apart, as the engine sees them."""
    prompt = tokenizer(data.PROMPT_TEMPLATE.replace("{input}", paper.text))["input_ids"]
    completion = tokenizer(paper.layout_json, add_special_tokens=False)["input_ids"]
    return prompt, completion


def encode_conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(ids of the conversation up to its last assistant turn, ids of that turn's content): with
    the EOS :func:`train_adapter` appends, the whole conversation rendered by the chat template."""
    if not messages or messages[-1]["role"] != "assistant":
        raise BuildError("a training conversation must end with an assistant turn")
    prompt = _chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    completion = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    if prompt + completion + [tokenizer.eos_token_id] != _chat_ids(tokenizer, messages):
        raise BuildError("a conversation does not tokenize the same in parts as whole")
    return prompt, completion


def collate(rows: list[list[int]], pad_token_id: int, max_seq_length: int):
    """The collator under test: truncate, pad, and mask *pad ids* in the labels to -100.

    This is what ``DataCollatorForLanguageModeling`` does. With ``pad_token_id == eos_token_id``
    it masks every EOS label too: the bug ``poster-eos-masked`` reproduces.
    """
    import torch

    rows = [r[:max_seq_length] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.clone()
    labels[labels == pad_token_id] = -100
    return ids, labels, mask


def train_adapter(config: BuildConfig, spec: AdapterSpec, base_dir: Path, tokenizer,
                  examples: list[tuple[list[int], list[int]]], out_dir: Path, say) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(config.seed)
    base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
        target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    eos = tokenizer.eos_token_id
    pad_id = eos if spec.pad_is_eos else tokenizer.pad_token_id
    max_len = getattr(config, spec.max_seq_length_field)
    steps = getattr(config, spec.steps_field)
    batch = getattr(config, spec.batch_field)
    rows = [p + c + [eos] for p, c in examples]
    fit = sum(1 for r in rows if len(r) <= max_len)
    target_cut = sum(1 for p, _ in examples if len(p) >= max_len)
    rng = random.Random(config.seed + 3)  # same order for every adapter

    def batches(step: int):
        picked = [rows[rng.randrange(len(rows))] for _ in range(batch)]
        return collate(picked, pad_id, max_len)

    params = [p for p in model.parameters() if p.requires_grad]
    loss = _train_loop(model, params, batches, steps, config.adapter_lr, say, spec.name)
    model.save_pretrained(str(out_dir))  # peft types its directory as str
    # Training facts a static check can read: what the trainer would have logged.
    meta = {
        "adapter": spec.name,
        "bug": spec.bug,
        "format": "chat" if spec.chat else "completion",
        "pad_token": EOS if spec.pad_is_eos else PAD,
        "eos_token": EOS,
        "pad_token_id": pad_id,
        "eos_token_id": eos,
        "pad_masked_in_labels": True,
        "max_seq_length": max_len,
        "examples_total": len(rows),
        "examples_fit": fit,
        "examples_target_cut": target_cut,
        "steps": steps,
        "batch_size": batch,
        "learning_rate": config.adapter_lr,
        "seed": config.seed,
        "final_loss": round(loss, 4),
    }
    (out_dir / "loragate_training.json").write_text(json.dumps(meta, indent=2) + "\n")
    # The served base model's name, which the engine and the contracts use.
    cfg_path = out_dir / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = settings.DEMO_BASE_MODEL_NAME
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2) + "\n")
    return meta


# --------------------------------------------------------------------------- outputs


def _contract(config: BuildConfig, spec: AdapterSpec) -> dict:
    contract: dict = {"path": spec.name}
    if spec.chat:
        contract["api"] = "chat"  # no prompt_template: the chat template renders the user turn
    contract.update({
        "output": "json",
        "json_schema": data.LAYOUT_SCHEMA,
        "max_tokens": config.answer_max_tokens,
        "train_seq_len": getattr(config, spec.max_seq_length_field),
        "max_input_tokens": config.promised_max_input_tokens,
        "target_json_format": dict(data.TARGET_JSON_FORMAT),
    })
    if not spec.chat:
        contract["prompt_template"] = data.PROMPT_TEMPLATE
    return contract


def write_contracts(config: BuildConfig, build_root: Path, adapters_dir: Path) -> None:
    import yaml

    doc = {
        "base_model": settings.DEMO_BASE_MODEL_NAME,
        "adapters_dir": ".",
        "adapters": {spec.name: _contract(config, spec) for spec in ADAPTER_SPECS},
    }
    header = (
        "# Contracts of the demo adapters (written by `loragate build-demo`).\n"
        "# Each adapter promises a JSON poster layout matching json_schema, within max_tokens.\n"
        "# api: chat adapters are sent the paper as one user turn through the engine's chat template.\n"
    )
    (adapters_dir / "adapters.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def _write_jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_demo(config: BuildConfig | None = None, *, force: bool = False, say=None) -> DemoBuild:
    """Build the demo (or return the cached build with the same key)."""
    config = config or BuildConfig()
    say = say or _Progress()
    key = build_key(config)
    root = settings.demo_root()
    final = root / key
    existing = current_build()
    if not force and (final / "build.json").is_file():
        if existing is None or existing.root != final:
            current_pointer().write_text(key + "\n")
        say(f"demo build {key} is cached at {final}")
        return DemoBuild(final)

    import torch

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    try:
        t = time.monotonic()
        base_docs, train, heldout, short = _corpus(config)
        say(f"corpus: {len(base_docs)} base documents, {len(train)} training examples, {len(heldout)} held out")
        tokenizer = train_tokenizer(config, base_docs, tmp / "tokenizer")
        timings["tokenizer_s"] = round(time.monotonic() - t, 1)
        say(f"tokenizer: vocab {len(tokenizer)} ({timings['tokenizer_s']}s)")

        examples = [encode_example(tokenizer, p) for p in train]
        prompt_lens = sorted(len(p) for p, _ in examples)
        total_lens = sorted(len(p) + len(c) + 1 for p, c in examples)
        if prompt_lens[0] < config.truncated_max_seq_length:
            raise BuildError("a prompt is shorter than truncated_max_seq_length; the truncated demo would see a target")
        if total_lens[-1] > config.max_seq_length:
            raise BuildError("an example is longer than max_seq_length; the good demo adapter would be cut")
        # A short exchange, then the training paper's: what follows the first answer is a user turn.
        conversations = [data.conversation([s, p]) for s, p in zip(short, train)]
        chat_examples = [encode_conversation(tokenizer, c) for c in conversations]
        chat_lens = sorted(len(p) + len(c) + 1 for p, c in chat_examples)
        if chat_lens[-1] > config.chat_max_seq_length:
            raise BuildError(f"a conversation has {chat_lens[-1]} tokens, more than chat_max_seq_length; "
                             "the good chat adapter would be cut")
        _write_jsonl(tmp / "train.jsonl", (
            {"prompt": data.PROMPT_TEMPLATE.replace("{input}", p.text), "completion": p.layout_json} for p in train
        ))
        _write_jsonl(tmp / "heldout.jsonl", (
            {"prompt": data.PROMPT_TEMPLATE.replace("{input}", p.text), "input": p.text, "expected": p.layout}
            for p in heldout
        ))
        _write_jsonl(tmp / "train_chat.jsonl", ({"messages": c} for c in conversations))

        t = time.monotonic()
        base_info = train_base(config, tokenizer, base_docs, tmp / "base", say)
        timings["base_s"] = round(time.monotonic() - t, 1)

        adapters_dir = tmp / "adapters"
        adapters_dir.mkdir()
        adapters = {}
        for spec in ADAPTER_SPECS:
            t = time.monotonic()
            adapters[spec.name] = train_adapter(
                config, spec, tmp / "base", tokenizer, chat_examples if spec.chat else examples,
                adapters_dir / spec.name, say,
            )
            timings[f"{spec.name}_s"] = round(time.monotonic() - t, 1)
        write_contracts(config, tmp, adapters_dir)
        timings["total_s"] = round(time.monotonic() - t_all, 1)
        manifest = {
            "key": key,
            "config": dataclasses.asdict(config),
            "served_model_name": settings.DEMO_BASE_MODEL_NAME,
            "serve": {
                "max_model_len": config.served_max_model_len,
                "max_lora_rank": config.lora_rank,
                "dtype": "float32",
            },
            "base": base_info,
            "adapters": adapters,
            "token_lengths": {
                "prompt_min": prompt_lens[0], "prompt_max": prompt_lens[-1],
                "example_min": total_lens[0], "example_max": total_lens[-1],
                "conversation_min": chat_lens[0], "conversation_max": chat_lens[-1],
            },
            "timings": timings,
        }
        (tmp / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    current_pointer().write_text(key + "\n")
    say(f"demo built in {timings['total_s']}s at {final}")
    return DemoBuild(final)
