"""sod-kernels: fused kernels for step-wise on-policy distillation (SOD) of small language-model agents.

Public API:
- :func:`fused_sod_loss` / :class:`SODLoss`: the step-weighted vocabulary-wide KL distillation loss from
  hidden states and lm_head weights, never materializing tokens x vocabulary logits.
- Step helpers: :func:`step_ids_from_mask`, :func:`step_weights_from_divergence`, :func:`sod_step_weights`.
- Advantages: :func:`grpo_advantages`, :func:`sod_advantages`.
- Policy-gradient form (docs/math.md): :func:`fused_token_logprobs` (sampled-token log-probs from hidden
  states), :func:`sod_policy_inputs` (advantages + step statistics), :func:`fused_sod_policy_loss` (PPO
  dual clip).
- Sparse teacher: :func:`fused_sparse_sod_loss` (top-k log-probs with a tail bucket), and
  :func:`fused_topk_logprobs` to produce them.
- Vocabulary-parallel (column-parallel lm_head) forms over a torch.distributed group: docs/scaling.md.
- ``nn.Module`` forms: :class:`SODLoss`, :class:`SparseSODLoss`, :class:`SODPolicyLoss`,
  :class:`FusedTokenLogprobs` (options to the constructor, per-batch tensors to ``forward``), and of the
  vocabulary-parallel functions :class:`VocabParallelSODLoss`, :class:`VocabParallelSparseSODLoss`,
  :class:`VocabParallelPolicyLoss`, :class:`VocabParallelTokenLogprobs` (``process_group`` and ``vocab_start``
  among the options).

The package is laid out by layer: ``core`` (knows no loss), ``steps``, one folder per loss family
(``dense``, ``sparse``, ``logprobs``), ``parallel``, and this face (``modules``, ``hf``, ``fsdp``,
``integrations``).  Triton is imported only when a Triton path runs.
"""

from .dense.loss import fused_sod_loss
from .logprobs.policy_loss import PolicyLossStats, fused_sod_policy_loss
from .logprobs.token_logprobs import fused_token_logprobs
from .logprobs.topk import fused_topk_logprobs
from .modules import (FusedTokenLogprobs, SODLoss, SODPolicyLoss, SparseSODLoss, VocabParallelPolicyLoss,
                      VocabParallelSODLoss, VocabParallelSparseSODLoss, VocabParallelTokenLogprobs)
from .parallel.losses import vocab_parallel_policy_loss, vocab_parallel_sod_loss, vocab_parallel_token_logprobs
from .parallel.sparse import vocab_parallel_sparse_sod_loss
from .sparse.loss import fused_sparse_sod_loss
from .steps import (PolicyInputs, StepWeights, grpo_advantages, sod_advantages, sod_policy_inputs,
                    sod_step_statistics, sod_step_weights, step_ids_from_mask, step_weights_from_divergence)
from .steps.finish import SODStats

__version__ = "0.1.0"

__all__ = [
    "FusedTokenLogprobs",
    "PolicyInputs",
    "PolicyLossStats",
    "SODLoss",
    "SODPolicyLoss",
    "SODStats",
    "SparseSODLoss",
    "StepWeights",
    "VocabParallelPolicyLoss",
    "VocabParallelSODLoss",
    "VocabParallelSparseSODLoss",
    "VocabParallelTokenLogprobs",
    "fused_sod_loss",
    "fused_sod_policy_loss",
    "fused_sparse_sod_loss",
    "fused_token_logprobs",
    "fused_topk_logprobs",
    "grpo_advantages",
    "sod_advantages",
    "sod_policy_inputs",
    "sod_step_statistics",
    "sod_step_weights",
    "step_ids_from_mask",
    "step_weights_from_divergence",
    "vocab_parallel_policy_loss",
    "vocab_parallel_sod_loss",
    "vocab_parallel_sparse_sod_loss",
    "vocab_parallel_token_logprobs",
]
