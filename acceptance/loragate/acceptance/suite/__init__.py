"""The acceptance suite: pytest tests run against a live OpenAI-compatible endpoint.

``loragate gate`` runs it as a child process with a plan it wrote (``--lg-plan``); it also
runs by hand::

    pytest acceptance/loragate/acceptance/suite --endpoint http://127.0.0.1:8000 --adapter poster-good \\
        --contracts adapters.yaml --prompts heldout.jsonl

One test per planned check, parametrised by adapter and check id (``poster-good/greedy.stop_rate``).
"""
