"""sod-kernels: fused kernels for step-wise on-policy distillation (SOD) of small language-model agents.

Public API:
- :func:`fused_sod_loss` / :class:`SODLoss`: the step-weighted vocabulary-wide KL distillation loss from
  hidden states and lm_head weights, never materializing tokens x vocabulary logits.
- Step helpers: :func:`step_ids_from_mask`, :func:`step_weights_from_divergence`, :func:`sod_step_weights`.
- Advantages: :func:`grpo_advantages`, :func:`sod_advantages`.
- Policy-gradient form (docs/math.md): :func:`fused_token_logprobs` (sampled-token log-probs from hidden
  states), :func:`sod_policy_inputs` (advantages + step statistics), :func:`fused_sod_policy_loss` (PPO
  dual clip).
"""

from .advantages import grpo_advantages, sod_advantages
from .modules import SODLoss
from .policy_inputs import PolicyInputs, sod_policy_inputs
from .policy_loss import PolicyLossStats, fused_sod_policy_loss
from .sod_loss import SODStats, fused_sod_loss
from .steps import (StepWeights, sod_step_statistics, sod_step_weights, step_ids_from_mask,
                    step_weights_from_divergence)
from .token_logprobs import fused_token_logprobs

__version__ = "0.1.0"

__all__ = [
    "PolicyInputs",
    "PolicyLossStats",
    "SODLoss",
    "SODStats",
    "StepWeights",
    "fused_sod_loss",
    "fused_sod_policy_loss",
    "fused_token_logprobs",
    "grpo_advantages",
    "sod_advantages",
    "sod_policy_inputs",
    "sod_step_statistics",
    "sod_step_weights",
    "step_ids_from_mask",
    "step_weights_from_divergence",
]

from .sparse_teacher import fused_sparse_sod_loss  # noqa: E402
from .topk_logprobs import fused_topk_logprobs  # noqa: E402

__all__ += ["fused_sparse_sod_loss", "fused_topk_logprobs"]

# Vocabulary-parallel (column-parallel lm_head) forms over a torch.distributed group: docs/scaling.md.
from .vocab_parallel import (vocab_parallel_policy_loss, vocab_parallel_sod_loss,  # noqa: E402
                             vocab_parallel_token_logprobs)

from .vocab_parallel_sparse import vocab_parallel_sparse_sod_loss  # noqa: E402

__all__ += ["vocab_parallel_policy_loss", "vocab_parallel_sod_loss", "vocab_parallel_sparse_sod_loss",
            "vocab_parallel_token_logprobs"]
