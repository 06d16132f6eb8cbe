"""Reference for the sparse teacher (top-k log-probs with a tail bucket) and for exact top-k log-probs.

Materializes the student's whole log-softmax; give it float64 tensors for float64 results.  Written from the
definitions, independently of the fused code:

- ``q_i = p_s(i)`` for the listed ids, ``Q = sum of p_s over the unlisted ids`` (a log-sum-exp over them,
  ``-inf`` when none), ``P = clamp(1 - sum_i exp(a_i), 0, 1)``, and ``P = 0`` when the ids are the whole
  vocabulary (there is no tail bucket then).
- Tail masses are floored inside logarithms only (``torch.clamp``: no gradient below it): the student's at
  ``TAIL_FLOOR``, the teacher's at ``max(TAIL_FLOOR, (1 + log k) * eps)`` with ``eps`` of the dtype the
  log-probs are given in (below that, ``1 - sum exp(a)`` is their rounding).
- reverse KL: ``sum_i q_i (log q_i - a_i) + Q (log Q' - log P')``;
  forward KL: ``sum_i e^{a_i} (a_i - log q_i) + P (log P' - log Q')``.
- generalized JSD (``beta``): :func:`reference.sod_reference.ref_jsd` over the ``k + 1`` cells (the ``k`` ids and
  the tail), student cells ``(log q_i, log Q)``, teacher cells ``(a_i, log P)``, no floors (the mixture is never
  below ``beta P`` nor ``(1 - beta) Q``); without a tail bucket (``k = V``) over the ``k`` ids.
- Teacher log-probs above 0 (rounding) are read as 0.
- The sampled-token signal uses the teacher's listed log-prob of ``y``, or ``log(P' / (V - k))`` when ``y`` is
  not listed.
"""

from __future__ import annotations

import math

import torch

from .sod_reference import ref_jsd, ref_logits, ref_step_ids_from_mask, ref_token_logprobs, ref_weighted_loss

TAIL_FLOOR = 1e-12


def _sparse_parts(student_hidden, student_weight, topk_ids, topk_logprobs, student_bias, temperature, softcap=None):
    """Student log-softmax at the ids, log Q, the teacher's a, P and log P' (leading dims kept)."""
    V = student_weight.shape[0]
    logp = torch.log_softmax(ref_logits(student_hidden, student_weight, student_bias, temperature, softcap=softcap),
                             dim=-1)
    ids = topk_ids.long()
    k = ids.shape[-1]
    logq = logp.gather(-1, ids)
    listed = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device).scatter(-1, ids, True)
    logQ = torch.logsumexp(logp.masked_fill(listed, float("-inf")), dim=-1)
    a = topk_logprobs.to(logp.dtype).clamp(max=0)
    P = (1 - a.exp().sum(-1)).clamp(0, 1)
    if k == V:
        P = torch.zeros_like(P)
    floor = max(TAIL_FLOOR, (1 + math.log(k)) * torch.finfo(topk_logprobs.dtype).eps)
    logPf = P.clamp(min=floor).log()
    return logp, logq, logQ, a, P, logPf


def ref_sparse_token_divergence(student_hidden, student_weight, topk_ids, topk_logprobs, *, student_bias=None,
                                divergence="reverse_kl", temperature=1.0, student_softcap=None, beta=0.5):
    """Per-token coarse-grained KL ``[...]`` (the leading shape of ``topk_ids`` without its last dimension);
    ``student_softcap``: the student's logit soft-cap (see :func:`reference.sod_reference.ref_logits`) or None."""
    _, logq, logQ, a, P, logPf = _sparse_parts(student_hidden, student_weight, topk_ids, topk_logprobs,
                                               student_bias, temperature, student_softcap)
    if divergence == "jsd":
        if topk_ids.shape[-1] == student_weight.shape[0]:
            return ref_jsd(logq, a, beta)
        cells_s = torch.cat([logq, logQ.unsqueeze(-1)], -1)
        cells_t = torch.cat([a, P.log().unsqueeze(-1)], -1)
        return ref_jsd(cells_s, cells_t, beta)
    logQf = logQ.clamp(min=math.log(TAIL_FLOOR))
    Q = logQ.exp()
    if divergence == "reverse_kl":
        return (logq.exp() * (logq - a)).sum(-1) + Q * (logQf - logPf)
    if divergence == "forward_kl":
        return (a.exp() * (a - logq)).sum(-1) + P * (logPf - logQf)
    raise ValueError(f"unknown divergence {divergence!r}")


def ref_sparse_sampled_logprobs(student_hidden, student_weight, topk_ids, topk_logprobs, target_ids, *,
                                student_bias=None, temperature=1.0, student_softcap=None):
    """``(log p_s(y), log p_t(y))`` with the teacher's value defined as in the module docstring."""
    logp, _, _, a, _, logPf = _sparse_parts(student_hidden, student_weight, topk_ids, topk_logprobs, student_bias,
                                            temperature, student_softcap)
    y = target_ids.long()
    lp_s = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    V, k = student_weight.shape[0], topk_ids.shape[-1]
    lp_t = logPf - math.log(max(V - k, 1))
    flat_ids, flat_y, flat_a = topk_ids.reshape(-1, k).tolist(), y.reshape(-1).tolist(), a.reshape(-1, k)
    listed = [(i, row.index(target)) for i, (row, target) in enumerate(zip(flat_ids, flat_y)) if target in row]
    out = lp_t.reshape(-1).clone()
    for i, j in listed:
        out[i] = flat_a[i, j]
    return lp_s, out.reshape(y.shape)


def ref_sparse_sod_loss(student_hidden, student_weight, topk_ids, topk_logprobs, response_mask=None, *,
                        step_ids=None, target_ids=None, divergence="reverse_kl", step_divergence="kl", epsilon=1e-6,
                        delta=0.2, temperature=1.0, coef=1.0, student_bias=None, reduction="token_mean",
                        token_weights=None, student_softcap=None, beta=0.5, hard_loss_weight=0.0):
    """The step-weighted loss with the coarse-grained divergence, everything materialized (differentiable).

    ``beta`` for ``divergence="jsd"``; ``hard_loss_weight`` adds the hard-label term as in
    :func:`reference.ref_fused_sod_loss` (the student's exact ``-log p_s(y)``, wherever ``y`` lies).

    Returns ``(loss, stats)`` as :func:`reference.ref_fused_sod_loss`.
    """
    single = student_hidden.dim() == 2
    if step_ids is None:
        step_ids = ref_step_ids_from_mask(response_mask)
    if single:
        student_hidden, step_ids = student_hidden.unsqueeze(0), step_ids.unsqueeze(0)
        topk_ids, topk_logprobs = topk_ids.unsqueeze(0), topk_logprobs.unsqueeze(0)
        target_ids = None if target_ids is None else target_ids.unsqueeze(0)
    m = step_ids >= 0
    D = ref_sparse_token_divergence(student_hidden, student_weight, topk_ids, topk_logprobs,
                                    student_bias=student_bias, divergence=divergence, temperature=temperature,
                                    student_softcap=student_softcap, beta=beta)
    D = torch.where(m, D, torch.zeros_like(D))
    hard = None
    if hard_loss_weight:
        nll = -ref_token_logprobs(student_hidden, student_weight, target_ids, student_bias, temperature,
                                  softcap=student_softcap)
        hard = hard_loss_weight * torch.where(m, nll, torch.zeros_like(nll))
    if step_divergence == "sampled":
        lp_s, lp_t = ref_sparse_sampled_logprobs(student_hidden, student_weight, topk_ids, topk_logprobs, target_ids,
                                                 student_bias=student_bias, temperature=temperature,
                                                 student_softcap=student_softcap)
        signal = (lp_s - lp_t).abs()
    else:
        signal = D
    return ref_weighted_loss(D, signal, step_ids, single=single, step_divergence=step_divergence, epsilon=epsilon,
                             delta=delta, token_weights=token_weights, coef=coef, reduction=reduction, hard=hard)


def ref_topk_logprobs(hidden, weight, k, bias=None, temperature=1.0, softcap=None):
    """``(ids [..., k] int64, logprobs [..., k])``: the k largest log-softmax entries of each position, largest
    first, equal values in ascending id order (a Python sort on ``(-value, id)``); ``softcap`` as in
    :func:`ref_logits`."""
    logp = torch.log_softmax(ref_logits(hidden, weight, bias, temperature, softcap=softcap), dim=-1)
    flat = logp.reshape(-1, logp.shape[-1])
    ids = []
    for row in flat.tolist():
        ids.append(sorted(range(len(row)), key=lambda v: (-row[v], v))[:k])
    ids = torch.tensor(ids, dtype=torch.int64).reshape(flat.shape[0], k)
    return ids.reshape(*logp.shape[:-1], k), flat.gather(1, ids).reshape(*logp.shape[:-1], k)
