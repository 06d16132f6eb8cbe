"""``nn.Module`` forms of the losses: the options are keyword arguments of the constructor (explicit, checked
when the module is built), the per-batch tensors (hidden states, weights, masks, step ids, targets, token
weights, biases) arguments of ``forward``.  Each forwards to its function, which documents every option.

The vocabulary-parallel forms (:class:`VocabParallelSODLoss`, :class:`VocabParallelSparseSODLoss`,
:class:`VocabParallelPolicyLoss`, :class:`VocabParallelTokenLogprobs`) take the shard's place too as options:
``process_group`` and ``vocab_start`` (this rank's first vocabulary id, or None for shards in rank order); their
options are checked when the module is built (no process group is needed for that), and every rank must
build its module with the same options."""

from __future__ import annotations

import torch

from .dense.loss import check_impl, fused_sod_loss
from .logprobs.policy_loss import fused_sod_policy_loss
from .core.runtime import check_softcap
from .core.validation import (BACKENDS, MEMORY_MODES, check_choice, check_chunk_size, check_positive,
                               resolve_divergence)
from .logprobs.policy_loss import check_policy_options
from .logprobs.token_logprobs import fused_token_logprobs
from .parallel.checks import check_vocab_start
from .parallel.layout import check_process_group
from .parallel.losses import vocab_parallel_policy_loss, vocab_parallel_sod_loss, vocab_parallel_token_logprobs
from .parallel.sparse import vocab_parallel_sparse_sod_loss
from .sparse.loss import fused_sparse_sod_loss
from .steps.finish import check_loss_options
from .steps.weights import DEFAULT_DELTA, DEFAULT_EPSILON


class _Options(torch.nn.Module):
    """Holds a loss's options (a dict, shown by ``repr``)."""

    def __init__(self, options: dict):
        super().__init__()
        self.options = dict(options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _check_pass(backend, memory, chunk_size, **softcaps) -> None:
    """The options of a single-process loss's pass: backend, memory mode, chunk size, soft-caps."""
    check_choice(backend, "backend", BACKENDS)
    check_choice(memory, "memory", MEMORY_MODES)
    check_chunk_size(chunk_size)
    for name, cap in softcaps.items():
        check_softcap(cap, name)


def _check_divergence(divergence, beta, hard_loss_weight) -> None:
    """The divergence's ``beta`` (``[0, 1]``, used by ``"jsd"``) and the hard-label weight (``>= 0``)."""
    resolve_divergence(divergence, beta)
    check_positive(hard_loss_weight, "hard_loss_weight", allow_zero=True)


def _distillation_options(divergence, beta, hard_loss_weight, step_divergence, epsilon, delta, temperature, coef,
                          reduction, return_stats, *, backend, chunk_size) -> dict:
    """The distillation options every SOD loss module shares (dense or sparse teacher, one process or
    vocabulary-parallel), checked (``backend`` and ``chunk_size`` are checked with them but not returned), in
    the order the module shows them."""
    check_loss_options(divergence, step_divergence, None, reduction, backend, chunk_size, epsilon, delta,
                       temperature, coef)
    _check_divergence(divergence, beta, hard_loss_weight)
    return dict(divergence=divergence, beta=beta, hard_loss_weight=hard_loss_weight, step_divergence=step_divergence,
                epsilon=epsilon, delta=delta, temperature=temperature, coef=coef, reduction=reduction,
                return_stats=return_stats)


class SODLoss(_Options):
    """:func:`sod_kernels.fused_sod_loss` as a module:
    ``SODLoss(divergence=..., ...)(student_hidden, student_weight, teacher_hidden, teacher_weight, response_mask,
    step_ids=..., target_ids=..., token_weights=..., student_bias=..., teacher_bias=...)``."""

    def __init__(self, *, divergence: str = "reverse_kl", beta: float = 0.5, hard_loss_weight: float = 0.0,
                 step_divergence: str | None = None,
                 epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA, temperature: float = 1.0,
                 coef: float = 1.0, reduction: str = "token_mean", return_stats: bool = False, backend: str = "auto",
                 memory: str = "fast", chunk_size: int | None = None, check_inputs: bool = True,
                 student_softcap: float | None = None, teacher_softcap: float | None = None, impl: str = "default"):
        options = _distillation_options(divergence, beta, hard_loss_weight, step_divergence, epsilon, delta,
                                        temperature, coef, reduction, return_stats, backend=backend,
                                        chunk_size=chunk_size)
        _check_pass(backend, memory, chunk_size, student_softcap=student_softcap, teacher_softcap=teacher_softcap)
        check_impl(impl, backend, memory)
        super().__init__(dict(**options, backend=backend, memory=memory, chunk_size=chunk_size,
                              check_inputs=check_inputs, student_softcap=student_softcap,
                              teacher_softcap=teacher_softcap, impl=impl))

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, response_mask: torch.Tensor | None = None, *,
                step_ids: torch.Tensor | None = None, target_ids: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None, student_bias: torch.Tensor | None = None,
                teacher_bias: torch.Tensor | None = None):
        return fused_sod_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, response_mask,
                              step_ids=step_ids, target_ids=target_ids, token_weights=token_weights,
                              student_bias=student_bias, teacher_bias=teacher_bias, **self.options)


class SparseSODLoss(_Options):
    """:func:`sod_kernels.fused_sparse_sod_loss` as a module:
    ``SparseSODLoss(...)(student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, response_mask,
    step_ids=..., target_ids=..., token_weights=..., student_bias=...)``."""

    def __init__(self, *, divergence: str = "reverse_kl", beta: float = 0.5, hard_loss_weight: float = 0.0,
                 step_divergence: str | None = None,
                 epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA, temperature: float = 1.0,
                 coef: float = 1.0, reduction: str = "token_mean", return_stats: bool = False, backend: str = "auto",
                 memory: str = "fast", chunk_size: int | None = None, check_inputs: bool = True,
                 student_softcap: float | None = None):
        options = _distillation_options(divergence, beta, hard_loss_weight, step_divergence, epsilon, delta,
                                        temperature, coef, reduction, return_stats, backend=backend,
                                        chunk_size=chunk_size)
        _check_pass(backend, memory, chunk_size, student_softcap=student_softcap)
        super().__init__(dict(**options, backend=backend, memory=memory, chunk_size=chunk_size,
                              check_inputs=check_inputs, student_softcap=student_softcap))

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_topk_ids: torch.Tensor,
                teacher_topk_logprobs: torch.Tensor, response_mask: torch.Tensor | None = None, *,
                step_ids: torch.Tensor | None = None, target_ids: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None, student_bias: torch.Tensor | None = None):
        return fused_sparse_sod_loss(student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs,
                                     response_mask, step_ids=step_ids, target_ids=target_ids,
                                     token_weights=token_weights, student_bias=student_bias, **self.options)


class SODPolicyLoss(_Options):
    """:func:`sod_kernels.fused_sod_policy_loss` as a module:
    ``SODPolicyLoss(clip_low=..., ...)(student_hidden, student_weight, target_ids, old_logprobs, advantages,
    response_mask, student_bias=...)``."""

    def __init__(self, *, clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float | None = 3.0,
                 temperature: float = 1.0, reduction: str = "token_mean", return_stats: bool = False,
                 backend: str = "auto", memory: str = "fast", chunk_size: int | None = None,
                 check_inputs: bool = True, student_softcap: float | None = None):
        check_policy_options(reduction, clip_low, clip_high, dual_clip, temperature)
        _check_pass(backend, memory, chunk_size, student_softcap=student_softcap)
        super().__init__(dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, temperature=temperature,
                              reduction=reduction, return_stats=return_stats, backend=backend, memory=memory,
                              chunk_size=chunk_size, check_inputs=check_inputs, student_softcap=student_softcap))

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, target_ids: torch.Tensor,
                old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, *,
                student_bias: torch.Tensor | None = None):
        return fused_sod_policy_loss(student_hidden, student_weight, target_ids, old_logprobs, advantages,
                                     response_mask, student_bias=student_bias, **self.options)


class FusedTokenLogprobs(_Options):
    """:func:`sod_kernels.fused_token_logprobs` as a module:
    ``FusedTokenLogprobs(temperature=..., ...)(hidden, weight, target_ids, bias=...)``."""

    def __init__(self, *, temperature: float = 1.0, backend: str = "auto", return_entropy: bool = False,
                 memory: str = "fast", chunk_size: int | None = None, check_inputs: bool = True,
                 softcap: float | None = None):
        check_positive(temperature, "temperature")
        _check_pass(backend, memory, chunk_size, softcap=softcap)
        super().__init__(dict(temperature=temperature, backend=backend, return_entropy=return_entropy, memory=memory,
                              chunk_size=chunk_size, check_inputs=check_inputs, softcap=softcap))

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, *,
                bias: torch.Tensor | None = None):
        return fused_token_logprobs(hidden, weight, target_ids, bias=bias, **self.options)


# ------------------------------------------------------------------------------------ vocabulary-parallel
def _check_parallel(process_group, vocab_start, reduce_hidden_grad, backend, chunk_size) -> None:
    """The options every vocabulary-parallel module shares (the functions check them again, on every call)."""
    check_process_group(process_group)
    check_vocab_start(vocab_start)
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}")
    check_choice(backend, "backend", BACKENDS)
    check_chunk_size(chunk_size)


class VocabParallelSODLoss(_Options):
    """:func:`sod_kernels.vocab_parallel_sod_loss` as a module (every rank builds one with the same options):
    ``VocabParallelSODLoss(process_group=..., vocab_start=..., ...)(student_hidden, student_weight_shard,
    teacher_hidden, teacher_weight_shard, response_mask, step_ids=..., target_ids=..., token_weights=...,
    student_bias=..., teacher_bias=...)``."""

    def __init__(self, *, process_group=None, vocab_start: int | None = None, divergence: str = "reverse_kl",
                 beta: float = 0.5, hard_loss_weight: float = 0.0, step_divergence: str | None = None,
                 epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA,
                 temperature: float = 1.0, coef: float = 1.0, reduction: str = "token_mean",
                 return_stats: bool = False, backend: str = "auto", chunk_size: int | None = None,
                 check_inputs: bool = True, reduce_hidden_grad: bool = True, student_softcap: float | None = None,
                 teacher_softcap: float | None = None):
        _check_parallel(process_group, vocab_start, reduce_hidden_grad, backend, chunk_size)
        options = _distillation_options(divergence, beta, hard_loss_weight, step_divergence, epsilon, delta,
                                        temperature, coef, reduction, return_stats, backend=backend,
                                        chunk_size=chunk_size)
        check_softcap(student_softcap, "student_softcap")
        check_softcap(teacher_softcap, "teacher_softcap")
        super().__init__(dict(process_group=process_group, vocab_start=vocab_start, **options, backend=backend,
                              chunk_size=chunk_size, check_inputs=check_inputs, reduce_hidden_grad=reduce_hidden_grad,
                              student_softcap=student_softcap, teacher_softcap=teacher_softcap))

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, response_mask: torch.Tensor | None = None, *,
                step_ids: torch.Tensor | None = None, target_ids: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None, student_bias: torch.Tensor | None = None,
                teacher_bias: torch.Tensor | None = None):
        return vocab_parallel_sod_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, response_mask,
                                       step_ids=step_ids, target_ids=target_ids, token_weights=token_weights,
                                       student_bias=student_bias, teacher_bias=teacher_bias, **self.options)


class VocabParallelSparseSODLoss(_Options):
    """:func:`sod_kernels.vocab_parallel_sparse_sod_loss` as a module (every rank builds one with the same
    options): ``VocabParallelSparseSODLoss(process_group=..., vocab_start=..., ...)(student_hidden,
    student_weight_shard, teacher_topk_ids, teacher_topk_logprobs, response_mask, step_ids=..., target_ids=...,
    token_weights=..., student_bias=...)``."""

    def __init__(self, *, process_group=None, vocab_start: int | None = None, divergence: str = "reverse_kl",
                 beta: float = 0.5, hard_loss_weight: float = 0.0, step_divergence: str | None = None,
                 epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA,
                 temperature: float = 1.0, coef: float = 1.0, reduction: str = "token_mean",
                 return_stats: bool = False, backend: str = "auto", chunk_size: int | None = None,
                 check_inputs: bool = True, reduce_hidden_grad: bool = True, student_softcap: float | None = None):
        _check_parallel(process_group, vocab_start, reduce_hidden_grad, backend, chunk_size)
        options = _distillation_options(divergence, beta, hard_loss_weight, step_divergence, epsilon, delta,
                                        temperature, coef, reduction, return_stats, backend=backend,
                                        chunk_size=chunk_size)
        check_softcap(student_softcap, "student_softcap")
        super().__init__(dict(process_group=process_group, vocab_start=vocab_start, **options, backend=backend,
                              chunk_size=chunk_size, check_inputs=check_inputs, reduce_hidden_grad=reduce_hidden_grad,
                              student_softcap=student_softcap))

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_topk_ids: torch.Tensor,
                teacher_topk_logprobs: torch.Tensor, response_mask: torch.Tensor | None = None, *,
                step_ids: torch.Tensor | None = None, target_ids: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None, student_bias: torch.Tensor | None = None):
        return vocab_parallel_sparse_sod_loss(student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs,
                                              response_mask, step_ids=step_ids, target_ids=target_ids,
                                              token_weights=token_weights, student_bias=student_bias, **self.options)


class VocabParallelPolicyLoss(_Options):
    """:func:`sod_kernels.vocab_parallel_policy_loss` as a module (every rank builds one with the same options):
    ``VocabParallelPolicyLoss(process_group=..., vocab_start=..., clip_low=..., ...)(student_hidden,
    student_weight_shard, target_ids, old_logprobs, advantages, response_mask, student_bias=...)``."""

    def __init__(self, *, process_group=None, vocab_start: int | None = None, clip_low: float = 0.2,
                 clip_high: float = 0.28, dual_clip: float | None = 3.0, temperature: float = 1.0,
                 reduction: str = "token_mean", return_stats: bool = False, backend: str = "auto",
                 chunk_size: int | None = None, check_inputs: bool = True, reduce_hidden_grad: bool = True,
                 student_softcap: float | None = None):
        _check_parallel(process_group, vocab_start, reduce_hidden_grad, backend, chunk_size)
        check_policy_options(reduction, clip_low, clip_high, dual_clip, temperature)
        check_softcap(student_softcap, "student_softcap")
        super().__init__(dict(process_group=process_group, vocab_start=vocab_start, clip_low=clip_low,
                              clip_high=clip_high, dual_clip=dual_clip, temperature=temperature, reduction=reduction,
                              return_stats=return_stats, backend=backend, chunk_size=chunk_size,
                              check_inputs=check_inputs, reduce_hidden_grad=reduce_hidden_grad,
                              student_softcap=student_softcap))

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, target_ids: torch.Tensor,
                old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, *,
                student_bias: torch.Tensor | None = None):
        return vocab_parallel_policy_loss(student_hidden, student_weight, target_ids, old_logprobs, advantages,
                                          response_mask, student_bias=student_bias, **self.options)


class VocabParallelTokenLogprobs(_Options):
    """:func:`sod_kernels.vocab_parallel_token_logprobs` as a module (every rank builds one with the same
    options): ``VocabParallelTokenLogprobs(process_group=..., vocab_start=..., temperature=..., ...)(hidden,
    weight_shard, target_ids, bias=...)``."""

    def __init__(self, *, process_group=None, vocab_start: int | None = None, temperature: float = 1.0,
                 backend: str = "auto", return_entropy: bool = False, chunk_size: int | None = None,
                 check_inputs: bool = True, reduce_hidden_grad: bool = True, softcap: float | None = None):
        _check_parallel(process_group, vocab_start, reduce_hidden_grad, backend, chunk_size)
        check_positive(temperature, "temperature")
        check_softcap(softcap, "softcap")
        super().__init__(dict(process_group=process_group, vocab_start=vocab_start, temperature=temperature,
                              backend=backend, return_entropy=return_entropy, chunk_size=chunk_size,
                              check_inputs=check_inputs, reduce_hidden_grad=reduce_hidden_grad, softcap=softcap))

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, *,
                bias: torch.Tensor | None = None):
        return vocab_parallel_token_logprobs(hidden, weight, target_ids, bias=bias, **self.options)
