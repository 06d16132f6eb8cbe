"""GPU backend of :func:`sod_kernels.fused_token_logprobs` and the one-pass policy loss, on the chunked core.

Per row chunk (:mod:`sod_kernels.core.chunks`): the logit block ``h[rows] @ W.T`` with float32 output, the
statistics kernel of :mod:`sod_kernels.core.kernels` (per-split partials of the log-sum-exp, optionally the
entropy), one small per-row kernel of :mod:`sod_kernels.logprobs.kernels` that merges the partials and reads
the sampled logit (and, for the policy loss, forms the per-token loss and its derivative), and, where a
gradient is formed, the ``d(logits)`` kernel and the contraction products (no atomics; deterministic).
Nothing else runs per chunk: the distilled rows' hidden states and targets are gathered once before the
loop (``Na x H`` in the input dtype; views when the rows are all rows), per-row results are written by the
kernels into the pass's ``[Na]`` buffers, and no host synchronisation happens inside the loop.

- :func:`logprob_forward` / :func:`logprob_backward`: the two-pass contract of
  :class:`~sod_kernels.token_logprobs.TokenLogprobs` (a downstream loss unknown to the kernel: the backward
  recomputes the logits).  ``2 N V H`` FLOPs forward, ``2 N V H + 4 N V H`` backward.  Launches per chunk:
  forward 3 (product, statistics, ``logprob_token_kernel``); backward 4 to 5 (product, ``d(logits)``,
  ``d(hidden)``, the d(weight) fold's copy or product, ``d(bias)``'s column sum).
- :func:`single_pass_policy_loss`: the PPO dual-clip loss, a per-token function of ``logp(y)`` whose
  derivative is known in closed form as soon as a chunk's log-sum-exp is, so ``d(logits)`` is formed right
  there: ``2 N V H + 4 N V H`` FLOPs in all, the single-pass minimum; 6 to 7 launches per chunk.

Headline (N = 16384, H = 1024, V = 151936, bf16): 1.53e13 FLOP in one pass (~20 ms at 780 TFLOP/s); the
epilogue moves ``4 N V`` + ``6 N V`` bytes (25 GB, ~6 ms at 4.3 TB/s).  Rows per chunk from the byte
budget :data:`sod_kernels.core.chunks.FAST_CHUNK_BYTES` (~800 at V = 152k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.chunks import (FAST_CHUNK_BYTES, LOW_MEMORY_CHUNK_BYTES, GradAccumulator, LMHead, chunk_rows, even_chunks,
                           logits_into, row_plan)
from ..core.kernels import LogprobRowStats, logprob_partials
from .kernels import column_sum_add, logprob_logit_grad_scaled, logprob_token_terms, policy_token_terms

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

    def active_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [Na, H], targets [Na] int64 contiguous)`` of the distilled rows, in their order: views when
        ``row_index`` is ``arange(N)``, else one gather each before the chunk loop (so a chunk's rows are a
        slice: no per-chunk gather launches; ``Na x H`` more memory in the input dtype)."""
        if self.contiguous:
            return self.head.hidden, self.target_ids.contiguous()
        return self.head.hidden.index_select(0, self.row_index), self.target_ids.index_select(0, self.row_index)


def _bias_grad(bias: torch.Tensor | None, need_bias: bool) -> torch.Tensor | None:
    """A float32 ``d(bias)`` accumulator ``[Vw]`` (zeros) when one is needed: the loops fold each chunk's
    column sums into it with one :func:`column_sum_add` launch (GradAccumulator's bias path is three)."""
    return torch.zeros(bias.shape[0], dtype=torch.float32, device=bias.device) \
        if (need_bias and bias is not None) else None


class _Block:
    """Reusable float32 logit block of at most ``rows`` rows (gradient blocks: GradAccumulator)."""

    def __init__(self, p: LogprobProblem, rows: int):
        self.x = torch.empty(rows, p.head.vocab, dtype=torch.float32, device=p.head.hidden.device)

    def logits(self, p: LogprobProblem, rows_h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``x [C, V] = rows_h[start:stop] @ W.T`` (float32, one product) for the chunk ``[start, stop)`` of
        the distilled rows ``rows_h [Na, H]`` (:meth:`LogprobProblem.active_rows`)."""
        return logits_into(self.x[: stop - start], rows_h[start:stop], p.head.used_weight)


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
    rows_h, targets = p.active_rows()
    for start, stop in chunks:  # 3 launches per chunk
        x = block.logits(p, rows_h, start, stop)
        part = logprob_partials(x, p.head.used_bias, temperature=p.temperature, softcap=p.softcap,
                                with_entropy=with_entropy)
        logprob_token_terms(x, p.head.used_bias, part, targets[start:stop],
                            (logp[start:stop], lse[start:stop], frame[0, start:stop],
                             frame[1, start:stop] if with_entropy else None,
                             entropy[start:stop] if with_entropy else None),
                            temperature=p.temperature, softcap=p.softcap)
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
                          need_bias=False, block_rows=longest)
    d_bias = _bias_grad(bias, need_bias)
    if not (acc.active or d_bias is not None) or p.n_rows == 0:
        d_hidden, d_weight, _ = acc.finish()
        return d_hidden, d_weight, d_bias if d_bias is None else d_bias.to(bias.dtype)
    if grad_entropy is not None and frame is None:
        raise ValueError("logprob_backward: grad_entropy needs the frame returned by logprob_forward")
    block = _Block(p, longest)
    grads = _GradBlocks(p, acc, d_bias, longest)
    rows_h, targets = p.active_rows()
    # the upstream scales of all rows at once (not per chunk): d logp / dz and dH / dz carry 1 / tau
    scale = (grad_logp.to(torch.float32) / p.temperature).contiguous()
    scale_e = None if grad_entropy is None else (grad_entropy.to(torch.float32) / p.temperature).contiguous()
    for start, stop in chunks:  # 4 launches per chunk (5 with a bias), the d(weight) fold's product per group
        x = block.logits(p, rows_h, start, stop)
        stats = LogprobRowStats(lse[start:stop], lse[start:stop] if frame is None else frame[0, start:stop],
                                lse[start:stop] if frame is None else frame[1, start:stop], None)
        out = grads.block(stop - start)
        logprob_logit_grad_scaled(x, p.head.used_bias, targets[start:stop], stats.lse, scale[start:stop], out,
                                  temperature=p.temperature, softcap=p.softcap, frame=stats,
                                  scale_entropy=None if scale_e is None else scale_e[start:stop])
        grads.add(out, start, stop, rows_h[start:stop])
    return grads.finish(bias)


class _GradBlocks:
    """The student's gradients of one pass: :class:`GradAccumulator` for d(hidden) and d(weight) (built
    without a bias) and a float32 ``d(bias)`` (:func:`_bias_grad`) folded by :func:`column_sum_add`."""

    def __init__(self, p: LogprobProblem, acc: GradAccumulator, d_bias: torch.Tensor | None, rows: int):
        self.acc, self.d_bias, self.vocab = acc, d_bias, p.head.vocab
        # only d(bias) needed: a d(logits) block of our own (GradAccumulator holds none)
        self._own = None if (acc.active or d_bias is None) else \
            torch.empty(rows * self.vocab, dtype=p.head.hidden.dtype, device=p.head.hidden.device)

    @property
    def active(self) -> bool:
        return self.acc.active or self.d_bias is not None

    def block(self, n: int) -> torch.Tensor:
        """A ``[n, V]`` block (input dtype) for the next chunk's ``d(logits)``."""
        return self.acc.grad_block(n) if self._own is None else self._own[: n * self.vocab].view(n, self.vocab)

    def add(self, d_logits: torch.Tensor, start: int, stop: int, hidden_rows: torch.Tensor) -> None:
        """Fold one chunk's ``d(logits) [C, V]``: one column-sum launch for ``d(bias)``, then
        :meth:`GradAccumulator.add` (``d(hidden)`` product, the d(weight) fold's copy or product)."""
        if self.d_bias is not None:
            column_sum_add(d_logits, self.d_bias[: self.vocab])
        if self.acc.active:
            self.acc.add(d_logits, start, stop, hidden_rows)

    def finish(self, bias: torch.Tensor | None):
        """``(d_hidden, d_weight, d_bias)`` in the inputs' dtypes (None where not needed)."""
        d_hidden, d_weight, _ = self.acc.finish()
        return d_hidden, d_weight, None if self.d_bias is None else self.d_bias.to(bias.dtype)


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
    d(weight) fold's product once per fold group.  The distilled rows' hidden states and targets are
    gathered once before the loop (:meth:`LogprobProblem.active_rows`).  The per-token losses go to an
    ``[Na]`` buffer summed once at the end (fixed order: deterministic, no atomics).
    """
    p = LogprobProblem.build(hidden, weight, bias, row_index, target_ids, temperature, softcap)
    device = hidden.device
    grads = need_hidden or need_weight or (need_bias and bias is not None)
    chunks = p.chunks(grads, chunk_size)
    longest = max((b - a for a, b in chunks), default=1)
    acc = GradAccumulator(p.head, p.row_index, p.contiguous, need_hidden=need_hidden, need_weight=need_weight,
                          need_bias=False, block_rows=longest)
    grad_blocks = _GradBlocks(p, acc, _bias_grad(bias, need_bias), longest)
    n = p.n_rows
    logp = torch.empty(n, dtype=torch.float32, device=device)
    loss_rows = torch.empty(n, dtype=torch.float32, device=device)
    lse = torch.empty(longest, dtype=torch.float32, device=device)
    scale = torch.empty_like(lse)
    old = old.to(torch.float32).contiguous()
    adv = adv.to(torch.float32).contiguous()
    rows_h, targets = p.active_rows()
    block = _Block(p, longest)
    for start, stop in chunks:
        c = stop - start
        x = block.logits(p, rows_h, start, stop)
        part = logprob_partials(x, p.head.used_bias, temperature=p.temperature, softcap=p.softcap)
        policy_token_terms(x, p.head.used_bias, part, targets[start:stop], old[start:stop], adv[start:stop], clip,
                           divisor, (logp[start:stop], loss_rows[start:stop], lse[:c], scale[:c]),
                           temperature=p.temperature, softcap=p.softcap)
        if grad_blocks.active:
            out = logprob_logit_grad_scaled(x, p.head.used_bias, targets[start:stop], lse[:c], scale[:c],
                                            grad_blocks.block(c), temperature=p.temperature, softcap=p.softcap)
            grad_blocks.add(out, start, stop, rows_h[start:stop])
    del block
    return loss_rows.sum(dtype=torch.float64), logp, grad_blocks.finish(bias)
