"""Checks of a sparse teacher's inputs: ``teacher_topk_ids`` and ``teacher_topk_logprobs``.

Shapes and dtypes are checked for every call (no host synchronisation).  Values are checked on the
distilled positions only (positions outside the steps are never read, so they may hold any padding):
each costs one host synchronisation, skipped with ``check_inputs=False``.
"""

from __future__ import annotations

import math

import torch

from ..core.validation import check_shape, check_tensor

BASE_TOLERANCE = 1e-4  # rounding of a server's float32 log-softmax (its log-sum-exp error shifts every entry)


def logprob_tolerance(k: int, dtype: torch.dtype) -> float:
    """How far teacher log-probs of ``dtype`` may exceed 0, and their exp-sum exceed 1, from rounding alone:
    ``1e-4 + (1 + log k) * eps(dtype)`` (the exp-sum's rounding error is at most ``eps / 2`` times the
    entropy of the listed probabilities, ``<= log k``).  Entries above 0 within it are read as 0."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return BASE_TOLERANCE + (1.0 + math.log(max(k, 1))) * eps


def check_topk_shapes(ids, logprobs, lead: tuple[int, ...], vocab: int) -> int:
    """``teacher_topk_ids`` integer and ``teacher_topk_logprobs`` floating, both ``lead + (k,)`` with
    ``1 <= k <= vocab``; returns ``k``."""
    check_tensor(ids, "teacher_topk_ids", ndim=(len(lead) + 1,), integer=True)
    check_tensor(logprobs, "teacher_topk_logprobs", ndim=(len(lead) + 1,), floating=True)
    if tuple(ids.shape[:-1]) != lead:
        raise ValueError(f"teacher_topk_ids must have shape {lead + ('k',)} (the leading shape of student_hidden "
                         f"plus k ids per position), got {tuple(ids.shape)}")
    k = ids.shape[-1]
    if k == 0:
        raise ValueError("teacher_topk_ids must hold k >= 1 ids per position, got k = 0")
    if k > vocab:
        raise ValueError(f"teacher_topk_ids holds k = {k} ids per position, more than the student vocabulary "
                         f"({vocab}); the ids of one position must be distinct ids in [0, {vocab})")
    check_shape(logprobs, "teacher_topk_logprobs", tuple(ids.shape), "same as teacher_topk_ids")
    return k


def check_topk_values(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> None:
    """Values at the distilled positions (``ids``, ``logprobs`` are ``[Na, k]`` rows): ids in ``[0, V)`` and
    distinct per position; log-probs finite, ``<= 0`` and with ``sum exp <= 1`` up to
    :func:`logprob_tolerance`."""
    if ids.numel() == 0:
        return
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"teacher_topk_ids must lie in [0, {vocab}) (the student vocabulary) at every distilled "
                         "position")
    ordered = ids.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("teacher_topk_ids must not repeat an id within a position (k distinct ids per position)")
    a = logprobs.detach()
    if not bool(torch.isfinite(a).all()):
        raise ValueError("teacher_topk_logprobs must be finite at every distilled position (log-probabilities; "
                         "a -inf entry would make the reverse KL infinite: drop that id or clamp it)")
    tol = logprob_tolerance(ids.shape[1], logprobs.dtype)
    if bool((a > tol).any()):
        raise ValueError(f"teacher_topk_logprobs must be log-probabilities (<= 0); found values above 0 by more "
                         f"than the rounding tolerance {tol:.3g} (were logits passed instead of log-probs?)")
    total = torch.logsumexp(a.to(torch.float64), dim=1)
    if bool((total > math.log1p(tol)).any()):
        raise ValueError(f"teacher_topk_logprobs must describe at most a whole distribution: at some position the "
                         f"probabilities exp(logprob) sum to more than 1 + {tol:.3g} (rounding tolerance)")
