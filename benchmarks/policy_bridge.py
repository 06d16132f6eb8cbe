"""Calls the policy-helper benchmarks of :mod:`benchmarks.policy` (owned by another engineer) if present.

The policy module times ``sod_step_weights`` / ``sod_advantages`` against the authors' per-token loop
(``reference/authors_loop.py``) and ``fused_token_logprobs`` against the naive materialized log-softmax;
its entry point is ``policy_benchmarks(device, quick) -> {"environment", "records", "markdown"}``.
This bridge only imports and calls it, so a run without that module (or where it fails) still writes
its tables, with a note saying why the section is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
import traceback

POLICY_MODULE = "benchmarks.policy"
POLICY_MIN_BUDGET_S = 120.0     # below this much time left in a budgeted run, the policy section is skipped
POLICY_MIN_BUDGET_QUICK_S = 45.0  # the same for quick runs (one small size per policy benchmark)
POLICY_FULL_BUDGET_S = 300.0    # below this much time left, only its quick sizes run


def policy_section(device: str, quick: bool, threads: int | None = None,
                   seconds_left: float | None = None) -> dict:
    """``{"markdown", "records", "environment", "seconds"}`` from the policy benchmarks, or ``{"note"}``."""
    floor = POLICY_MIN_BUDGET_QUICK_S if quick else POLICY_MIN_BUDGET_S
    if seconds_left is not None and seconds_left < floor:
        return {"note": f"policy helpers not measured: {max(seconds_left, 0):.0f} s left of the time budget"}
    if importlib.util.find_spec(POLICY_MODULE) is None:
        return {"note": "benchmarks/policy.py is not present in this tree: policy helpers not measured"}
    if seconds_left is not None and seconds_left < POLICY_FULL_BUDGET_S:
        quick = True
    start = time.perf_counter()
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        module = importlib.import_module(POLICY_MODULE)
        section = dict(module.policy_benchmarks(device=device, quick=quick))
    except Exception:  # the policy benchmarks must not sink the main run; their failure is reported
        return {"note": "benchmarks.policy failed: " + traceback.format_exc(limit=3)[-800:]}
    section["seconds"] = time.perf_counter() - start
    section["quick"] = quick
    return section
