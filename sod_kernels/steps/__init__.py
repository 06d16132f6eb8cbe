"""Steps: segmentation of the distilled tokens into steps, the step weights (docs/math.md), the in-pass
weight plan of a single pass, the shared finishing of a distillation loss, advantages and policy inputs.

All O(tokens) PyTorch; imports only :mod:`sod_kernels.core`.  ``sod_kernels.steps`` re-exports the step
helpers (``step_ids_from_mask``, ``step_weights_from_divergence``, ``sod_step_weights``, ...).
"""

from .advantages import grpo_advantages, sod_advantages
from .policy_inputs import PolicyInputs, sod_policy_inputs
from .weights import (DEFAULT_DELTA, DEFAULT_EPSILON, StepWeights, accumulation_dtype, closed_form_weights,
                      resolve_step_ids, sod_step_statistics, sod_step_weights, step_ids_from_mask,
                      step_weights_from_divergence, trim_steps)

__all__ = ["DEFAULT_DELTA", "DEFAULT_EPSILON", "PolicyInputs", "StepWeights", "accumulation_dtype",
           "closed_form_weights", "grpo_advantages", "resolve_step_ids", "sod_advantages", "sod_policy_inputs",
           "sod_step_statistics", "sod_step_weights", "step_ids_from_mask", "step_weights_from_divergence",
           "trim_steps"]
