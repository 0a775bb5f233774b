"""Where loragate keeps things, and the ports it uses: one place for each such fact.

Everything loragate writes at run time lives under one home folder (``$LORAGATE_HOME``,
default ``./.loragate``, ignored by git)::

    .loragate/
      demo/<key>/     demo tokenizer, base model, adapters, adapters.yaml, heldout.jsonl
      demo/current    -> the build the local stack serves
      stack/          state.json of the running local stack, and its logs/
      reports/        gate reports (JSON, JUnit XML, HTML), one folder a run
      promoted/       promotion records and the promoted set (values file for the chart)
      peers/          proxies `loragate bench proxy` measures beside loragate's, when it had to fetch them
"""

from __future__ import annotations

import os
from pathlib import Path

#: Port the proxy listens on in the chart (the Service's only port). Locally a free one is chosen.
PROXY_PORT = 8000
#: Port vLLM listens on in the chart, on localhost inside the pod.
VLLM_PORT = 8001
#: Name the demo base model is served under (``vllm serve --served-model-name``).
DEMO_BASE_MODEL_NAME = "loragate-demo-base"


def home() -> Path:
    """The root of everything loragate writes at run time."""
    return Path(os.environ.get("LORAGATE_HOME", ".loragate")).resolve()


def demo_root() -> Path:
    return home() / "demo"


def stack_dir() -> Path:
    return home() / "stack"


def logs_dir() -> Path:
    return stack_dir() / "logs"


def reports_dir() -> Path:
    return home() / "reports"


def promoted_dir() -> Path:
    return home() / "promoted"
