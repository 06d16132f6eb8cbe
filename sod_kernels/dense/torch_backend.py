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

The generalized JSD (``divergence="jsd"``, ``0 < beta < 1``, SPEC section 14) needs both log-partition
functions before its sum (``log M`` mixes the two normalized log-probs), so its forward is two sweeps over the
vocabulary tiles of a row chunk: the statistics sweep above (lse of both models), then :func:`_jsd_sweep`,
which recomputes each tile's logits (``2 R BV (Hs + Ht)`` FLOPs more per tile) and takes, per entry, the two
exponentials of the normalized log-probs plus one more ``exp`` and one ``log1p`` for ``log M`` (the KL's single
sweep: two exponentials per entry).  The backward is one sweep, as for the KLs, with one more ``exp`` + ``log1p``
per entry.  Per row it keeps ``c = KL(p_s || M)`` (the gradient's centre) in the forward's frame.

A hard-label term (``hard_loss_weight``) reaches the backward as the upstream gradient of the student's
sampled log-prob ``logp_s(y)`` per row (``grad_target_logprob``); its ``d(logits)`` ``g (onehot(y) - p_s) / tau``
is formed inside each tile (the one-hot entry scattered into the tile that holds ``y``).

The interface (``divergence_forward`` / ``divergence_backward``) is the one every backend implements;
see :mod:`sod_kernels.dense.autograd`.
"""

from __future__ import annotations

import math

import torch

from ..core.chunks import even_chunks
from ..core.loop import TileGrads, TorchRows, run_chunks
from ..core.rows import chunk_row_index
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
                       student_softcap: float | None = None, teacher_softcap: float | None = None,
                       beta: float | None = None):
    """Per-token divergence and softmax statistics for the rows ``row_index``.

    Args:
        student_hidden: ``[N, Hs]``; student_weight ``[Vs, Hs]``; student_bias ``[Vs]`` or None.
        teacher_hidden: ``[N, Ht]``; teacher_weight ``[Vt, Ht]`` (``Vt >= Vs``); teacher_bias ``[Vt]`` or None.
        row_index: ``[Na]`` int64 rows to compute.
        target_ids: ``[N]`` int64 sampled tokens, or None.
        divergence: ``"reverse_kl"``, ``"forward_kl"`` or ``"jsd"`` (with ``0 < beta < 1``: a second sweep
            over the tiles, see the module docstring).
        student_softcap, teacher_softcap: each model's soft-cap (``cap tanh(x / cap)`` of the raw logits
            ``x``, before the temperature), or None.
        beta: the JSD's mixing weight (``"jsd"`` only).
    Returns:
        ``(D, lse_student, lse_teacher, student_target_logprob, teacher_target_logprob, frame)``, each ``[Na]``
        in float32 (float64 for float64 inputs); the sampled log-probs are None without ``target_ids``.  The
        lse are of the temperature-scaled logits over the first ``Vs`` columns; ``frame [3, Na]`` holds, for
        the KLs, the maxima ``M_s``, ``M_t`` and ``c' = E_w[(z_w - M_w) - (z_o - M_o)]`` (the backward's shifted
        reverse-KL gradient; error about one ulp of the largest logit: docs/math.md); for the JSD the gap
        ``lse_s - lse_t`` formed as ``(M_s - M_t) + (log l_s - log l_t)`` (not from the rounded lse, whose error
        is an ulp of the largest logit), 0, and ``c = KL(p_s || M)``.
    """
    V = student_weight.shape[0]
    dt = compute_dtype(student_hidden.dtype)
    device = student_hidden.device
    heads = _prepared(student_weight, student_bias, V, dt) + _prepared(teacher_weight, teacher_bias, V, dt)
    caps = (student_softcap, teacher_softcap)
    Na = row_index.numel()
    D = torch.empty(Na, dtype=dt, device=device)
    lse_s, lse_t = torch.empty_like(D), torch.empty_like(D)
    lp_s = torch.empty_like(D) if target_ids is not None else None
    lp_t = torch.empty_like(D) if target_ids is not None else None
    frame = torch.empty(3, Na, dtype=dt, device=device)
    jsd = divergence == "jsd"
    rows_idx, contiguous = chunk_row_index(row_index, student_hidden.shape[0])

    def epilogue(c):
        start, stop = c.start, c.stop
        hs, ht = c.hidden
        y = None if target_ids is None else target_ids[c.rows]
        # The JSD's first sweep runs oriented as the reverse KL: only its lse, maxima and sampled logits are used.
        d, ls, lt, m_s, m_t, centre, gap, zy_s, zy_t = _kl_sweep(hs, ht, heads, temperature, caps,
                                                                 divergence != "forward_kl", y)
        frame_rows = (m_s, m_t, centre)
        if jsd:
            d, c_s = _jsd_sweep(hs, ht, heads, temperature, caps, ls, lt, gap, beta)
            frame_rows = (gap, torch.zeros_like(gap), c_s)
        D[start:stop] = d
        lse_s[start:stop], lse_t[start:stop] = ls, lt
        frame[:, start:stop] = torch.stack(frame_rows)
        if y is not None:
            lp_s[start:stop], lp_t[start:stop] = zy_s - ls, zy_t - lt

    with torch.no_grad():
        run_chunks(even_chunks(Na, rows_per_tile(V, chunk_size)),
                   TorchRows((student_hidden, teacher_hidden), rows_idx, contiguous, dt), epilogue)
    return D, lse_s, lse_t, lp_s, lp_t, frame


def _kl_sweep(hs, ht, heads, temperature, caps, reverse: bool, y):
    """One sweep over the vocabulary tiles of a row chunk (``hs [R, Hs]``, ``ht [R, Ht]``; ``heads`` =
    ``(W_s, b_s, W_t, b_t)`` in the compute dtype, ``caps`` the two soft-caps): online maxima and softmax sums
    of both models and the KL accumulator (reverse KL if ``reverse`` else forward KL).

    Returns ``(D, lse_s, lse_t, M_s, M_t, c', gap, z_s(y), z_t(y))``, each ``[R]`` (the last two None without
    ``y``), ``gap = (M_s - M_t) + (log l_s - log l_t)``: ``lse_s - lse_t`` without the lse's rounding.
    """
    ws, bs, wt, bt = heads
    V = ws.shape[0]
    BV = vocab_tile(V)
    n, dt, device = hs.shape[0], hs.dtype, hs.device
    # "w" weighs the KL sum (student for reverse KL, teacher for forward KL), "o" is the other model.
    # A' = sum exp(z_w - m_w) ((z_w - m_w) - (z_o - m_o)) lives in the max-shifted frame (docs/math.md).
    m_w = torch.full((n,), MIN_LOGIT, dtype=dt, device=device)
    m_o = m_w.clone()
    l_w, l_o, acc = (torch.zeros(n, dtype=dt, device=device) for _ in range(3))
    zy_s = zy_t = None
    if y is not None:
        zy_s, zy_t = torch.zeros(n, dtype=dt, device=device), torch.zeros(n, dtype=dt, device=device)
    scratch = None
    for v0 in range(0, V, BV):
        v1 = min(v0 + BV, V)
        zs = tile_logits(hs, *_tile(ws, bs, v0, v1), temperature, caps[0])
        zt = tile_logits(ht, *_tile(wt, bt, v0, v1), temperature, caps[1])
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
    D = centre - log_w + log_o
    if reverse:
        return D, lse_w, lse_o, m_w, m_o, centre, (m_w - m_o) + (log_w - log_o), zy_s, zy_t
    return D, lse_o, lse_w, m_o, m_w, centre, (m_o - m_w) + (log_o - log_w), zy_s, zy_t


def jsd_log_ratios(zs: torch.Tensor, zt: torch.Tensor, shift: torch.Tensor, beta: float, teacher: bool = True):
    """``(r_s, r_t) = (log p_s - log M, log p_t - log M)`` of a tile, ``r_s`` in place of ``zs`` (``zt`` is
    overwritten too); ``r_t`` is None unless ``teacher``.

    ``zs``, ``zt``: ``[R, BV]`` temperature-scaled (capped) logits; ``shift [R, 1]`` =
    ``lse_s - lse_t + log(beta / (1 - beta))``.  With ``d = (log p_t + log beta) - (log p_s + log(1 - beta))``
    = ``z_t - z_s + shift``, ``log M = log p_s + log(1 - beta) + softplus(d)``, so
    ``r_s = -log(1 - beta) - softplus(d)`` and ``r_t = -log(beta) - softplus(-d)``: one ``exp`` and one ``log1p``
    per entry (``softplus(x) = max(x, 0) + log1p(exp(-|x|))``), never a probability that underflows.
    """
    d = zt.sub_(zs).add_(shift)                         # zt <- d
    soft = torch.abs(d, out=zs).neg_().exp_().log1p_()  # zs <- log1p(exp(-|d|))
    r_t = soft.sub(d.clamp(max=0.0)).neg_().add_(-math.log(beta)) if teacher else None  # -log b - softplus(-d)
    r_s = soft.add_(d.clamp_(min=0.0)).neg_().add_(-math.log1p(-beta))                 # -log(1-b) - softplus(d)
    return r_s, r_t


def _jsd_sweep(hs, ht, heads, temperature, caps, lse_s, lse_t, gap, beta: float):
    """The JSD's second sweep over a row chunk's tiles (after :func:`_kl_sweep` gave ``lse_s``, ``lse_t`` and
    their ``gap`` ``[R]``): ``D = beta KL(p_t || M) + (1 - beta) KL(p_s || M)`` and ``c = KL(p_s || M)``, each
    ``[R]``.  Per entry: the tile's logits again, ``exp`` of both normalized log-probs and
    :func:`jsd_log_ratios`."""
    ws, bs, wt, bt = heads
    V = ws.shape[0]
    BV = vocab_tile(V)
    kl_s, kl_t, total_s, total_t = (torch.zeros_like(lse_s) for _ in range(4))
    shift = (gap + math.log(beta / (1.0 - beta)))[:, None]
    for v0 in range(0, V, BV):
        v1 = min(v0 + BV, V)
        zs = tile_logits(hs, *_tile(ws, bs, v0, v1), temperature, caps[0])
        zt = tile_logits(ht, *_tile(wt, bt, v0, v1), temperature, caps[1])
        p_s = (zs - lse_s[:, None]).exp_()
        p_t = (zt - lse_t[:, None]).exp_()
        total_s.add_(p_s.sum(1))
        total_t.add_(p_t.sum(1))
        r_s, r_t = jsd_log_ratios(zs, zt, shift, beta)
        kl_s.add_(p_s.mul_(r_s).sum(1))
        kl_t.add_(p_t.mul_(r_t).sum(1))
    # Normalized by the sweep's own sums: exp(z - lse) sums to 1 only up to the lse's rounding (an ulp of the
    # largest logit), and the backward's p_s (r - c) must sum to 0 with the same p_s.
    kl_s.div_(total_s)
    kl_t.div_(total_t)
    return beta * kl_t + (1.0 - beta) * kl_s, kl_s


def divergence_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                        row_index, lse_student, lse_teacher, token_divergence, grad_divergence, *, divergence: str,
                        temperature: float, need_hidden: bool = True, need_weight: bool = True,
                        need_bias: bool = True, frame: torch.Tensor | None = None, chunk_size: int | None = None,
                        student_softcap: float | None = None, teacher_softcap: float | None = None,
                        beta: float | None = None, target_ids: torch.Tensor | None = None,
                        grad_target_logprob: torch.Tensor | None = None):
    """Gradients of ``sum_i grad_divergence[i] * D[i] + grad_target_logprob[i] * logp_s(y_i)`` with respect to
    the student's hidden, weight, bias.

    ``grad_divergence`` is ``[Na]`` (the upstream gradient of each row's D: coef * w * m / normalizer
    times the caller's upstream gradient).  Per row, with raw logits ``x = z * temperature``:
    reverse KL ``dD/dx = p_s (log p_s - log p_t - D) / tau``, formed as
    ``p_s ((z_s - M_s) - (z_t - M_t) - c')`` from the forward's ``frame`` (no O(log V) quantity subtracted; the
    logits' rounding remains, docs/math.md; without ``frame`` from ``lse`` and ``D``); forward KL
    ``dD/dx = (p_s - p_t) / tau``; JSD (``beta``) ``dD/dx = (1 - beta) p_s (r - c) / tau`` with
    ``r = log p_s - log M`` (:func:`jsd_log_ratios`, one more ``exp`` + ``log1p`` per entry) and
    ``c = KL(p_s || M)`` from ``frame[2]`` (one more sweep without ``frame``).  The hard-label part
    (``target_ids [N]`` int64 and ``grad_target_logprob [Na]``, both or neither): ``g (onehot(y) - p_s) / tau``.
    With soft-caps ``z`` are the capped logits and ``dD/dx`` is multiplied by the student cap's slope
    ``1 - tanh^2(x / cap)``.  Returns ``(d_hidden [N, Hs], d_weight [Vs, Hs], d_bias [Vs])`` in the inputs'
    dtypes (None where not needed); rows outside ``row_index`` get zero gradient.
    """
    V = student_weight.shape[0]
    dt = compute_dtype(student_hidden.dtype)
    heads = _prepared(student_weight, student_bias, V, dt) + _prepared(teacher_weight, teacher_bias, V, dt)
    ws, bs, wt, bt = heads
    caps = (student_softcap, teacher_softcap)
    grads = TileGrads(student_hidden, ws, student_bias, dt, need_hidden=need_hidden, need_weight=need_weight,
                      need_bias=need_bias, like=(student_hidden, student_weight, student_bias))
    if not grads.active:
        return grads.finish()
    hard = grad_target_logprob is not None
    BV = vocab_tile(V)
    rows_idx, contiguous = chunk_row_index(row_index, student_hidden.shape[0])

    def epilogue(c):
        start, stop = c.start, c.stop
        h, ht = c.hidden
        scale = grad_divergence[start:stop].to(dt)[:, None] / temperature
        ls, lt = lse_student[start:stop, None], lse_teacher[start:stop, None]
        form = _row_gradient_form(divergence, frame, start, stop, ls, lt, token_divergence, beta,
                                  (h, ht, heads, temperature, caps))
        y = target_ids[c.rows] if hard else None
        g_y = grad_target_logprob[start:stop].to(dt)[:, None] / temperature if hard else None
        for v0 in range(0, V, BV):
            v1 = min(v0 + BV, V)
            w_tile, b_tile = _tile(ws, bs, v0, v1)
            zs, slope = tile_logits_and_slope(h, w_tile, b_tile, temperature, student_softcap)
            zt = tile_logits(ht, *_tile(wt, bt, v0, v1), temperature, teacher_softcap)
            dx, p_s = _tile_logit_grad(divergence, zs, zt, ls, lt, scale, form, beta)
            if hard:
                _add_hard_label(dx, p_s, y, g_y, v0, v1)
            c.fold_tile(dx, slice(v0, v1), w_tile, slope)

    with torch.no_grad():
        run_chunks(even_chunks(row_index.numel(), rows_per_tile(V, chunk_size)),
                   TorchRows((student_hidden, teacher_hidden), rows_idx, contiguous, dt), epilogue, grads)
    return grads.finish()


def _row_gradient_form(divergence, frame, start, stop, ls, lt, token_divergence, beta, chunk):
    """The per-row constant of a chunk's gradient (``[R, 1]``): reverse KL the ``shift`` with
    ``(z_s - z_t) + shift = (z_s - M_s) - (z_t - M_t) - c'`` (from ``frame``, else from ``lse`` and ``D``);
    JSD ``(gap + log(beta / (1 - beta)), c)`` (the gap ``lse_s - lse_t`` and ``c`` from the frame, else from
    ``lse`` and one more sweep over ``chunk = (h_s, h_t, heads, temperature, caps)``); forward KL None."""
    if divergence == "reverse_kl":
        if frame is not None:
            return (frame[1, start:stop] - frame[0, start:stop] - frame[2, start:stop])[:, None]
        return lt - ls - token_divergence[start:stop, None]
    if divergence == "jsd":
        if frame is not None:
            gap, c = frame[0, start:stop], frame[2, start:stop]
        else:
            h, ht, heads, temperature, caps = chunk
            gap = ls[:, 0] - lt[:, 0]
            c = _jsd_sweep(h, ht, heads, temperature, caps, ls[:, 0], lt[:, 0], gap, beta)[1]
        return gap[:, None] + math.log(beta / (1.0 - beta)), c[:, None]
    return None


def _tile_logit_grad(divergence, zs, zt, ls, lt, scale, form, beta):
    """``(dD/dz * scale, p_s)`` of a tile (``[R, BV]`` each; ``scale [R, 1]``: the upstream gradient over tau),
    formed in place of ``zs`` / ``zt`` (the tile's temperature-scaled student and teacher logits)."""
    if divergence == "reverse_kl":      # p_s ((z_s - z_t) + shift)
        q = zt.neg_().add_(zs).add_(form).mul_(scale)
        p_s = zs.sub_(ls).exp_()
        return q.mul_(p_s), p_s
    if divergence == "jsd":             # (1 - beta) p_s (r_s - c)
        shift, c = form
        p_s = (zs - ls).exp_()
        r_s, _ = jsd_log_ratios(zs, zt, shift, beta, teacher=False)
        return r_s.sub_(c).mul_(scale * (1.0 - beta)).mul_(p_s), p_s
    p_s = zs.sub_(ls).exp_()            # p_s - p_t
    return zt.sub_(lt).exp_().neg_().add_(p_s).mul_(scale), p_s


def _add_hard_label(dx, p_s, y, g_y, v0: int, v1: int) -> None:
    """``dx += g_y (onehot(y) - p_s)`` for a tile of columns ``[v0, v1)`` (``p_s [R, BV]``, ``y [R]`` int64,
    ``g_y [R, 1]``): the softmax part everywhere, the one-hot entry scattered into the row's column when ``y``
    lies in this tile (one entry per row: deterministic)."""
    dx.sub_(p_s * g_y)
    inside = ((y >= v0) & (y < v1)).to(dx.dtype)[:, None]
    col = (y - v0).clamp(0, v1 - v0 - 1)[:, None]
    dx.scatter_add_(1, col, g_y * inside)
