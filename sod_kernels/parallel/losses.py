"""Vocabulary-parallel (column-parallel lm_head) forms of the losses: docs/scaling.md.

The student's (and teacher's) lm_head rows are sharded by contiguous vocabulary ranges across a
``torch.distributed`` process group: the rank passes its rows ``[vocab_start, vocab_start + Vr)`` as the
weight (and bias), and the same (replicated) hidden states, masks and targets as every other rank.  Each
function returns what its single-process counterpart returns on the full lm_head (the same value on every
rank), and its backward gives each rank the gradient of its own weight / bias shard.

- :func:`vocab_parallel_sod_loss` mirrors :func:`sod_kernels.fused_sod_loss`;
- :func:`vocab_parallel_token_logprobs` mirrors :func:`sod_kernels.fused_token_logprobs`;
- :func:`vocab_parallel_policy_loss` mirrors :func:`sod_kernels.fused_sod_policy_loss`.

Communication per call: one tiny descriptor all-gather (shards, shapes, options, checksums; every rank
checks them, so a bad input raises on every rank instead of hanging the others), one all-gather of
``P`` statistics per distilled token (``P`` = 5, 7 with the sampled step signal or the hard-label term, 3 or 4
for log-probs; ``divergence="jsd"`` adds a second all-gather of 2 per token), and
in backward, with ``reduce_hidden_grad=True``, one all-reduce of ``d(hidden)`` over the distilled rows.
Never anything of size tokens x vocabulary.  Deterministic: the statistics are merged in rank order on every
rank (the all-gather moves bits, it does not add), and the ``d(hidden)`` sum is one all-reduce whose order of
addition the backend fixes for a given group, message size and configuration (gloo and NCCL alike).
"""

from __future__ import annotations

import torch

from ..core.runtime import no_autocast
from ..logprobs.policy_loss import finish_policy_loss
from ..steps.finish import finish_loss
from ..steps.weights import DEFAULT_DELTA, DEFAULT_EPSILON
from .autograd import ParallelSetup, VocabParallelDivergence, VocabParallelLogprobs
from .checks import (LOGPROB_FIELDS, POLICY_FIELDS, SOD_FIELDS, check_targets_in_vocab, exchange, prepare_logprobs,
                     prepare_policy, prepare_sod)

__all__ = ["vocab_parallel_policy_loss", "vocab_parallel_sod_loss", "vocab_parallel_token_logprobs"]


def vocab_parallel_sod_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                            teacher_weight: torch.Tensor, response_mask: torch.Tensor | None = None, *,
                            process_group=None, vocab_start: int | None = None, step_ids: torch.Tensor | None = None,
                            target_ids: torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
                            divergence: str = "reverse_kl", step_divergence: str | None = None,
                            epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA,
                            temperature: float = 1.0, coef: float = 1.0, student_bias: torch.Tensor | None = None,
                            teacher_bias: torch.Tensor | None = None, reduction: str = "token_mean",
                            return_stats: bool = False, backend: str = "auto", chunk_size: int | None = None,
                            check_inputs: bool = True, reduce_hidden_grad: bool = True,
                            student_softcap: float | None = None, teacher_softcap: float | None = None,
                            beta: float = 0.5, hard_loss_weight: float = 0.0):
    """:func:`sod_kernels.fused_sod_loss` with the lm_heads sharded by vocabulary across ``process_group``.

    Every rank of the group calls it with the same hidden states, masks, targets and options, and its own
    vocabulary shard.  Arguments are those of ``fused_sod_loss`` except:

    Args:
        student_weight: ``[Vr, Hs]`` this rank's rows, the vocabulary ids ``[vocab_start, vocab_start + Vr)``
            (shards may be uneven; together they must tile ``[0, V)``, ``V`` = the sum of the shard sizes).
        teacher_weight: ``[Vtr, Ht]`` the teacher's rows for the same ids (``Vtr = Vr``; the shard holding the
            last ids may carry extra padding rows, which are ignored, as a padded teacher is in the
            single-process loss).
        student_bias, teacher_bias: this rank's ``[Vr]`` / ``[Vtr]`` slices, or None.
        target_ids: ``[B, T]`` global token ids in ``[0, V)``.
        divergence: ``"reverse_kl"`` (default), ``"forward_kl"`` or ``"jsd"``: the generalized Jensen-Shannon
            divergence ``beta KL(p_t || M) + (1 - beta) KL(p_s || M)``, ``M = (1 - beta) p_s + beta p_t`` (SPEC
            section 14; ``beta`` 0 / 1 are exactly the forward / reverse KL).  For ``0 < beta < 1`` it needs the
            global log-sum-exps, so it takes a second round: each rank sweeps its shard again (one more pass of
            both models' products in forward, chunked PyTorch on either backend) and the ranks exchange two
            more floats per distilled token; the backward recomputes both models' tiles once.
        beta: the JSD's weight in ``[0, 1]`` (default 0.5); checked for every divergence, used by ``"jsd"``.
        hard_loss_weight: ``lambda >= 0`` (default 0) adds ``lambda * sum m (-log p_s(y)) / normalizer`` (the
            hard-label cross-entropy of ``target_ids``, needed when ``lambda > 0``; unweighted, not times ``coef``).
            ``log p_s(y)`` comes from the forward's statistics (no extra forward work); its gradient
            ``(p_s - onehot(y)) / tau`` costs one more pass of the student's products in backward for the KLs
            (none for ``"jsd"``, whose backward sweep forms both terms).
        process_group: the group that shards the lm_head (None: the default group).  Its backend must handle
            the tensors' device (gloo for CPU, NCCL for CUDA).
        vocab_start: this rank's first vocabulary id, or None on every rank for shards in rank order.
        backend: ``"auto"`` (Triton kernels on the chunked core for CUDA tensors, chunked PyTorch otherwise),
            ``"torch"`` or ``"triton"``.  Always two passes (statistics forward, recomputed logits in backward):
            the single-process ``memory`` option has no counterpart here.
        reduce_hidden_grad: True (default): backward all-reduces the ``d(student_hidden)`` shares, so every rank
            holds the single-process gradient.  False: each rank gets only its share (the product of its
            ``d(logits)`` columns with its weight rows); pass False when the caller sums them itself (e.g. the
            hidden states came through a tensor-parallel "copy" region whose backward all-reduces).
    Returns:
        The same as ``fused_sod_loss`` (loss or :class:`~sod_kernels.SODStats`), identical on every rank.
        Backward (which every rank must run, on the same loss) gives ``student_weight`` / ``student_bias``
        the gradient of this rank's rows.
    """
    layout, p, agreed = exchange(
        "vocab_parallel_sod_loss", process_group, vocab_start, student_hidden, student_weight, teacher_weight,
        SOD_FIELDS, lambda agreed: prepare_sod(
            agreed, student_hidden, student_weight, teacher_hidden, teacher_weight, response_mask, step_ids=step_ids,
            target_ids=target_ids, token_weights=token_weights, divergence=divergence,
            step_divergence=step_divergence, epsilon=epsilon, delta=delta, temperature=temperature, coef=coef,
            student_bias=student_bias, teacher_bias=teacher_bias, reduction=reduction, return_stats=return_stats,
            backend=backend, chunk_size=chunk_size, check_inputs=check_inputs,
            reduce_hidden_grad=reduce_hidden_grad, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
            beta=beta, hard_loss_weight=hard_loss_weight))
    check_targets_in_vocab(agreed, layout.vocab)
    hard = p.hard_loss_weight > 0
    y_local = p.y - layout.vocab_start if p.step_divergence == "sampled" or hard else None
    setup = ParallelSetup(layout, p.impl, p.temperature, chunk_size, reduce_hidden_grad, divergence=p.divergence,
                          student_softcap=p.student_softcap, teacher_softcap=p.teacher_softcap, beta=p.beta,
                          hard_label=hard)
    with no_autocast(student_hidden.device):
        D, _, _, lp_s, lp_t = VocabParallelDivergence.apply(p.sh, p.sw, student_bias, p.th, p.tw, teacher_bias,
                                                            p.row_index, y_local, setup)
    return finish_loss(None, D, lp_s, lp_t, p.row_index, p.step_rows, p.given, single=p.single,
                       step_divergence=p.step_divergence, epsilon=p.epsilon, delta=p.delta, coef=p.coef,
                       reduction=reduction, return_stats=return_stats, check_inputs=check_inputs,
                       inputs="student_hidden, teacher_hidden or the weights/biases",
                       hard_loss_weight=p.hard_loss_weight)


def vocab_parallel_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, *,
                                  process_group=None, vocab_start: int | None = None,
                                  bias: torch.Tensor | None = None, temperature: float = 1.0, backend: str = "auto",
                                  return_entropy: bool = False, chunk_size: int | None = None,
                                  check_inputs: bool = True, reduce_hidden_grad: bool = True,
                                  softcap: float | None = None):
    """:func:`sod_kernels.fused_token_logprobs` with the lm_head sharded by vocabulary across ``process_group``.

    Args:
        hidden: ``[B, T, H]`` or ``[T, H]``, the same on every rank; receives a gradient.
        weight: ``[Vr, H]`` this rank's rows (ids ``[vocab_start, vocab_start + Vr)``); bias ``[Vr]`` or None.
        target_ids: ``[B, T]`` (or ``[T]``) global ids in ``[0, V)`` (``V`` = the sum of the shard sizes).
        process_group, vocab_start, backend, reduce_hidden_grad: see :func:`vocab_parallel_sod_loss`.
        temperature, return_entropy, chunk_size, check_inputs, softcap: as in ``fused_token_logprobs``.
    Returns:
        ``[B, T]`` (or ``[T]``) log-probabilities (float32, float64 for float64 inputs), or
        ``(logprobs, entropy)`` with ``return_entropy``; identical on every rank.  Backward (every rank, on the
        same outputs) gives ``weight`` / ``bias`` this rank's rows of the gradient.
    """
    layout, prepared, agreed = exchange(
        "vocab_parallel_token_logprobs", process_group, vocab_start, hidden, weight, None, LOGPROB_FIELDS,
        lambda agreed: prepare_logprobs(agreed, hidden, weight, target_ids, bias=bias, temperature=temperature,
                                        backend=backend, return_entropy=return_entropy, chunk_size=chunk_size,
                                        check_inputs=check_inputs, reduce_hidden_grad=reduce_hidden_grad,
                                        softcap=softcap))
    check_targets_in_vocab(agreed, layout.vocab)
    impl, lead, flat, y, rows, temperature, softcap = prepared
    setup = ParallelSetup(layout, impl, temperature, chunk_size, reduce_hidden_grad,
                          with_entropy=bool(return_entropy), student_softcap=softcap)
    with no_autocast(hidden.device):
        logp, entropy = VocabParallelLogprobs.apply(flat, weight.contiguous(),
                                                    None if bias is None else bias.contiguous(), rows,
                                                    y - layout.vocab_start, setup)
    if return_entropy:
        return logp.reshape(lead), entropy.reshape(lead)
    return logp.reshape(lead)


def vocab_parallel_policy_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, target_ids: torch.Tensor,
                               old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, *,
                               process_group=None, vocab_start: int | None = None, clip_low: float = 0.2,
                               clip_high: float = 0.28, dual_clip: float | None = 3.0, temperature: float = 1.0,
                               student_bias: torch.Tensor | None = None, reduction: str = "token_mean",
                               return_stats: bool = False, backend: str = "auto", chunk_size: int | None = None,
                               check_inputs: bool = True, reduce_hidden_grad: bool = True,
                               student_softcap: float | None = None):
    """:func:`sod_kernels.fused_sod_policy_loss` with the student lm_head sharded by vocabulary.

    Arguments as in ``fused_sod_policy_loss``; ``student_weight`` ``[Vr, H]`` / ``student_bias`` ``[Vr]`` are this
    rank's rows, ``target_ids`` global ids (in ``[0, V)`` wherever ``response_mask`` is 1), and
    ``process_group``, ``vocab_start``, ``backend``, ``reduce_hidden_grad`` as in :func:`vocab_parallel_sod_loss`.
    The new log-probs come from :class:`~sod_kernels.parallel.autograd.VocabParallelLogprobs` for the
    masked-in tokens only (two passes on every backend).
    Returns the loss or :class:`~sod_kernels.PolicyLossStats`, identical on every rank.
    """
    layout, p, agreed = exchange(
        "vocab_parallel_policy_loss", process_group, vocab_start, student_hidden, student_weight, None, POLICY_FIELDS,
        lambda agreed: prepare_policy(agreed, student_hidden, student_weight, target_ids, old_logprobs, advantages,
                                      response_mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                                      temperature=temperature, student_bias=student_bias, reduction=reduction,
                                      return_stats=return_stats, backend=backend, chunk_size=chunk_size,
                                      check_inputs=check_inputs, reduce_hidden_grad=reduce_hidden_grad,
                                      student_softcap=student_softcap))
    check_targets_in_vocab(agreed, layout.vocab, where=" wherever response_mask is 1")
    row_index, lead = p["row_index"], p["lead"]
    setup = ParallelSetup(layout, p["impl"], p["temperature"], chunk_size, reduce_hidden_grad,
                          student_softcap=p["softcap"])
    with no_autocast(student_hidden.device):
        logp, _ = VocabParallelLogprobs.apply(p["hidden"], student_weight.contiguous(),
                                              None if student_bias is None else student_bias.contiguous(), row_index,
                                              p["y"] - layout.vocab_start, setup)
    return finish_policy_loss(logp, p["old"], p["adv"], p["clip"], row_index, lead, reduction=reduction,
                              return_stats=return_stats, check_inputs=check_inputs)

