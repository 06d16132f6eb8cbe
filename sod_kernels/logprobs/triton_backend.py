"""GPU backend of :func:`sod_kernels.fused_token_logprobs` and the one-pass policy loss, on the chunked core.

Per row chunk (:mod:`sod_kernels.core.chunks`): the logit block ``h[rows] @ W.T`` with float32 output, the
statistics kernel of :mod:`sod_kernels.core.kernels` (log-sum-exp, optionally the entropy), the
sampled logit gathered from the block, and, where a gradient is formed, the ``d(logits)`` kernel and the
two contraction products (no atomics; deterministic).

- :func:`logprob_forward` / :func:`logprob_backward`: the two-pass contract of
  :class:`~sod_kernels.token_logprobs.TokenLogprobs` (a downstream loss unknown to the kernel: the backward
  recomputes the logits).  ``2 N V H`` FLOPs forward, ``2 N V H + 4 N V H`` backward.
- :func:`single_pass_token_loss`: a loss that is a per-token function of ``logp(y)`` (the PPO dual-clip
  loss): its per-token derivative is known as soon as a chunk's log-sum-exp is, so ``d(logits)`` is formed
  right there: ``2 N V H + 4 N V H`` FLOPs in all, the single-pass minimum.

Headline (N = 16384, H = 1024, V = 151936, bf16): 1.53e13 FLOP in one pass (~20 ms at 780 TFLOP/s); the
epilogue moves ``4 N V`` + ``6 N V`` bytes (25 GB, ~6 ms at 4.3 TB/s).  Rows per chunk from the byte
budget :data:`sod_kernels.core.chunks.FAST_CHUNK_BYTES` (~800 at V = 152k).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.chunks import (FAST_CHUNK_BYTES, LOW_MEMORY_CHUNK_BYTES, GradAccumulator, LMHead, chunk_rows, even_chunks,
                           gather_rows, logits_into, row_plan, row_selector)
from ..core.tiles import apply_softcap
from ..core.kernels import LogprobRowStats, logprob_row_stats
from .kernels import (column_sum_add, logprob_logit_grad, logprob_logit_grad_scaled, logprob_partials,
                      policy_token_terms)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class LogprobProblem:
    """One call's inputs as the chunk loops see them."""

    head: LMHead
    row_index: torch.Tensor
    contiguous: bool
    target_ids: torch.Tensor
    temperature: float
    softcap: float | None = None  # cap tanh(x / cap) of the raw logits, before 1/tau
    budget: int = FAST_CHUNK_BYTES  # bytes of the chunk buffers (LOW_MEMORY_CHUNK_BYTES for memory="low")

    @classmethod
    def build(cls, hidden, weight, bias, row_index, target_ids, temperature,
              softcap: float | None = None, memory: str = "fast") -> LogprobProblem:
        hidden, weight, rows, contiguous = row_plan(hidden, weight, row_index, SUPPORTED_DTYPES)
        return cls(LMHead(hidden, weight, bias, weight.shape[0]), rows, contiguous,
                   target_ids.to(torch.int64), float(temperature), None if softcap is None else float(softcap),
                   LOW_MEMORY_CHUNK_BYTES if memory == "low" else FAST_CHUNK_BYTES)

    @property
    def n_rows(self) -> int:
        return self.row_index.numel()

    def chunks(self, grad: bool, chunk_size: int | None) -> list[tuple[int, int]]:
        per_entry = 4 + (GradAccumulator.GROUP * self.head.hidden.element_size() if grad else 0)
        return even_chunks(self.n_rows, chunk_rows(self.n_rows, self.head.vocab, per_entry, budget=self.budget,
                                                   chunk_size=chunk_size))


class _Block:
    """Reusable float32 logit block of at most ``rows`` rows (gradient blocks: GradAccumulator)."""

    def __init__(self, p: LogprobProblem, rows: int):
        self.x = torch.empty(rows, p.head.vocab, dtype=torch.float32, device=p.head.hidden.device)

    def logits(self, p: LogprobProblem, start: int, stop: int):
        rows = row_selector(p.row_index, start, stop, p.contiguous)
        h = gather_rows(p.head.hidden, rows)
        return rows, h, logits_into(self.x[: stop - start], h, p.head.used_weight)


def _sampled(p: LogprobProblem, rows, x: torch.Tensor, stats: LogprobRowStats):
    """``(targets [C], logp(y) [C])`` of a chunk from its whole-vocabulary block."""
    y = p.target_ids[rows]
    z = x.gather(1, y[:, None]).squeeze(1)
    if p.head.bias is not None:
        z = z + p.head.bias[y].float()
    return y, apply_softcap(z, p.softcap) / p.temperature - stats.lse


def logprob_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_index: torch.Tensor,
                    target_ids: torch.Tensor, *, temperature: float, with_entropy: bool = False,
                    chunk_size: int | None = None, softcap: float | None = None,
                    memory: str = "fast"):
    """Sampled-token log-probs (and entropies) of the rows ``row_index``.

    Args: ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None (float32 / bfloat16 / float16),
    ``row_index [Na]`` int64 ascending, ``target_ids [N]`` int64 in ``[0, V)``, ``softcap`` (``cap tanh(x /
    cap)`` of the raw logits before ``1/tau``) or None.
    Returns ``(logp [Na], lse [Na], entropy [Na] or None, frame [2, Na])`` float32; ``frame`` (max, shifted
    mean) serves the entropy gradient in :func:`logprob_backward`.
    """
    p = LogprobProblem.build(hidden, weight, bias, row_index, target_ids, temperature, softcap, memory)
    n, device = p.n_rows, hidden.device
    logp = torch.empty(n, dtype=torch.float32, device=device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    frame = torch.zeros(2, n, dtype=torch.float32, device=device)
    chunks = p.chunks(False, chunk_size)
    block = _Block(p, max((b - a for a, b in chunks), default=1))
    for start, stop in chunks:
        rows, _, x = block.logits(p, start, stop)
        stats = logprob_row_stats(x, p.head.used_bias, temperature=p.temperature, with_entropy=with_entropy,
                                  softcap=p.softcap)
        _, logp[start:stop] = _sampled(p, rows, x, stats)
        lse[start:stop] = stats.lse
        frame[0, start:stop], frame[1, start:stop] = stats.max, stats.mean
        if with_entropy:
            entropy[start:stop] = stats.entropy
    return logp, lse, entropy, frame


def logprob_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_index: torch.Tensor,
                     target_ids: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor, *, temperature: float,
                     grad_entropy: torch.Tensor | None = None, frame: torch.Tensor | None = None,
                     need_hidden: bool = True, need_weight: bool = True, need_bias: bool = True,
                     chunk_size: int | None = None, softcap: float | None = None, memory: str = "fast"):
    """Gradients of ``sum_i grad_logp[i] logp[i] (+ grad_entropy[i] H[i])`` w.r.t. hidden ``[N, H]``, weight
    ``[V, H]`` and bias ``[V]``, recomputing the logit blocks; ``frame`` is needed with ``grad_entropy``.
    Returns the three gradients in the inputs' dtypes (None where not needed); rows outside ``row_index``
    get zero gradient."""
    p = LogprobProblem.build(hidden, weight, bias, row_index, target_ids, temperature, softcap, memory)
    chunks = p.chunks(True, chunk_size)
    longest = max((b - a for a, b in chunks), default=1)
    acc = GradAccumulator(p.head, p.row_index, p.contiguous, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=need_bias, block_rows=longest)
    if not acc.active or p.n_rows == 0:
        return acc.finish()
    if grad_entropy is not None and frame is None:
        raise ValueError("logprob_backward: grad_entropy needs the frame returned by logprob_forward")
    block = _Block(p, longest)
    for start, stop in chunks:
        rows, h, x = block.logits(p, start, stop)
        mean = frame[1, start:stop] if frame is not None else torch.zeros_like(lse[start:stop])
        big = frame[0, start:stop] if frame is not None else lse[start:stop]
        stats = LogprobRowStats(lse[start:stop], big, mean, None)
        grad = logprob_logit_grad(x, p.head.used_bias, p.target_ids[rows], stats, grad_logp[start:stop],
                                  None if grad_entropy is None else grad_entropy[start:stop],
                                  acc.grad_block(stop - start), temperature=p.temperature, softcap=p.softcap)
        acc.add(grad, start, stop, h)
    return acc.finish()


def single_pass_token_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           row_index: torch.Tensor, target_ids: torch.Tensor, *, temperature: float,
                           token_loss: Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                           need_hidden: bool, need_weight: bool, need_bias: bool, chunk_size: int | None = None,
                           softcap: float | None = None):
    """A loss ``sum_i f_i(logp_i)`` and its gradients in one pass.

    ``token_loss(start, stop, logp)`` gets a chunk's ``logp [C]`` (float32) and returns ``(loss_sum, dlogp)``:
    its contribution to the loss (0-D) and ``d loss / d logp [C]``; ``softcap`` as in :func:`logprob_forward`.
    Returns ``(loss float64 0-D, logp [Na] float32, (d_hidden, d_weight, d_bias))``.
    """
    p = LogprobProblem.build(hidden, weight, bias, row_index, target_ids, temperature, softcap)
    grads = need_hidden or need_weight or (need_bias and bias is not None)
    chunks = p.chunks(grads, chunk_size)
    longest = max((b - a for a, b in chunks), default=1)
    acc = GradAccumulator(p.head, p.row_index, p.contiguous, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=need_bias, block_rows=longest)
    logp = torch.empty(p.n_rows, dtype=torch.float32, device=hidden.device)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    block = _Block(p, longest)
    for start, stop in chunks:
        rows, h, x = block.logits(p, start, stop)
        stats = logprob_row_stats(x, p.head.used_bias, temperature=p.temperature, with_entropy=False,
                                  softcap=p.softcap)
        y, lp = _sampled(p, rows, x, stats)
        logp[start:stop] = lp
        part, dlogp = token_loss(start, stop, lp)
        total += part.to(torch.float64)
        if acc.active:
            grad = logprob_logit_grad(x, p.head.used_bias, y, stats, dlogp, None, acc.grad_block(stop - start),
                                      temperature=p.temperature, softcap=p.softcap)
            acc.add(grad, start, stop, h)
    del block
    return total, logp, acc.finish()


def single_pass_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            row_index: torch.Tensor, target_ids: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
                            clip: tuple, divisor: float, *, temperature: float, need_hidden: bool,
                            need_weight: bool, need_bias: bool, chunk_size: int | None = None,
                            softcap: float | None = None):
    """The PPO dual-clip loss ``sum_i l_i(logp_i) / divisor`` and its gradients in one pass, without host
    synchronisation or autograd inside the chunk loop.

    Args: ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None, ``row_index [Na]`` int64 ascending,
    ``target_ids [N]`` int64, ``old``, ``adv [Na]`` float32 (the rows' old log-probs and advantages),
    ``clip = (clip_low, clip_high, dual_clip or None)``, ``divisor`` (``Na`` for a token mean, 1 for a sum);
    ``softcap`` as in :func:`logprob_forward`.
    Returns ``(loss float64 0-D (the sum before the divisor), logp [Na] float32, (d_hidden, d_weight,
    d_bias))``; the gradients are those of ``loss / divisor``.

    Per chunk of ``C`` rows, launches (what a GPU runs): the logit product; the statistics kernel; one
    ``policy_token_kernel`` (partials merge, sampled logit, ``logp``, per-token loss and its closed-form
    derivative, the ``d(logits)`` scale); the ``d(logits)`` kernel; the gradient products of
    :meth:`GradAccumulator.add` (``d(hidden)``, the hidden rows' copy into the ``d(weight)`` fold or the
    product itself) and ``d(bias)``'s column sum (:func:`column_sum_add`, one launch): 6 or 7, plus the
    d(weight) fold's product once per fold group.  Rows of a non-``arange`` ``row_index`` are
    gathered once before the loop (``Na x H`` in the input dtype, no per-chunk gathers).  The per-token
    losses go to an ``[Na]`` buffer summed once at the end (fixed order: deterministic, no atomics).
    """
    p = LogprobProblem.build(hidden, weight, bias, row_index, target_ids, temperature, softcap)
    device = hidden.device
    grads = need_hidden or need_weight or (need_bias and bias is not None)
    chunks = p.chunks(grads, chunk_size)
    longest = max((b - a for a, b in chunks), default=1)
    acc = GradAccumulator(p.head, p.row_index, p.contiguous, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=False, block_rows=longest)
    # d(bias) here: one column-sum launch per chunk instead of GradAccumulator's three
    d_bias = torch.zeros(bias.shape[0], dtype=torch.float32, device=device) \
        if (need_bias and bias is not None) else None
    n = p.n_rows
    logp = torch.empty(n, dtype=torch.float32, device=device)
    loss_rows = torch.empty(n, dtype=torch.float32, device=device)
    lse = torch.empty(longest, dtype=torch.float32, device=device)
    scale = torch.empty_like(lse)
    y = torch.empty(longest, dtype=torch.int64, device=device)
    old = old.to(torch.float32).contiguous()
    adv = adv.to(torch.float32).contiguous()
    # the distilled rows side by side once (a view when they are all rows), so chunks are slices
    rows_h = p.head.hidden if p.contiguous else p.head.hidden.index_select(0, p.row_index)
    weight_used, bias_used, vocab = p.head.used_weight, p.head.used_bias, p.head.vocab
    block = torch.empty(longest, vocab, dtype=torch.float32, device=device)
    # only d(bias) needed: a d(logits) block of our own (GradAccumulator holds none)
    block_grad = torch.empty(longest * vocab, dtype=hidden.dtype, device=device) \
        if (d_bias is not None and not acc.active) else None
    for start, stop in chunks:
        c = stop - start
        h = rows_h[start:stop]
        x = logits_into(block[:c], h, weight_used)
        part = logprob_partials(x, bias_used, temperature=p.temperature, softcap=p.softcap)
        policy_token_terms(x, bias_used, part, p.row_index[start:stop], p.target_ids, old[start:stop],
                           adv[start:stop], clip, divisor,
                           (logp[start:stop], loss_rows[start:stop], lse[:c], scale[:c], y[:c]),
                           temperature=p.temperature, softcap=p.softcap)
        if acc.active or d_bias is not None:
            out = acc.grad_block(c) if acc.active else block_grad[: c * vocab].view(c, vocab)
            logprob_logit_grad_scaled(x, bias_used, y[:c], lse[:c], scale[:c], out, temperature=p.temperature,
                                      softcap=p.softcap)
            if d_bias is not None:
                column_sum_add(out, d_bias[:vocab])
            if acc.active:
                acc.add(out, start, stop, h)
    del block
    d_hidden, d_weight, _ = acc.finish()
    return loss_rows.sum(dtype=torch.float64), logp, (d_hidden, d_weight,
                                                      None if d_bias is None else d_bias.to(bias.dtype))
