"""Where a demo build's outputs are, for everything that uses them (stack, gate, tests).

A build lives in ``.loragate/demo/<key>/`` where ``<key>`` hashes the builder's inputs
(its source files and settings); ``.loragate/demo/current`` names the last complete build.
A build folder is only ever renamed into place once complete, so a half-built folder is
never taken for a build.

The demo adapters: three ``poster-*`` adapters served through ``/v1/completions`` (their
contracts carry the prompt template) and two ``chat-*`` adapters served through
``/v1/chat/completions`` (``api: chat``: the base model's chat template renders the paper as
a user turn). Every adapter is gated on the same held-out papers (:attr:`DemoBuild.heldout_prompts`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loragate.core import settings

#: The demo adapters, in the order they are built and reported.
DEMO_ADAPTERS = ("poster-good", "poster-eos-masked", "poster-truncated", "chat-good", "chat-eos-masked")


@dataclass(frozen=True)
class DemoBuild:
    """A complete demo build on disk."""

    root: Path

    @property
    def base_dir(self) -> Path:
        """The base model in Hugging Face format, tokenizer files included (what vLLM serves)."""
        return self.root / "base"

    @property
    def adapters_dir(self) -> Path:
        """One peft adapter folder per demo adapter, by name."""
        return self.root / "adapters"

    @property
    def adapters_file(self) -> Path:
        """The adapters' contracts (``adapters.yaml``), see :mod:`loragate.core.contracts`."""
        return self.adapters_dir / "adapters.yaml"

    @property
    def heldout_prompts(self) -> Path:
        """Held-out papers never used in training, shared by every adapter: JSONL, one
        ``{"prompt", "input", "expected"}`` a line (``prompt``: the completion prompt; a chat
        contract renders ``input`` into a user turn itself)."""
        return self.root / "heldout.jsonl"

    @property
    def train_data(self) -> Path:
        """The ``poster-*`` adapters' training examples as JSONL with ``prompt`` and ``completion``."""
        return self.root / "train.jsonl"

    @property
    def chat_train_data(self) -> Path:
        """The ``chat-*`` adapters' training conversations as JSONL, one ``{"messages": [...]}`` a line."""
        return self.root / "train_chat.jsonl"

    @property
    def manifest_path(self) -> Path:
        return self.root / "build.json"

    def manifest(self) -> dict:
        """Build metadata: key, seeds, settings, timings per step."""
        return json.loads(self.manifest_path.read_text())

    def adapter_path(self, name: str) -> Path:
        return self.adapters_dir / name

    def is_complete(self) -> bool:
        return self.manifest_path.is_file() and self.adapters_file.is_file()


def current_pointer() -> Path:
    return settings.demo_root() / "current"


def current_build() -> DemoBuild | None:
    """The build ``current`` points at, or ``None`` when there is no complete build."""
    pointer = current_pointer()
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    build = DemoBuild(settings.demo_root() / name)
    return build if build.is_complete() else None
