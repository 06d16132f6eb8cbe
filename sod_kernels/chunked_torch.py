"""Chunked PyTorch backend of the per-token divergence (SPEC section 3) and its student gradient.

Used for CPU tensors (and as a fallback anywhere).  Rows are processed in chunks of ``C`` tokens so that
only a few ``C x V`` logit blocks exist at a time; the backward pass recomputes each chunk's logits from
the saved per-token statistics (lse_s, lse_t, D) instead of storing them.

Cost for ``Na`` distilled tokens: forward ``2 Na V (Hs + Ht)`` FLOPs; backward the same again plus
``4 Na V Hs`` for d(hidden) and d(weight).  Extra memory: O(Na) statistics plus 2-3 chunk blocks of
``C x V`` floats (``C`` is chosen so one block holds about ``CHUNK_ELEMENTS`` floats) plus, for bf16/fp16
weights, one float32 copy of each weight (O(V H), never O(N V)).

The interface (``divergence_forward`` / ``divergence_backward``) is the one every backend implements;
see :mod:`sod_kernels.token_divergence`.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 21  # floats in one chunk x vocabulary block (8 MiB in float32)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logit math runs in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_chunk(vocab: int, chunk_size: int | None = None) -> int:
    if chunk_size is not None:
        return max(int(chunk_size), 1)
    return max(CHUNK_ELEMENTS // max(vocab, 1), 1)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    z = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _prepared(weight: torch.Tensor, bias: torch.Tensor | None, vocab: int, dtype: torch.dtype):
    """First ``vocab`` rows of a weight (a view for the padded teacher) in the compute dtype."""
    weight = weight[:vocab].to(dtype)
    bias = None if bias is None else bias[:vocab].to(dtype)
    return weight, bias


def divergence_forward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       row_index, target_ids, *, divergence: str, temperature: float, chunk_size: int | None = None):
    """Per-token divergence and softmax statistics for the rows ``row_index``.

    Args:
        student_hidden: ``[N, Hs]``; student_weight ``[Vs, Hs]``; student_bias ``[Vs]`` or None.
        teacher_hidden: ``[N, Ht]``; teacher_weight ``[Vt, Ht]`` (``Vt >= Vs``); teacher_bias ``[Vt]`` or None.
        row_index: ``[Na]`` int64 rows to compute.
        target_ids: ``[N]`` int64 sampled tokens, or None.
    Returns:
        ``(D, lse_student, lse_teacher, student_target_logprob, teacher_target_logprob)``, each ``[Na]`` in
        float32 (float64 for float64 inputs); the last two are None without ``target_ids``.  The lse are
        of the temperature-scaled logits over the first ``Vs`` columns.
    """
    V = student_weight.shape[0]
    dt = compute_dtype(student_hidden.dtype)
    ws, bs = _prepared(student_weight, student_bias, V, dt)
    wt, bt = _prepared(teacher_weight, teacher_bias, V, dt)
    Na = row_index.numel()
    D = torch.empty(Na, dtype=dt, device=student_hidden.device)
    lse_s, lse_t = torch.empty_like(D), torch.empty_like(D)
    lp_s = torch.empty_like(D) if target_ids is not None else None
    lp_t = torch.empty_like(D) if target_ids is not None else None
    C = rows_per_chunk(V, chunk_size)
    with torch.no_grad():
        for start in range(0, Na, C):
            stop = min(start + C, Na)
            rows = row_index[start:stop]
            # Two C x V blocks live at a time (plus logsumexp's transient): everything else is in place.
            logp_s = _logits(student_hidden[rows].to(dt), ws, bs, temperature)
            logp_t = _logits(teacher_hidden[rows].to(dt), wt, bt, temperature)
            lse_s[start:stop] = torch.logsumexp(logp_s, -1)
            lse_t[start:stop] = torch.logsumexp(logp_t, -1)
            logp_s -= lse_s[start:stop, None]
            logp_t -= lse_t[start:stop, None]
            if target_ids is not None:
                y = target_ids[rows].unsqueeze(1)
                lp_s[start:stop] = logp_s.gather(1, y).squeeze(1)
                lp_t[start:stop] = logp_t.gather(1, y).squeeze(1)
            if divergence == "reverse_kl":      # sum p_s (log p_s - log p_t)
                log_ratio = logp_t.neg_().add_(logp_s)
                D[start:stop] = (logp_s.exp_().mul_(log_ratio)).sum(-1)
            else:                               # sum p_t (log p_t - log p_s)
                log_ratio = logp_s.neg_().add_(logp_t)
                D[start:stop] = (logp_t.exp_().mul_(log_ratio)).sum(-1)
    return D, lse_s, lse_t, lp_s, lp_t


def divergence_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                        row_index, lse_student, lse_teacher, token_divergence, grad_divergence, *, divergence: str,
                        temperature: float, need_hidden: bool = True, need_weight: bool = True,
                        need_bias: bool = True, chunk_size: int | None = None):
    """Gradients of ``sum_i grad_divergence[i] * D[i]`` with respect to the student's hidden, weight, bias.

    ``grad_divergence`` is ``[Na]`` (the upstream gradient of each row's D: coef * w * m / normalizer
    times the caller's upstream gradient).  Per row, with raw logits ``x = z * temperature``:
    reverse KL ``dD/dx = p_s (log p_s - log p_t - D) / tau``; forward KL ``dD/dx = (p_s - p_t) / tau``.
    Returns ``(d_hidden [N, Hs], d_weight [Vs, Hs], d_bias [Vs])`` in the inputs' dtypes (None where not
    needed); rows outside ``row_index`` get zero gradient.
    """
    V = student_weight.shape[0]
    dt = compute_dtype(student_hidden.dtype)
    ws, bs = _prepared(student_weight, student_bias, V, dt)
    wt, bt = _prepared(teacher_weight, teacher_bias, V, dt)
    d_hidden = torch.zeros(student_hidden.shape, dtype=dt, device=student_hidden.device) if need_hidden else None
    d_weight = torch.zeros(ws.shape, dtype=dt, device=ws.device) if need_weight else None
    d_bias = torch.zeros(V, dtype=dt, device=ws.device) if (need_bias and student_bias is not None) else None
    C = rows_per_chunk(V, chunk_size)
    with torch.no_grad():
        for start in range(0, row_index.numel(), C):
            stop = min(start + C, row_index.numel())
            rows = row_index[start:stop]
            scale = grad_divergence[start:stop].to(dt)[:, None] / temperature
            h = student_hidden[rows].to(dt)
            # Recompute the chunk's log-probs; d(raw logits) is formed in place in the student block.
            logp_s = _logits(h, ws, bs, temperature).sub_(lse_student[start:stop, None])
            logp_t = _logits(teacher_hidden[rows].to(dt), wt, bt, temperature).sub_(lse_teacher[start:stop, None])
            if divergence == "reverse_kl":      # p_s (log p_s - log p_t - D)
                centered = logp_t.neg_().add_(logp_s).sub_(token_divergence[start:stop, None])
                dx = logp_s.exp_().mul_(centered)
            else:                               # p_s - p_t
                dx = logp_s.exp_().sub_(logp_t.exp_())
            dx.mul_(scale)
            if d_hidden is not None:
                d_hidden.index_add_(0, rows, dx @ ws)
            if d_weight is not None:
                d_weight.addmm_(dx.T, h)
            if d_bias is not None:
                d_bias += dx.sum(0)
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return cast(d_hidden, student_hidden), cast(d_weight, student_weight), \
        None if d_bias is None else d_bias.to(student_bias.dtype)
