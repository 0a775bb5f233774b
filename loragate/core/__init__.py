"""loragate.core: the facts every role shares.

- :mod:`~loragate.core.contracts`: the adapters file (each adapter's contract and thresholds);
- :mod:`~loragate.core.judging`: the one judging of a completion (stopped? valid JSON? schema?);
- :mod:`~loragate.core.engine`: what loragate asks an OpenAI-compatible vLLM endpoint (model
  list and the context rule, tokenize, runtime LoRA loading);
- :mod:`~loragate.core.sse`: reading server-sent events as they pass (LF and CRLF framing);
- :mod:`~loragate.core.stats`: percentiles and intervals;
- :mod:`~loragate.core.errors`, :mod:`~loragate.core.settings`, :mod:`~loragate.core.jsonl`,
  :mod:`~loragate.core.fastjson`.

Roles (``loragate.server``, ``loragate.acceptance``, ``loragate.loadtest``, the chart's smoke
check) import this package, never each other's internals (docs/architecture.md).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loragate")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
