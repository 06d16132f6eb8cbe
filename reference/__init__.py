"""Plain, materializing PyTorch reference for docs/math.md: the oracle of every test.

Obviously correct rather than fast: logits are materialized, steps and groups are found with Python
loops, weights use the paper's running product.  Give it float64 tensors for float64 results.
"""

from .sod_reference import (
    ref_fused_sod_loss,
    ref_grpo_advantages,
    ref_logits,
    ref_ppo_dual_clip_loss,
    ref_sod_advantages,
    ref_sod_step_weights,
    ref_step_divergence,
    ref_step_ids_from_mask,
    ref_step_weights_running_product,
    ref_token_divergence,
    ref_token_logprobs,
)
from .sparse_reference import ref_sparse_sampled_logprobs, ref_sparse_sod_loss, ref_sparse_token_divergence
from .sparse_reference import ref_topk_logprobs

__all__ = [
    "ref_fused_sod_loss",
    "ref_grpo_advantages",
    "ref_logits",
    "ref_ppo_dual_clip_loss",
    "ref_sod_advantages",
    "ref_sod_step_weights",
    "ref_step_divergence",
    "ref_step_ids_from_mask",
    "ref_step_weights_running_product",
    "ref_token_divergence",
    "ref_token_logprobs",
]
__all__ += ["ref_sparse_sampled_logprobs", "ref_sparse_sod_loss", "ref_sparse_token_divergence", "ref_topk_logprobs"]
