"""Sampled-token log-probabilities on CPU tensors: whole-vocabulary row chunks and compiled epilogues.

The CPU side of :func:`sod_kernels.fused_token_logprobs` and :func:`sod_kernels.fused_sod_policy_loss`.
Per chunk of ``C`` rows one matrix product writes the raw logits ``x = h W^T`` into a reusable ``[C, V]``
block; a compiled epilogue (:mod:`sod_kernels.core.cpu_epilogue`) takes the row maximum, then one exponential
per entry:

- :func:`logprob_forward` / :func:`logprob_backward` (the contract of
  :func:`sod_kernels.token_logprobs.logprob_forward` / ``logprob_backward``): the forward keeps the
  per-row log-sum-exp (and entropy), the backward recomputes the block and writes
  ``d(logits) = g (onehot(y) - p) / tau`` (entropy term and soft-cap slope included) in place, then
  ``d(hidden) = d(logits) W`` and ``d(weight) += d(logits)^T h``: ``2 N V H`` FLOPs forward, ``6 N V H``
  backward.  When a backward will follow, the forward keeps its last chunk's block (its one reusable buffer,
  :data:`CHUNK_BYTES`) and the backward, which runs the chunks last to first, starts from it: one chunk's
  product fewer (a quarter of the recomputation at 4096 tokens and V = 32000, float32), the same gradients
  bit for bit.
- :func:`single_pass_token_loss` (the contract of the Triton module's function of the same name): a loss
  ``sum_i f_i(logp_i)`` whose per-token derivative is known as soon as ``logp`` is (the PPO dual-clip
  loss): the gradient is formed right after each chunk's statistics, ``6 N V H`` FLOPs in all.

Chunks hold :data:`CHUNK_BYTES` of logits (1024 rows at V = 32000, float32; at least 16 rows).  float32 and
float64 compute in their own dtype, 16-bit inputs in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core import cpu_epilogue
from ..core.chunks import LMHead, even_chunks
from ..core.cpu_pass import ComputeHead
from ..core.loop import CpuBlocks, CpuGrads, KeptBlocks, longest_chunk, run_chunks
from ..core.rows import chunk_row_index
from ..core.tiles import apply_softcap, compute_dtype

CHUNK_BYTES = 128 << 20
MIN_ROWS = 16
ROW_MULTIPLE = 32


def enabled(t: torch.Tensor) -> bool:
    """Whether the CPU path serves these tensors (CPU tensors)."""
    return t.device.type == "cpu"


def chunk_rows(n_rows: int, vocab: int, elem: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        rows = int(chunk_size)
    else:
        rows = max(CHUNK_BYTES // max(vocab * elem, 1), MIN_ROWS)
        if rows > ROW_MULTIPLE:
            rows -= rows % ROW_MULTIPLE
    return max(min(rows, max(n_rows, 1)), 1)


class _Head(ComputeHead):
    """The model's :class:`~sod_kernels.core.cpu_pass.ComputeHead` (weight and bias in the compute dtype) with the
    temperature, the soft-cap and their 0-d epilogue scalars."""

    def __init__(self, hidden, weight, bias, temperature, softcap):
        self.source = LMHead(hidden, weight, bias, weight.shape[0])
        super().__init__(self.source, compute_dtype(hidden.dtype))
        self.temperature = float(temperature)
        self.softcap = softcap
        self.inv_temp = torch.tensor(1.0 / self.temperature, dtype=self.dt)
        self.cap = torch.tensor(softcap or 1.0, dtype=self.dt)
        self.vocab = weight.shape[0]

    def target_logits(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Raw logits of the sampled tokens: one gathered dot product per row."""
        return (h * self.weight[y]).sum(-1) + self.bias[y]


class _Pass:
    """The chunk plan of one call: ``row_index [n]`` as the loop wants it, the chunks (:data:`CHUNK_BYTES` of
    logits each, or ``chunk_size`` rows) and the reusable block (``keep_last`` / ``reuse``: see
    :class:`~sod_kernels.core.loop.CpuBlocks`)."""

    def __init__(self, head: _Head, row_index: torch.Tensor, chunk_size: int | None, *, keep_last: bool = False,
                 reuse: KeptBlocks | None = None):
        n = row_index.numel()
        self.rows, self.contiguous = chunk_row_index(row_index, head.hidden.shape[0])
        self.chunks = even_chunks(n, chunk_rows(n, head.vocab, max(torch.finfo(head.dt).bits // 8, 4), chunk_size))
        self.blocks = CpuBlocks((head,), self.rows, self.contiguous, longest_chunk(self.chunks),
                                keep_last=keep_last, reuse=reuse)

    def grads(self, head: _Head, need_hidden: bool, need_weight: bool, need_bias: bool) -> CpuGrads:
        return CpuGrads(self.rows.numel(), head, head.source, self.rows, self.contiguous, need_hidden=need_hidden,
                        need_weight=need_weight, need_bias=need_bias)


def logprob_forward(hidden, weight, bias, row_index, target_ids, *, temperature: float, with_entropy: bool = False,
                    chunk_size: int | None = None, softcap: float | None = None, keep_block: bool = False):
    """:func:`sod_kernels.token_logprobs.logprob_forward` on CPU tensors: ``(logp, lse, entropy or None, kept)``;
    with ``keep_block`` ``kept`` is the last chunk's raw logit block (a
    :class:`~sod_kernels.core.loop.KeptBlocks`, the forward's one reusable buffer) for :func:`logprob_backward`,
    which then skips that chunk's product; else None."""
    head = _Head(hidden, weight, bias, temperature, softcap)
    dt = head.dt
    n = row_index.numel()
    logp, lse = torch.empty(n, dtype=dt), torch.empty(n, dtype=dt)
    entropy = torch.empty(n, dtype=dt) if with_entropy else None
    plan = _Pass(head, row_index, chunk_size, keep_last=keep_block)

    def epilogue(c):
        chunk_lse, _, ent = cpu_epilogue.run("logprob_stats", c.logits[0], head.bias, head.inv_temp, head.cap,
                                             softcap is not None, with_entropy, False, rows=c.size)
        z_y = apply_softcap(head.target_logits(c.hidden[0], target_ids[c.rows]), softcap) / head.temperature
        lse[c.start:c.stop] = chunk_lse
        logp[c.start:c.stop] = z_y - chunk_lse
        if with_entropy:
            entropy[c.start:c.stop] = ent

    with torch.no_grad():
        run_chunks(plan.chunks, plan.blocks, epilogue)
    return logp, lse, entropy, plan.blocks.kept


def logprob_backward(hidden, weight, bias, row_index, target_ids, lse, grad_logp, *, temperature: float,
                     grad_entropy=None, entropy=None, need_hidden: bool = True, need_weight: bool = True,
                     need_bias: bool = True, chunk_size: int | None = None, softcap: float | None = None,
                     kept: KeptBlocks | None = None):
    """:func:`sod_kernels.token_logprobs.logprob_backward` on CPU tensors: recomputes each chunk's logits, the
    chunks last to first, except the forward's ``kept`` block (:func:`logprob_forward`'s ``keep_block``), which
    is the first chunk here and is overwritten.  The chunk order is the same with and without ``kept``, and
    the kept block is the product the recomputation would form, so the gradients are the same bit for bit."""
    head = _Head(hidden, weight, bias, temperature, softcap)
    dt = head.dt
    plan = _Pass(head, row_index, chunk_size, reuse=kept)
    grads = plan.grads(head, need_hidden, need_weight, need_bias)
    with_entropy = grad_entropy is not None
    inv_t = 1.0 / head.temperature

    def epilogue(c):
        start, stop = c.start, c.stop
        scale = grad_logp[start:stop].to(dt) * inv_t
        if with_entropy:
            scale_h, ent = grad_entropy[start:stop].to(dt) * inv_t, entropy[start:stop].to(dt)
        else:
            scale_h = ent = scale
        x = c.grad_block()   # the logits, overwritten with d(logits)
        cpu_epilogue.run("logprob_grad", x, head.bias, head.inv_temp, head.cap, lse[start:stop].to(dt),
                         target_ids[c.rows], scale, scale_h, ent, softcap is not None, with_entropy, rows=c.size)
        return x

    with torch.no_grad():
        run_chunks(plan.chunks[::-1], plan.blocks, epilogue, grads)
    return grads.finish()


def single_pass_token_loss(hidden, weight, bias, row_index, target_ids, *, temperature: float,
                           token_loss: Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                           need_hidden: bool, need_weight: bool, need_bias: bool, chunk_size: int | None = None,
                           softcap: float | None = None):
    """A loss ``sum_i f_i(logp_i)`` and its gradients in one pass (the contract of
    :func:`sod_kernels.triton_token_logprobs.single_pass_token_loss`, on CPU tensors; ``logp`` in float32, or
    float64 for float64 inputs).  Returns ``(loss float64 0-D, logp [Na], (d_hidden, d_weight, d_bias))``."""
    head = _Head(hidden, weight, bias, temperature, softcap)
    dt = head.dt
    logp = torch.empty(row_index.numel(), dtype=dt)
    plan = _Pass(head, row_index, chunk_size)
    grads = plan.grads(head, need_hidden, need_weight, need_bias)
    total = torch.zeros((), dtype=torch.float64)

    def epilogue(c):
        nonlocal total
        start, stop = c.start, c.stop
        x = c.logits[0]
        y = target_ids[c.rows]
        raw_y = head.target_logits(c.hidden[0], y)
        chunk_lse, sums, _ = cpu_epilogue.run("logprob_stats", x, head.bias, head.inv_temp, head.cap,
                                              softcap is not None, False, True, rows=c.size)
        lp = apply_softcap(raw_y, softcap) / head.temperature - chunk_lse
        logp[start:stop] = lp
        part, dlogp = token_loss(start, stop, lp)
        total += part.to(torch.float64)
        if not grads.active:
            return None
        scale = dlogp.to(dt) / head.temperature
        cpu_epilogue.run("token_loss_grad", x, sums, scale, rows=c.size)
        at_y = scale if softcap is None else scale * _cap_slope(raw_y, softcap)
        x.scatter_add_(1, y[:, None], at_y[:, None])
        return x

    with torch.no_grad():
        run_chunks(plan.chunks, plan.blocks, epilogue, grads)
    return total, logp, grads.finish()


def _cap_slope(raw: torch.Tensor, cap: float) -> torch.Tensor:
    """``1 - tanh^2(raw / cap)`` as ``4 e / (1 + e)^2``, ``e = exp(-2 |raw / cap|)`` (as the epilogue forms it)."""
    e = torch.exp(-2.0 * (raw / cap).abs())
    return 4.0 * e / ((1.0 + e) * (1.0 + e))
