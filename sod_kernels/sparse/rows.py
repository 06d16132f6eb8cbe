"""Per-row math of the sparse-teacher divergence: KL (or generalized JSD) between the two distributions
coarse-grained onto the teacher's k ids plus one tail bucket, its derivative with respect to the student's
logits, and the coefficients of the hard-label term's derivative.

Both backends reduce a row of the student's temperature-scaled logits ``z [V]`` to
``z_ids [k]`` (the logits at the teacher's ids) and ``lse_tail`` (the log-sum-exp of the other ``V - k``
logits, ``-inf`` when there are none), computed over the vocabulary with those ``k`` columns excluded, so
the student's tail mass ``Q = exp(lse_tail - lse)`` never comes from ``1 - sum(q)`` (which cancels when the
ids hold almost all the mass).  Everything here is ``O(rows x k)`` and runs in float64.

Definitions (``a`` = the teacher's log-probs at the ids, at the temperature of the student's logits):

- ``q_i = exp(z_i - lse)``, ``Q = exp(lse_tail - lse)``; ``P = clamp(1 - sum_i exp(a_i), 0, 1)``, and
  ``P = 0`` when the ids cover the whole vocabulary (``k = V``: the tail bucket does not exist).
- Tail masses are floored inside logarithms only (so a zero mass times any logarithm stays 0):
  ``log Q' = max(log Q, log TAIL_FLOOR)`` for the student, whose tail is computed exactly in log space, and
  ``log P' = log max(P, F_t)`` for the teacher with ``F_t = max(TAIL_FLOOR, (1 + log k) eps)``
  (:func:`teacher_tail_floor`, ``eps`` of the log-probs' dtype): below that, ``1 - sum exp(a_i)`` is only the
  rounding of the given log-probs (``<= eps/2 (log k + 1)``), and flooring there keeps a rounded-to-zero
  teacher tail from inflating the reverse KL (4.8e-7 for float32 log-probs at k = 20; 1e-12 for float64).
- reverse KL: ``D = sum_i q_i (log q_i - a_i) + Q (log Q' - log P')``;
  forward KL: ``D = sum_i e^{a_i} (a_i - log q_i) + P (log P' - log Q')``.
- generalized JSD (``0 < beta < 1``) over the cells ``c`` (student ``s_c = log q_c``, teacher ``t_c``: the ids'
  ``a_i`` and the tail's ``log P``, unfloored): ``log M_c = logaddexp(s_c + log(1 - beta), t_c + log beta)``,
  ``D = beta sum_c p_c (t_c - log M_c) + (1 - beta) sum_c q_c (s_c - log M_c)`` with ``0 log 0 = 0``; no floor
  is needed (``M >= beta p`` and ``M >= (1 - beta) q`` bound both logarithms' arguments away from 0 where they
  are weighted).

Gradient.  With ``G_c = dD/d log(cell c)`` (cells: the k ids and the tail) and ``Sigma = sum_c G_c``,
``dD/dz_v = G_i - q_i Sigma`` at an id ``v = i`` and ``exp(z_v - lse_tail) (G_T - Q Sigma)`` at a tail
column: one coefficient per row (``grad_tail``) times the tail softmax, plus ``k`` values (``grad_ids``).
The floors are differentiated as the clamp they are (no gradient through a floored logarithm).  For the
JSD, ``G_c = (1 - beta) q_c r_c`` with ``r_c = s_c - log M_c`` (``dD/dq_c = (1 - beta) r_c``: the mixture's own
derivative terms sum to ``1 - beta``), so ``dD/dz`` at an id is ``(1 - beta) q_i (r_i - sum_c q_c r_c)``.

Hard-label term.  ``d(-log p_s(y))/dz_v = p_s(v) - [v = y]``: the ``p_s`` part has the same cell structure
(``q_i`` at the ids, ``Q`` times the tail softmax), so :func:`logit_coefficients` adds it to the cell
coefficients, and the one-hot part is one column per row that each backend writes itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

TAIL_FLOOR = 1e-12                   # smallest tail mass inside a logarithm (both models)
LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)


def teacher_tail_floor(k: int, dtype: torch.dtype) -> float:
    """Floor of the teacher's tail mass for ``k`` log-probs of ``dtype``: ``max(TAIL_FLOOR, (1 + log k) eps)``,
    the resolution of ``1 - sum exp(a_i)`` given the rounding of the ``a_i``."""
    return max(TAIL_FLOOR, (1.0 + math.log(max(k, 1))) * torch.finfo(dtype).eps)


DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


class SparseRowTerms(NamedTuple):
    """Per-row results of :func:`coarse_grained_rows` (``C`` rows, ``k`` ids), float64.

    D:          ``[C]`` the coarse-grained divergence (unclamped).
    grad_ids:   ``[C, k]`` ``dD/dz`` at the ids (``z`` = temperature-scaled logits).
    grad_tail:  ``[C]`` ``c`` with ``dD/dz_v = c * exp(z_v - lse_tail)`` at every tail column ``v``.
    lse_tail:   ``[C]`` the tail log-sum-exp with ``-inf`` (empty tail) replaced by 0 (``grad_tail`` is 0 there).
    lp_s, lp_t: ``[C]`` student / teacher log-prob of the sampled token (None without targets).
    prob_ids:   ``[C, k]`` the student's cell probabilities ``q_i`` at the ids (the hard term's ``p_s`` part).
    prob_tail:  ``[C]`` the student's tail mass ``Q`` (0 for an empty tail).
    """

    D: torch.Tensor
    grad_ids: torch.Tensor
    grad_tail: torch.Tensor
    lse_tail: torch.Tensor
    lp_s: torch.Tensor | None
    lp_t: torch.Tensor | None
    prob_ids: torch.Tensor | None = None
    prob_tail: torch.Tensor | None = None


class LogitCoefficients(NamedTuple):
    """``d(loss)/dz`` of ``C`` rows in the cell form both backends' gradient kernels write (float, any dtype):

    ids:    ``[C, k]`` the value at each id column.
    tail:   ``[C]`` ``c`` with ``d/dz_v = c * exp(z_v - lse_tail)`` at every tail column ``v``.
    target: ``[C]`` added at the column ``target_ids[r]`` of each row on top of the above (the hard term's
            one-hot part ``-h``), or None without a hard term.
    """

    ids: torch.Tensor
    tail: torch.Tensor
    target: torch.Tensor | None = None


def logit_coefficients(grad_ids: torch.Tensor, grad_tail: torch.Tensor, scale: torch.Tensor, *,
                       hard: torch.Tensor | None = None, prob_ids: torch.Tensor | None = None,
                       prob_tail: torch.Tensor | None = None) -> LogitCoefficients:
    """The cell coefficients of ``sum_r scale[r] D[r] + hard[r] (-log p_s(y_r))`` (``scale``, ``hard``: ``[C]``
    per-row upstream gradients, already divided by the temperature if the caller's ``z`` is).

    ``d(-log p_s(y))/dz = p_s - onehot(y)``: ``hard * q_i`` at the ids, ``hard * Q`` times the tail softmax, and
    ``-hard`` at ``y`` (returned as ``target``).  ``grad_ids [C, k]``, ``grad_tail [C]`` as in
    :class:`SparseRowTerms`; ``prob_ids``, ``prob_tail`` the student's cell probabilities (needed with ``hard``).
    """
    ids = scale[:, None] * grad_ids
    tail = scale * grad_tail
    if hard is None:
        return LogitCoefficients(ids, tail)
    if prob_ids is None or prob_tail is None:
        raise ValueError("the hard-label term's gradient needs the student's cell probabilities (prob_ids, "
                         "prob_tail: pass keep_probs=True to the forward)")
    hard = hard.to(ids.dtype)
    return LogitCoefficients(ids + hard[:, None] * prob_ids.to(ids.dtype),
                             tail + hard * prob_tail.to(ids.dtype), -hard)


def teacher_tail_log_mass(logprobs: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, log P')`` per row (float64) from the teacher's ``[C, k]`` log-probs (``P = 0`` when ``k = vocab``;
    ``P' = max(P, teacher_tail_floor(k, logprobs.dtype))``)."""
    floor = teacher_tail_floor(logprobs.shape[1], logprobs.dtype)
    a = logprobs.to(torch.float64).clamp(max=0)
    P = (1 - a.exp().sum(1)).clamp(0, 1)
    if a.shape[1] >= vocab:
        P = torch.zeros_like(P)
    return P, P.clamp(min=floor).log()


def _resolve(divergence: str | None, forward_kl: bool | None) -> str:
    """The divergence from the keyword ``divergence`` or, when it is None, the legacy ``forward_kl`` flag."""
    if divergence is None:
        return "forward_kl" if forward_kl else "reverse_kl"
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return divergence


def reverse_kl_cells(logq, q, Q, a, logQf, logPf, kept):
    """``(D [C], G [C, k], G_tail [C])`` of the reverse KL (``G_c = dD/d log(cell c)``); arguments float64 as in
    :func:`coarse_grained_rows`."""
    gap = torch.where(q > 0, logq - a, torch.zeros_like(q))   # 0 log 0 = 0 for an underflowed q
    D = (q * gap).sum(1) + Q * (logQf - logPf)
    return D, q * (gap + 1), Q * (logQf - logPf + kept.to(q.dtype))


def forward_kl_cells(logq, a, P, logQf, logPf, kept):
    """``(D, G, G_tail)`` of the forward KL (see :func:`reverse_kl_cells`)."""
    pa = a.exp()
    D = (pa * (a - logq)).sum(1) + P * (logPf - logQf)
    return D, -pa, torch.where(kept, -P, torch.zeros_like(P))


def jsd_cells(logq: torch.Tensor, logQ: torch.Tensor, a: torch.Tensor, P: torch.Tensor, beta: float):
    """``(D [C], G [C, k], G_tail [C])`` of the generalized JSD over the ``k + 1`` cells (float64).

    ``logq [C, k]``, ``logQ [C]`` (``-inf``: no / an underflowed tail), ``a [C, k]`` (``<= 0``), ``P [C]`` (the
    teacher's unfloored tail mass, 0 when ``k = V``), ``0 < beta < 1``.  ``G_c = (1 - beta) q_c r_c`` with
    ``r_c = log q_c - log M_c`` (0 where ``q_c = 0``).
    """
    s = torch.cat([logq, logQ[:, None]], 1)
    t = torch.cat([a, P.log()[:, None]], 1)                     # log 0 = -inf for an empty teacher tail
    log_m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    q, p = s.exp(), t.exp()
    zero = torch.zeros_like(q)
    r = torch.where(q > 0, s - log_m, zero)
    teacher_part = torch.where(p > 0, p * (t - log_m), zero)
    D = beta * teacher_part.sum(1) + (1 - beta) * (q * r).sum(1)
    G = (1 - beta) * q * r
    return D, G[:, :-1], G[:, -1]


def coarse_grained_rows(z_ids: torch.Tensor, lse_tail: torch.Tensor, logprobs: torch.Tensor, *,
                        forward_kl: bool | None = None, vocab: int, ids: torch.Tensor | None = None,
                        target_ids: torch.Tensor | None = None, z_target: torch.Tensor | None = None,
                        divergence: str | None = None, beta: float = 0.5) -> SparseRowTerms:
    """The divergence, its logit gradient and (optionally) the sampled-token log-probs of ``C`` rows.

    Args:
        z_ids: ``[C, k]`` temperature-scaled student logits at the ids (any floating dtype).
        lse_tail: ``[C]`` log-sum-exp of the student's other logits (``-inf`` if none).
        logprobs: ``[C, k]`` the teacher's log-probs at the ids (``<= 0``; tiny positive rounding is clamped).
        forward_kl: forward KL instead of reverse KL (the original spelling; ignored when ``divergence`` is
            given).
        vocab: ``V`` (``k = V`` means there is no tail bucket).
        ids, target_ids, z_target: ``[C, k]`` ids, ``[C]`` sampled tokens and their student logits, for the
            sampled-token log-probs.  The teacher's log-prob of a sampled token that is not among the ids is
            ``log(P' / (V - k))``: the (floored) tail mass spread evenly over the tail.
        divergence: ``"reverse_kl"``, ``"forward_kl"`` or ``"jsd"`` (None: from ``forward_kl``).
        beta: the JSD's mixing weight, ``0 < beta < 1`` (the ends are the KLs, mapped by the loss).
    Returns:
        :class:`SparseRowTerms` (float64), the cell probabilities included.
    """
    divergence = _resolve(divergence, forward_kl)
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"coarse_grained_rows: the JSD needs 0 < beta < 1 (the ends are the KLs), got {beta}")
    f64 = torch.float64
    z, lt = z_ids.to(f64), lse_tail.to(f64)
    a = logprobs.to(f64).clamp(max=0)
    big = torch.maximum(z.amax(1), lt)
    shifted, tail_shift = z - big[:, None], lt - big
    lnorm = torch.log(shifted.exp().sum(1) + tail_shift.exp())   # lse - big, in [0, log(k + 1)]
    logq = shifted - lnorm[:, None]
    logQ = tail_shift - lnorm
    q, Q = logq.exp(), logQ.exp()
    P, logPf = teacher_tail_log_mass(logprobs, vocab)
    kept = logQ >= LOG_TAIL_FLOOR                                  # where the floor does not bind
    logQf = torch.where(kept, logQ, torch.full_like(logQ, LOG_TAIL_FLOOR))
    if divergence == "forward_kl":
        D, G, G_tail = forward_kl_cells(logq, a, P, logQf, logPf, kept)
    elif divergence == "reverse_kl":
        D, G, G_tail = reverse_kl_cells(logq, q, Q, a, logQf, logPf, kept)
    else:
        D, G, G_tail = jsd_cells(logq, logQ, a, P, beta)
    sigma = G.sum(1) + G_tail
    grad_ids = G - q * sigma[:, None]
    grad_tail = G_tail - Q * sigma
    lp_s = lp_t = None
    if target_ids is not None:
        lp_s = z_target.to(f64) - (big + lnorm)
        match = ids == target_ids[:, None]
        listed = match.any(1)
        from_ids = torch.where(match, a, torch.zeros_like(a)).sum(1)
        spread = logPf - math.log(max(vocab - a.shape[1], 1))
        lp_t = torch.where(listed, from_ids, spread)
    finite_tail = torch.where(torch.isneginf(lt), torch.zeros_like(lt), lt)
    return SparseRowTerms(D, grad_ids, grad_tail, finite_tail, lp_s, lp_t, q, Q)


@dataclass
class SparseForward:
    """Per-row outputs (float32; float64 on the torch backend for float64 inputs): ``D [Na]``, the sampled
    log-probs ``[Na]`` (None without targets), and what the backward needs: ``lse_tail [Na]``,
    ``grad_tail [Na]``, ``grad_ids [Na, k]`` (see :class:`SparseRowTerms`), and for the hard-label term's
    gradient the cell probabilities ``prob_ids [Na, k]``, ``prob_tail [Na]`` (None unless kept)."""

    D: torch.Tensor
    lp_s: torch.Tensor | None
    lp_t: torch.Tensor | None
    lse_tail: torch.Tensor
    grad_tail: torch.Tensor
    grad_ids: torch.Tensor
    prob_ids: torch.Tensor | None = None
    prob_tail: torch.Tensor | None = None

    @classmethod
    def empty(cls, n: int, k: int, device, dtype, with_targets: bool, keep_probs: bool = False) -> SparseForward:
        e = lambda: torch.empty(n, dtype=dtype, device=device)  # noqa: E731
        ek = lambda: torch.empty(n, k, dtype=dtype, device=device)  # noqa: E731
        return cls(e(), e() if with_targets else None, e() if with_targets else None, e(), e(), ek(),
                   ek() if keep_probs else None, e() if keep_probs else None)

    def store(self, start: int, stop: int, t: SparseRowTerms) -> None:
        self.D[start:stop], self.lse_tail[start:stop], self.grad_tail[start:stop] = t.D, t.lse_tail, t.grad_tail
        self.grad_ids[start:stop] = t.grad_ids
        if self.lp_s is not None:
            self.lp_s[start:stop], self.lp_t[start:stop] = t.lp_s, t.lp_t
        if self.prob_ids is not None:
            self.prob_ids[start:stop], self.prob_tail[start:stop] = t.prob_ids, t.prob_tail


class SinglePassTotals:
    """What a sparse single pass keeps across its chunks: the per-row ``D``, ``lp_s``, ``lp_t`` (``[n]`` in
    ``dtype``; the latter two None without targets) and the float64 sums ``sum_i w_i D_i`` and
    ``sum_i (-log p_s(y_i))`` (the hard-label term, weight ``hard_loss_weight``) of
    ``L = (coef * sum_i w_i D_i + hard_loss_weight * sum_i (-log p_s(y_i))) / normalizer``."""

    def __init__(self, n: int, dtype: torch.dtype, device, *, with_targets: bool, coef: float, normalizer: float,
                 temperature: float, hard_loss_weight: float, sampled_signal: bool):
        self.D = torch.empty(n, dtype=dtype, device=device)
        self.lp_s = torch.empty_like(self.D) if with_targets else None
        self.lp_t = torch.empty_like(self.D) if with_targets else None
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.coef, self.normalizer, self.hard_loss_weight = coef, normalizer, hard_loss_weight
        self.grad_scale = coef / (normalizer * temperature)
        self.hard_scale = hard_loss_weight / (normalizer * temperature)
        self.sampled_signal = sampled_signal

    def add(self, t: SparseRowTerms, start: int, stop: int, chunk_weights, need_grad: bool):
        """Store the chunk ``[start, stop)``'s terms ``t``, weigh its rows (``chunk_weights(start, stop, D,
        signal)``, ``signal`` the sampled-token gap ``|lp_s - lp_t|`` or ``D``: the values the public function
        reports, as the two-pass path sees them) and add its loss terms; returns the chunk's
        :class:`LogitCoefficients` of ``L`` (temperature-scaled logits) when ``need_grad``, else None."""
        D = self.D[start:stop]
        D.copy_(t.D)
        if self.lp_s is not None:
            self.lp_s[start:stop], self.lp_t[start:stop] = t.lp_s, t.lp_t
        signal = (self.lp_s[start:stop] - self.lp_t[start:stop]).abs() if self.sampled_signal else D
        w = chunk_weights(start, stop, D, signal).to(torch.float64)
        self.total += (w * D.to(torch.float64)).sum()
        if self.hard_loss_weight:
            self.nll -= t.lp_s.sum()
        if not need_grad:
            return None
        hard = torch.full_like(w, self.hard_scale) if self.hard_loss_weight else None
        return logit_coefficients(t.grad_ids, t.grad_tail, w * self.grad_scale, hard=hard, prob_ids=t.prob_ids,
                                  prob_tail=t.prob_tail)

    def loss(self, dtype: torch.dtype) -> torch.Tensor:
        """``L`` (0-D) in ``dtype``."""
        loss = self.total * (self.coef / self.normalizer)
        if self.hard_loss_weight:
            loss = loss + self.nll * (self.hard_loss_weight / self.normalizer)
        return loss.to(dtype)
