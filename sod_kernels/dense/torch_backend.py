"""Chunked PyTorch backend of the per-token divergence (docs/math.md) and its student gradient.

Used for CPU tensors (and as a fallback anywhere).  Work is cut into tiles of ``R`` rows x ``BV``
vocabulary columns (``BV = min(V, VOCAB_TILE)``, ``R`` chosen so one tile holds about ``CHUNK_ELEMENTS``
floats).  The forward pass sweeps the vocabulary tiles of a row chunk with an online log-sum-exp (running
max and sum per row for both models, and the KL accumulator ``A`` rescaled with the softmax sum, docs/math.md
section 3); the backward pass recomputes each tile's logits from the saved per-token statistics
(lse_s, lse_t, D) instead of storing them.  Tiles (rather than chunks of full vocabulary rows) keep the
matrix products large in both dimensions (``R`` rows share each weight tile), which is what makes this
path fast on CPUs: a chunk of few rows against the whole vocabulary streams the full weights from memory
for every few rows.

Cost for ``Na`` distilled tokens: forward ``2 Na V (Hs + Ht)`` FLOPs; backward the same again plus
``4 Na V Hs`` for d(hidden) and d(weight).  Extra memory: O(Na) statistics plus 3 tile blocks of
``R x BV`` floats plus, for bf16/fp16 weights, one float32 copy of each weight (O(V H), never O(N V)).

The interface (``divergence_forward`` / ``divergence_backward``) is the one every backend implements;
see :mod:`sod_kernels.dense.autograd`.
"""

from __future__ import annotations

import torch

from ..core.tiles import MIN_LOGIT, compute_dtype, rows_per_tile, tile_logits, tile_logits_and_slope, vocab_tile

def _prepared(weight: torch.Tensor, bias: torch.Tensor | None, vocab: int, dtype: torch.dtype):
    """First ``vocab`` rows of a weight (a view for the padded teacher) in the compute dtype."""
    weight = weight[:vocab].to(dtype)
    bias = None if bias is None else bias[:vocab].to(dtype)
    return weight, bias


def _tile(weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int):
    return weight[v0:v1], None if bias is None else bias[v0:v1]


def divergence_forward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       row_index, target_ids, *, divergence: str, temperature: float, chunk_size: int | None = None,
                       student_softcap: float | None = None, teacher_softcap: float | None = None):
    """Per-token divergence and softmax statistics for the rows ``row_index``.

    Args:
        student_hidden: ``[N, Hs]``; student_weight ``[Vs, Hs]``; student_bias ``[Vs]`` or None.
        teacher_hidden: ``[N, Ht]``; teacher_weight ``[Vt, Ht]`` (``Vt >= Vs``); teacher_bias ``[Vt]`` or None.
        row_index: ``[Na]`` int64 rows to compute.
        target_ids: ``[N]`` int64 sampled tokens, or None.
        student_softcap, teacher_softcap: each model's soft-cap (``cap tanh(x / cap)`` of the raw logits
            ``x``, before the temperature), or None.
    Returns:
        ``(D, lse_student, lse_teacher, student_target_logprob, teacher_target_logprob, frame)``, each ``[Na]``
        in float32 (float64 for float64 inputs); the sampled log-probs are None without ``target_ids``.  The
        lse are of the temperature-scaled logits over the first ``Vs`` columns; ``frame [3, Na]`` holds the
        maxima ``M_s``, ``M_t`` and ``c' = E_w[(z_w - M_w) - (z_o - M_o)]`` for the backward's
        shifted reverse-KL gradient (error about one ulp of the largest logit: docs/math.md).
    """
    V = student_weight.shape[0]
    dt = compute_dtype(student_hidden.dtype)
    device = student_hidden.device
    ws, bs = _prepared(student_weight, student_bias, V, dt)
    wt, bt = _prepared(teacher_weight, teacher_bias, V, dt)
    Na = row_index.numel()
    D = torch.empty(Na, dtype=dt, device=device)
    lse_s, lse_t = torch.empty_like(D), torch.empty_like(D)
    lp_s = torch.empty_like(D) if target_ids is not None else None
    lp_t = torch.empty_like(D) if target_ids is not None else None
    frame = torch.empty(3, Na, dtype=dt, device=device)
    R, BV = rows_per_tile(V, chunk_size), vocab_tile(V)
    reverse = divergence == "reverse_kl"
    with torch.no_grad():
        for start in range(0, Na, R):
            stop = min(start + R, Na)
            rows = row_index[start:stop]
            n = stop - start
            hs, ht = student_hidden[rows].to(dt), teacher_hidden[rows].to(dt)
            # "w" weighs the KL sum (student for reverse KL, teacher for forward KL), "o" is the other model.
            # A' = sum exp(z_w - m_w) ((z_w - m_w) - (z_o - m_o)) lives in the max-shifted frame (docs/math.md).
            m_w = torch.full((n,), MIN_LOGIT, dtype=dt, device=device)
            m_o = m_w.clone()
            l_w, l_o, acc = (torch.zeros(n, dtype=dt, device=device) for _ in range(3))
            y = None if target_ids is None else target_ids[rows]
            zy_s = zy_t = None
            if y is not None:
                zy_s, zy_t = torch.zeros(n, dtype=dt, device=device), torch.zeros(n, dtype=dt, device=device)
            scratch = None
            for v0 in range(0, V, BV):
                v1 = min(v0 + BV, V)
                zs = tile_logits(hs, *_tile(ws, bs, v0, v1), temperature, student_softcap)
                zt = tile_logits(ht, *_tile(wt, bt, v0, v1), temperature, teacher_softcap)
                if y is not None:
                    inside = (y >= v0) & (y < v1)
                    col = (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
                    zy_s = torch.where(inside, zs.gather(1, col).squeeze(1), zy_s)
                    zy_t = torch.where(inside, zt.gather(1, col).squeeze(1), zy_t)
                z_w, z_o = (zs, zt) if reverse else (zt, zs)
                new_w, new_o = torch.maximum(m_w, z_w.amax(1)), torch.maximum(m_o, z_o.amax(1))
                acc.add_(l_w * ((m_w - new_w) - (m_o - new_o))).mul_((m_w - new_w).exp_())  # re-frame A'
                l_w.mul_((m_w - new_w).exp_())
                l_o.mul_((m_o - new_o).exp_())
                if scratch is None or scratch.shape != zs.shape:
                    scratch = torch.empty_like(zs)
                z_w.sub_(new_w[:, None])
                z_o.sub_(new_o[:, None])
                l_o.add_(torch.exp(z_o, out=scratch).sum(1))
                weights = torch.exp(z_w, out=scratch)
                l_w.add_(weights.sum(1))
                acc.add_(weights.mul_(z_o.neg_().add_(z_w)).sum(1))
                m_w, m_o = new_w, new_o
            centre = acc / l_w
            log_w, log_o = l_w.log(), l_o.log()
            lse_w, lse_o = m_w + log_w, m_o + log_o
            D[start:stop] = centre - log_w + log_o
            ls, lt = (lse_w, lse_o) if reverse else (lse_o, lse_w)
            lse_s[start:stop], lse_t[start:stop] = ls, lt
            frame[0, start:stop], frame[1, start:stop] = (m_w, m_o) if reverse else (m_o, m_w)
            frame[2, start:stop] = centre
            if y is not None:
                lp_s[start:stop], lp_t[start:stop] = zy_s - ls, zy_t - lt
    return D, lse_s, lse_t, lp_s, lp_t, frame


def divergence_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                        row_index, lse_student, lse_teacher, token_divergence, grad_divergence, *, divergence: str,
                        temperature: float, need_hidden: bool = True, need_weight: bool = True,
                        need_bias: bool = True, frame: torch.Tensor | None = None, chunk_size: int | None = None,
                        student_softcap: float | None = None, teacher_softcap: float | None = None):
    """Gradients of ``sum_i grad_divergence[i] * D[i]`` with respect to the student's hidden, weight, bias.

    ``grad_divergence`` is ``[Na]`` (the upstream gradient of each row's D: coef * w * m / normalizer
    times the caller's upstream gradient).  Per row, with raw logits ``x = z * temperature``:
    reverse KL ``dD/dx = p_s (log p_s - log p_t - D) / tau``, formed as
    ``p_s ((z_s - M_s) - (z_t - M_t) - c')`` from the forward's ``frame`` (no O(log V) quantity subtracted; the
    logits' rounding remains, docs/math.md; without ``frame`` from ``lse`` and ``D``); forward KL ``dD/dx = (p_s - p_t) / tau``.  With soft-caps
    ``z`` are the capped logits and ``dD/dx`` is multiplied by the student cap's slope ``1 - tanh^2(x / cap)``.
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
    R, BV = rows_per_tile(V, chunk_size), vocab_tile(V)
    with torch.no_grad():
        for start in range(0, row_index.numel(), R):
            stop = min(start + R, row_index.numel())
            rows = row_index[start:stop]
            scale = grad_divergence[start:stop].to(dt)[:, None] / temperature
            h, ht = student_hidden[rows].to(dt), teacher_hidden[rows].to(dt)
            ls, lt = lse_student[start:stop, None], lse_teacher[start:stop, None]
            if frame is not None:  # reverse KL: (z_s - M_s) - (z_t - M_t) - c' = z_s - z_t + shift
                shift = (frame[1, start:stop] - frame[0, start:stop] - frame[2, start:stop])[:, None]
            else:                  # (z_s - lse_s) - (z_t - lse_t) - D
                shift = lt - ls - token_divergence[start:stop, None]
            d_rows = torch.zeros(stop - start, ws.shape[1], dtype=dt, device=ws.device) if need_hidden else None
            for v0 in range(0, V, BV):
                v1 = min(v0 + BV, V)
                w_tile, b_tile = _tile(ws, bs, v0, v1)
                zs, slope = tile_logits_and_slope(h, w_tile, b_tile, temperature, student_softcap)
                zt = tile_logits(ht, *_tile(wt, bt, v0, v1), temperature, teacher_softcap)
                if divergence == "reverse_kl":      # p_s ((z_s - z_t) + shift)
                    centered = zt.neg_().add_(zs).add_(shift)
                    dx = zs.sub_(ls).exp_().mul_(centered)
                else:                               # p_s - p_t
                    dx = zs.sub_(ls).exp_().sub_(zt.sub_(lt).exp_())
                dx.mul_(scale)
                if slope is not None:
                    dx.mul_(slope)
                if d_rows is not None:
                    d_rows.addmm_(dx, w_tile)
                if d_weight is not None:
                    d_weight[v0:v1].addmm_(dx.T, h)
                if d_bias is not None:
                    d_bias[v0:v1] += dx.sum(0)
            if d_hidden is not None:
                d_hidden.index_add_(0, rows, d_rows)
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return cast(d_hidden, student_hidden), cast(d_weight, student_weight), \
        None if d_bias is None else d_bias.to(student_bias.dtype)
