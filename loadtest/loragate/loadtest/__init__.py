"""loragate.loadtest: the load gate (locust, streaming, SLOs from the adapter's contract).

- :mod:`~loragate.loadtest.runner`: ``run_load(endpoint, adapter, contract, prompts, *, users,
  spawn_rate, duration_s, metrics_url, report_dir) -> LoadResult`` (``passed``, ``breaches``,
  ``metrics``, ``to_dict()``), used by ``loragate load`` and ``loragate gate --load``.
- :mod:`~loragate.loadtest.prompts`: ``load_prompts(jsonl, contract)`` renders the prompts.
- :mod:`~loragate.loadtest.measure`: the metric definitions (as ``vllm bench serve``).
- ``locustfile.py``: the locust user; ``locust -f loadtest/loragate/loadtest/locustfile.py`` for the web UI.
- :mod:`~loragate.loadtest.cli`: ``loragate load``.
"""
