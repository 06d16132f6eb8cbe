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
  backward.
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
from ..core.chunks import gather_rows, row_selector
from ..core.rows import chunk_row_index
from ..core.tiles import apply_softcap, compute_dtype, fold_logit_grad, grads_like

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


class _Head:
    def __init__(self, hidden, weight, bias, temperature, softcap):
        self.dt = compute_dtype(hidden.dtype)
        dt = self.dt
        self.hidden = hidden
        self.weight = weight.to(dt) if weight.dtype != dt else weight
        if self.weight.stride(-1) != 1:
            self.weight = self.weight.contiguous()
        self.has_bias = bias is not None
        self.bias = torch.zeros(weight.shape[0], dtype=dt) if bias is None else bias.to(dt).contiguous()
        self.temperature = float(temperature)
        self.softcap = softcap
        self.inv_temp = torch.tensor(1.0 / self.temperature, dtype=dt)
        self.cap = torch.tensor(softcap or 1.0, dtype=dt)
        self.vocab = weight.shape[0]

    def rows(self, rows) -> torch.Tensor:
        h = gather_rows(self.hidden, rows)
        return h if h.dtype == self.dt else h.to(self.dt)

    def target_logits(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Raw logits of the sampled tokens: one gathered dot product per row."""
        return (h * self.weight[y]).sum(-1) + self.bias[y]


def _logit_blocks(head: _Head, row_index: torch.Tensor, chunk_size: int | None):
    """Yields ``(start, stop, rows, h, x)`` per chunk of the distilled rows ``row_index [n]`` (int64):
    the chunk's slice ``[start, stop)``, its rows (a slice when ``row_index`` is ``arange``), their hidden
    states ``h [C, H]`` and raw logits ``x = h W^T [C, V]`` in the compute dtype (a view of one reused block,
    overwritten by the next chunk)."""
    n, V = row_index.numel(), head.vocab
    C = chunk_rows(n, V, max(torch.finfo(head.dt).bits // 8, 4), chunk_size)
    block = torch.empty(C * V, dtype=head.dt)
    row_index, contiguous = chunk_row_index(row_index, head.hidden.shape[0])
    for start in range(0, n, C):
        stop = min(start + C, n)
        rows = row_selector(row_index, start, stop, contiguous)
        h = head.rows(rows)
        yield start, stop, rows, h, torch.mm(h, head.weight.T, out=block[:(stop - start) * V].view(stop - start, V))


def logprob_forward(hidden, weight, bias, row_index, target_ids, *, temperature: float, with_entropy: bool = False,
                    chunk_size: int | None = None, softcap: float | None = None):
    """:func:`sod_kernels.token_logprobs.logprob_forward` on CPU tensors: ``(logp, lse, entropy or None, None)``."""
    head = _Head(hidden, weight, bias, temperature, softcap)
    dt = head.dt
    n = row_index.numel()
    logp, lse = torch.empty(n, dtype=dt), torch.empty(n, dtype=dt)
    entropy = torch.empty(n, dtype=dt) if with_entropy else None
    with torch.no_grad():
        for start, stop, rows, h, x in _logit_blocks(head, row_index, chunk_size):
            chunk_lse, _, ent = cpu_epilogue.run("logprob_stats", x, head.bias, head.inv_temp, head.cap,
                                                 softcap is not None, with_entropy, False, rows=stop - start)
            z_y = apply_softcap(head.target_logits(h, target_ids[rows]), softcap) / head.temperature
            lse[start:stop] = chunk_lse
            logp[start:stop] = z_y - chunk_lse
            if with_entropy:
                entropy[start:stop] = ent
    return logp, lse, entropy, None


def logprob_backward(hidden, weight, bias, row_index, target_ids, lse, grad_logp, *, temperature: float,
                     grad_entropy=None, entropy=None, need_hidden: bool = True, need_weight: bool = True,
                     need_bias: bool = True, chunk_size: int | None = None, softcap: float | None = None):
    """:func:`sod_kernels.token_logprobs.logprob_backward` on CPU tensors (recomputes each chunk's logits)."""
    head = _Head(hidden, weight, bias, temperature, softcap)
    dt, V, H = head.dt, head.vocab, head.weight.shape[1]
    d_hidden = torch.zeros(hidden.shape, dtype=dt) if need_hidden else None
    d_weight = torch.zeros(V, H, dtype=dt) if need_weight else None
    d_bias = torch.zeros(V, dtype=dt) if (need_bias and bias is not None) else None
    with_entropy = grad_entropy is not None
    inv_t = 1.0 / head.temperature
    with torch.no_grad():
        for start, stop, rows, h, x in _logit_blocks(head, row_index, chunk_size):
            c = stop - start
            scale = grad_logp[start:stop].to(dt) * inv_t
            if with_entropy:
                scale_h, ent = grad_entropy[start:stop].to(dt) * inv_t, entropy[start:stop].to(dt)
            else:
                scale_h = ent = scale
            cpu_epilogue.run("logprob_grad", x, head.bias, head.inv_temp, head.cap, lse[start:stop].to(dt),
                             target_ids[rows], scale, scale_h, ent, softcap is not None, with_entropy, rows=c)
            fold_logit_grad(x, h, head.weight, rows, d_hidden, d_weight, d_bias)
    return grads_like((d_hidden, d_weight, d_bias), (hidden, weight, bias))


def single_pass_token_loss(hidden, weight, bias, row_index, target_ids, *, temperature: float,
                           token_loss: Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                           need_hidden: bool, need_weight: bool, need_bias: bool, chunk_size: int | None = None,
                           softcap: float | None = None):
    """A loss ``sum_i f_i(logp_i)`` and its gradients in one pass (the contract of
    :func:`sod_kernels.triton_token_logprobs.single_pass_token_loss`, on CPU tensors; ``logp`` in float32, or
    float64 for float64 inputs).  Returns ``(loss float64 0-D, logp [Na], (d_hidden, d_weight, d_bias))``."""
    head = _Head(hidden, weight, bias, temperature, softcap)
    dt, V, H = head.dt, head.vocab, head.weight.shape[1]
    n = row_index.numel()
    logp = torch.empty(n, dtype=dt)
    d_hidden = torch.zeros(hidden.shape, dtype=dt) if need_hidden else None
    d_weight = torch.zeros(V, H, dtype=dt) if need_weight else None
    d_bias = torch.zeros(V, dtype=dt) if (need_bias and bias is not None) else None
    active = d_hidden is not None or d_weight is not None or d_bias is not None
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start, stop, rows, h, x in _logit_blocks(head, row_index, chunk_size):
            c = stop - start
            y = target_ids[rows]
            raw_y = head.target_logits(h, y)
            chunk_lse, sums, _ = cpu_epilogue.run("logprob_stats", x, head.bias, head.inv_temp, head.cap,
                                                  softcap is not None, False, True, rows=c)
            lp = apply_softcap(raw_y, softcap) / head.temperature - chunk_lse
            logp[start:stop] = lp
            part, dlogp = token_loss(start, stop, lp)
            total += part.to(torch.float64)
            if not active:
                continue
            scale = dlogp.to(dt) / head.temperature
            cpu_epilogue.run("token_loss_grad", x, sums, scale, rows=c)
            at_y = scale if softcap is None else scale * _cap_slope(raw_y, softcap)
            x.scatter_add_(1, y[:, None], at_y[:, None])
            fold_logit_grad(x, h, head.weight, rows, d_hidden, d_weight, d_bias)
    grads = grads_like((d_hidden, d_weight, d_bias), (hidden, weight, bias))
    return total, logp, grads


def _cap_slope(raw: torch.Tensor, cap: float) -> torch.Tensor:
    """``1 - tanh^2(raw / cap)`` as ``4 e / (1 + e)^2``, ``e = exp(-2 |raw / cap|)`` (as the epilogue forms it)."""
    e = torch.exp(-2.0 * (raw / cap).abs())
    return 4.0 * e / ((1.0 + e) * (1.0 + e))
