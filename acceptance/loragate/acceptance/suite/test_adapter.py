"""One test per planned check of each adapter: stop rate, JSON validity, runaways, non-empty
outputs, long-context probes and regression (see :mod:`loragate.acceptance.plan`).

A gating check fails its test when its bar is not met; a reported-only check (a probe beyond
the contract's promise, the baseline's runaway share) always passes its test, and its numbers
still go to the results file.
"""

from __future__ import annotations

from loragate.acceptance.checks import evaluate
from loragate.acceptance.plan import AdapterPlan, CheckSpec


def test_check(adapter_name: str, check_spec: CheckSpec, adapter_plan: AdapterPlan, samples, record_check) -> None:
    result = evaluate(check_spec, adapter_plan, samples.get(adapter_name, {}))
    record_check(result)
    if result.gating:
        assert result.passed, result.summary
