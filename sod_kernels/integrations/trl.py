"""On-policy SOD distillation in TRL: :class:`SODDistillationTrainer`, a subclass of ``trl.DistillationTrainer``.

TRL's ``DistillationTrainer`` samples completions from the student (with ``transformers`` or vLLM, with or
without a tool-calling loop) and trains the student toward the teacher's next-token distribution on the
completion tokens; in a tool loop the tool outputs inside a completion are masked out by its ``tool_mask``.
This subclass keeps all of that and replaces only the loss: the completion's loss mask
(``completion_mask * tool_mask``) is cut into steps (maximal runs of ones, i.e. assistant turns between
tool outputs) and :func:`sod_kernels.fused_sod_loss` weights each step by ``w_k``. The divergence is the
one TRL's ``beta`` names, in TRL's convention: ``beta=1`` reverse KL (TRL's default), ``beta=0`` forward KL,
and in between the generalized Jensen-Shannon divergence with the mixture ``(1 - beta) p_student + beta
p_teacher`` (``divergence="jsd"`` of the fused loss).

Without ``tools=`` every completion is one assistant turn, hence one step of weight 1, and the loss equals
``DistillationTrainer``'s: the step weights act only on completions with several steps. The teacher is a
local model (TRL 1.16's ``DistillationTrainer`` takes no teacher server; its experimental server-teacher
subclass is not covered here).

Requires ``trl`` (``DistillationTrainer`` appeared in TRL 1.x); importing this module imports it. Tested with
TRL 1.16.0 (``transformers`` 5.x, which TRL's tool-calling loop requires).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DistillationConfig, DistillationTrainer

from .. import hf
from ..core.validation import STEP_DIVERGENCES, check_beta, check_choice, check_positive, resolve_divergence
from ..dense.loss import fused_sod_loss
from ..logprobs.token_logprobs import fused_token_logprobs

__all__ = ["SODDistillationConfig", "SODDistillationTrainer"]


@dataclass
class SODDistillationConfig(DistillationConfig):
    """``trl.DistillationConfig`` plus the SOD step weighting.

    sod_step_divergence: ``"kl"`` (d_k = step mean of the per-token KL, the default), ``"sampled"`` (step mean
        of ``|log p_s(y) - log p_t(y)|`` at the sampled tokens, the paper authors' signal) or ``"none"``
        (every weight 1: plain on-policy distillation, for comparison).
    sod_epsilon, sod_delta: ``w_k = min((d_1 + epsilon) / (d_k + epsilon), 1 + delta)``.
    ``beta`` (TRL's): 1.0 reverse KL (default), 0.0 forward KL, in between the generalized JSD.
    """

    sod_step_divergence: str = field(default="kl", metadata={"help": "'kl', 'sampled' or 'none'."})
    sod_epsilon: float = field(default=1e-6, metadata={"help": "epsilon of the SOD step weights (> 0)."})
    sod_delta: float = field(default=0.2, metadata={"help": "delta of the SOD step weights: w_k <= 1 + delta."})

    def __post_init__(self):
        super().__post_init__()
        check_beta(self.beta)
        check_choice(self.sod_step_divergence, "sod_step_divergence", STEP_DIVERGENCES)
        check_positive(self.sod_epsilon, "sod_epsilon")
        check_positive(self.sod_delta, "sod_delta", allow_zero=True)


def _full(weight: torch.Tensor | None) -> torch.Tensor | None:
    """A sharded (FSDP2 ``DTensor``) parameter gathered once into a plain tensor; others unchanged."""
    return weight.full_tensor() if weight is not None and hasattr(weight, "full_tensor") else weight


def _head_inputs(hidden: torch.Tensor, head: hf.LMHead):
    weight, bias = _full(head.weight), _full(head.bias)
    hidden, bias = hf.fold_logit_scale(hidden.to(weight.dtype), hf.LMHead(weight, bias, head.processing))
    return hidden, weight, None if bias is None else bias.to(weight.dtype)


class SODDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is the step-weighted :func:`sod_kernels.fused_sod_loss`.

    Same constructor as ``DistillationTrainer`` (``model``, ``teacher_model``, ``args``, ``train_dataset``,
    ``processing_class``, ``tools``...), with ``args`` a :class:`SODDistillationConfig` (a plain
    ``DistillationConfig`` is read with the SOD defaults). A logit scale is folded into the hidden states
    exactly; a final soft-cap (``final_logit_softcapping``) is applied inside the loss, as the model does.
    Logged metrics: TRL's (``entropy``: the student's mean per-token entropy at ``temperature`` over the
    loss tokens; the generation and ``tools/*`` metrics) and, as means over the batch, ``sod/kl`` (the
    unweighted per-token divergence), ``sod/steps`` (steps per completion), ``sod/first_step_divergence``
    (d_1) and ``sod/last_step_weight`` (w_K), the last two over completions with at least one step.
    """

    _tag_names = ["trl", "distillation", "sod"]
    _name = "SOD distillation"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.args
        self.sod_step_divergence = getattr(config, "sod_step_divergence", "kl")
        self.sod_epsilon = getattr(config, "sod_epsilon", 1e-6)
        self.sod_delta = getattr(config, "sod_delta", 0.2)
        self.sod_divergence, self.sod_beta = resolve_divergence("jsd", self.beta)
        if self.teacher_model is None:
            raise ValueError("SODDistillationTrainer needs a teacher_model (a causal LM with an lm_head)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # As in DistillationTrainer: normalize by the generated-token count of the whole generation batch (not
        # the dataloader's label count), divided by the process count to undo DDP's gradient averaging.
        if self.model.training and inputs.get("num_items_in_batch") is not None:
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        student = self.accelerator.unwrap_model(model)
        # Through the wrapper's forward, so that DDP / FSDP see the student's parameters used.
        loss, *sums = self._forward_redirection(model, student, self._sod_loss, student, inputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        kl_sum, tokens, steps, rows, stepped, d1_sum, w_last_sum, entropy_sum = (
            self.accelerator.gather_for_metrics(s.detach().reshape(1)).sum().item() for s in sums)
        metrics = self._metrics[mode]
        metrics["entropy"].append(entropy_sum / tokens if tokens else 0.0)  # as DistillationTrainer logs it
        metrics["sod/kl"].append(kl_sum / tokens if tokens else 0.0)
        metrics["sod/steps"].append(steps / rows if rows else 0.0)
        if stepped:
            metrics["sod/first_step_divergence"].append(d1_sum / stepped)
            metrics["sod/last_step_weight"].append(w_last_sum / stepped)
        return (loss, None) if return_outputs else loss

    def _sod_loss(self, student, inputs, num_items_in_batch):
        """Loss of one micro-batch and its metric sums (tensors: KL sum, tokens, steps, rows, rows with a step,
        sum of d_1, sum of w_K, sum of the student's entropy)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        # Hidden states of the positions that predict the completion tokens: [B, C, H].
        student_hidden = self._get_last_hidden_state(student, input_ids, attention_mask, keep)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state,
                                                       teacher, input_ids, attention_mask, keep)
        s_head, t_head = hf.lm_head(student), hf.lm_head(teacher)
        s_hidden, s_weight, s_bias = _head_inputs(student_hidden, s_head)
        t_hidden, t_weight, t_bias = _head_inputs(teacher_hidden.to(s_hidden.device), t_head)
        stats = fused_sod_loss(
            s_hidden, s_weight, t_hidden, t_weight, loss_mask.to(s_hidden.device),
            target_ids=inputs["completion_ids"].to(s_hidden.device), divergence=self.sod_divergence, beta=self.sod_beta,
            step_divergence=self.sod_step_divergence, epsilon=self.sod_epsilon, delta=self.sod_delta,
            temperature=self.temperature, student_bias=s_bias, teacher_bias=t_bias,
            student_softcap=s_head.processing.softcap, teacher_softcap=t_head.processing.softcap,
            reduction="token_mean" if num_items_in_batch is None else "sum", return_stats=True)
        loss = stats.loss
        with torch.no_grad():  # the student's entropy at the loss temperature, for TRL's "entropy" metric
            _, entropy = fused_token_logprobs(
                s_hidden.detach(), s_weight.detach(), inputs["completion_ids"].to(s_hidden.device),
                bias=None if s_bias is None else s_bias.detach(), temperature=self.temperature,
                softcap=s_head.processing.softcap, return_entropy=True)
            entropy_sum = (entropy * (loss_mask.to(entropy.device) != 0)).sum()
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device, dtype=loss.dtype)
        num_steps = stats.num_steps
        stepped = num_steps > 0
        zero = stats.token_divergence.new_zeros(())
        d1_sum = w_last_sum = zero
        if stats.step_divergence.shape[1]:  # at least one step in the batch
            last = (num_steps - 1).clamp(min=0).unsqueeze(1)
            d1_sum = (stats.step_divergence[:, 0] * stepped).sum()
            w_last_sum = (stats.step_weights.gather(1, last).squeeze(1) * stepped).sum()
        rows = torch.tensor(num_steps.numel(), device=num_steps.device)
        return (loss, stats.token_divergence.sum(), (loss_mask != 0).sum(), num_steps.sum(), rows, stepped.sum(),
                d1_sum, w_last_sum, entropy_sum)
