"""The experimental dual-GEMM single pass of the dense KL loss (``fused_sod_loss(..., impl="dual_gemm")``).

Same contract and result as :func:`sod_kernels.dense.triton_backend.single_pass_loss`; per row chunk:

1. :func:`~sod_kernels.dense.dual_gemm_kernels.dual_gemm_stats`: one Triton kernel computes both models' logit
   tiles (``tl.dot``, float32 accumulation) and in its epilogue the exact float32 statistics (in the partials
   layout of :func:`~sod_kernels.dense.kernels.kl_partials`), the per-tile frame, two 16-bit ``[C, V]`` arrays for
   the gradient and the raw target logits; no float32 ``[C, V]`` logit block exists.
2. :func:`~sod_kernels.dense.kernels.kl_row_finish`, unchanged: merges the splits (``D``, lse, frame), the sampled
   log-probs (from the gathered target logits, read as a one-column block), the weights, the loss slots and the
   gradient scale.
3. :func:`~sod_kernels.dense.dual_gemm_kernels.dual_logit_grad`: ``d(logits)`` in the input dtype from the 16-bit
   arrays, folded by :class:`~sod_kernels.core.loop.DeviceGrads` (the
   :class:`~sod_kernels.core.chunks.GradAccumulator` products) exactly as in the default pass.

The chunks run in :func:`sod_kernels.core.loop.run_chunks` with :class:`~sod_kernels.core.loop.HiddenRows` as its
blocks: the chunk's hidden rows only, no logit products.

Supported: ``"reverse_kl"`` and ``"forward_kl"``, biases, temperature, sampled targets (the sampled signal and
the hard-label term), every weight mode of the plan; float32, bfloat16, float16 inputs.  Not supported (the loss
routes these calls to the default path, see :func:`sod_kernels.dense.loss.dual_gemm_supports`): the JSD and
logit soft-caps.

``store`` (``SOD_KERNELS_DUAL_GEMM_STORE``: ``"fp16"`` by default, or ``"bf16"``) is the dtype of the two stored
arrays: fp16 keeps 8x finer differences (measured on the interpreter: ``benchmarks/dual_gemm_accuracy.py``);
its range ends at 65504 (larger logit differences are clamped), bf16 has float32's range.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ..core.loop import DeviceGrads, HiddenRows, longest_chunk, run_chunks
from ..core.options import SinglePassResult
from .dual_gemm_kernels import STORE_DTYPES, dual_gemm_stats, dual_logit_grad, split_plan
from .kernels import WEIGHTS_STEPS, kl_row_finish
from .pass_state import ChunkWeightPlan, ForwardResult
from .triton_backend import KLProblem

DEFAULT_STORE = "fp16"
STORE_ENV = "SOD_KERNELS_DUAL_GEMM_STORE"


def store_dtype(store: str | None = None) -> torch.dtype:
    """The 16-bit dtype of the stored arrays: ``store`` or ``SOD_KERNELS_DUAL_GEMM_STORE`` (``"fp16"`` default,
    ``"bf16"``)."""
    name = store if store is not None else (os.environ.get(STORE_ENV, "").strip() or DEFAULT_STORE)
    if name not in STORE_DTYPES:
        raise ValueError(f"{STORE_ENV} / store must be one of {tuple(STORE_DTYPES)}, got {name!r}")
    return STORE_DTYPES[name]


def single_pass_loss(p: KLProblem, chunks: list[tuple[int, int]],
                     chunk_weights: Callable[[int, int, torch.Tensor, torch.Tensor | None], torch.Tensor], *,
                     coef: float, normalizer: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                     sampled_signal: bool = False, hard_loss_weight: float = 0.0,
                     store: str | None = None) -> SinglePassResult:
    """``L = coef * sum_i w_i D_i / normalizer + lambda * sum_i (-logp_s(y_i)) / normalizer`` and its student
    gradients in one pass over ``chunks`` (the contract of
    :func:`sod_kernels.dense.triton_backend.single_pass_loss`), with the dual-GEMM kernels.  ``store``: the
    16-bit dtype name of the stored arrays (None: :func:`store_dtype`'s default).

    Launches per chunk: the dual-GEMM kernel, the row-finish kernel, the ``d(logits)`` kernel, the ``d(hidden)``
    product and per fold the ``d(weight)`` (and ``d(bias)``) product; gathers of the rows when they are not
    contiguous.  No host synchronisation inside the pass."""
    if p.jsd or p.student_softcap is not None or p.teacher_softcap is not None:
        raise ValueError("the dual-GEMM pass supports reverse_kl / forward_kl without soft-caps; "
                         "use impl='default' for the JSD or soft-capped logits")
    hard_weight = float(hard_loss_weight)
    if hard_weight and p.target_ids is None:
        raise ValueError("hard_loss_weight > 0 needs target_ids")
    if sampled_signal and p.target_ids is None:
        raise ValueError("the sampled signal needs target_ids")
    half = store_dtype(store)
    device = p.student.hidden.device
    f32 = torch.float32
    out = ForwardResult(p.n_rows, device, p.target_ids is not None)
    longest = longest_chunk(chunks)
    grads = DeviceGrads(p.student, p.row_index, p.contiguous, need_hidden=need_hidden, need_weight=need_weight,
                        need_bias=need_bias, block_rows=longest)
    vocab = p.vocab
    n_tiles, per_split, splits = split_plan(longest, vocab)
    a_buf = torch.empty(longest, vocab, dtype=half, device=device)
    b_buf = torch.empty(longest, vocab, dtype=half, device=device)
    frame_buf = torch.empty(3 * longest * n_tiles, dtype=f32, device=device)
    part_buf = torch.empty(5 * longest * splits, dtype=f32, device=device)
    grad_scale = coef / (normalizer * p.temperature)
    weights = ChunkWeightPlan(chunk_weights, grad_scale, longest, device)
    slots = torch.zeros(2, max(len(chunks), 1), dtype=torch.float64, device=device)  # sum w D, sum -lp_s per chunk
    scale = torch.empty(longest, dtype=f32, device=device)
    targets = gx_buf = zero_cols = None
    if p.target_ids is not None:  # the distilled rows' targets, int32, once per call
        targets = (p.target_ids if p.contiguous else p.target_ids[p.row_index]).to(torch.int32)
        gx_buf = torch.empty(2 * longest, dtype=f32, device=device)
        zero_cols = torch.zeros(longest, dtype=torch.int32, device=device)
    hard_scale = torch.full((longest,), hard_weight / (normalizer * p.temperature), dtype=f32, device=device) \
        if hard_weight and grads.active else None
    sb, tb = p.bias(p.student), p.bias(p.teacher)
    ws, wt = p.student.used_weight, p.teacher.used_weight

    def epilogue(c):
        start, stop, n, i = c.start, c.stop, c.size, c.index
        hs, ht = c.hidden
        a, b = a_buf[:n], b_buf[:n]
        frame = frame_buf[: 3 * n * n_tiles].view(3, n, n_tiles)
        part = part_buf[: 5 * n * splits].view(5, n, splits)
        gx = gx_buf[: 2 * n].view(2, n) if gx_buf is not None else None
        chunk_targets = targets[start:stop] if targets is not None else None
        dual_gemm_stats(hs, ws, ht, wt, sb, tb, chunk_targets, part, frame, a, b, gx, forward_kl=p.forward_kl,
                        temperature=p.temperature, tiles_per_split=per_split)
        # The target logits (bias included) as one-column blocks read at column 0: kl_row_finish unchanged.
        gxs = gx[0].view(n, 1) if gx is not None else a
        gxt = gx[1].view(n, 1) if gx is not None else a
        kl_row_finish(part, None, gxs, gxt, None, None, zero_cols[:n] if gx is not None else None, out.views(start),
                      weights.args(start, stop), scale[:n], slots[:, i], forward_kl=p.forward_kl,
                      temperature=p.temperature, sampled_signal=sampled_signal and weights.mode == WEIGHTS_STEPS,
                      hard=bool(hard_weight))
        if not weights.in_kernel:
            weights.apply_callable(out, start, stop, sampled_signal, scale, slots[0, i])
        if not grads.active:
            return None
        hard = (chunk_targets, hard_scale[:n]) if hard_weight else None
        return dual_logit_grad(a, b, frame, out.stats(start, stop), scale[:n], c.grad_block(),
                               forward_kl=p.forward_kl, hard=hard)

    run_chunks(chunks, HiddenRows((p.student, p.teacher), p.row_index, p.contiguous), epilogue, grads)
    totals = slots.sum(1)
    loss = (totals[0] * (coef / normalizer) + totals[1] * (hard_weight / normalizer)).to(f32)
    return SinglePassResult(loss, out.D, out.lp_s, out.lp_t, grads.finish())
