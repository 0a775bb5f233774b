"""loragate: serve LoRA adapters on vLLM and gate their promotion on what they output.

Roles live in their own folders and are imported under this one namespace:

- ``loragate.server``     (``server/``)     the proxy, its metrics, and the shared judging of a completion
- ``loragate.acceptance`` (``acceptance/``) the acceptance suite and the gate that turns results into a verdict
- ``loragate.loadtest``   (``loadtest/``)   the locustfile and SLO evaluation
- ``loragate.demo``       (``demo/``)       the tiny demo model, tokenizer and demo adapters
- ``loragate``            (``loragate/``)   the CLI, adapter contracts, the local stack
"""

__version__ = "0.1.0"
