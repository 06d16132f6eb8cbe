"""Calls the policy-helper benchmarks of :mod:`benchmarks.policy` (owned by another engineer) if present.

The policy module times ``sod_step_weights`` / ``sod_advantages`` against the authors' per-token loop
(``reference/authors_loop.py``) and ``fused_token_logprobs`` against the naive materialized log-softmax.
This bridge only imports and calls it, so a run without that module still writes its tables.
"""

from __future__ import annotations

import importlib.util
import traceback

POLICY_MODULE = "benchmarks.policy"


def policy_section(config) -> dict:
    """``{"markdown": ..., "records": ...}`` from the policy benchmarks, or ``{"note": why not}``."""
    if importlib.util.find_spec(POLICY_MODULE) is None:
        return {"note": "benchmarks/policy.py is not present in this tree: policy helpers not measured"}
    try:
        module = importlib.import_module(POLICY_MODULE)
        return module.policy_benchmarks(device=config.device, quick=config.preset == "quick")
    except Exception:  # the policy benchmarks must not sink the main run; their failure is reported
        return {"note": "benchmarks.policy failed: " + traceback.format_exc(limit=3)[-800:]}
