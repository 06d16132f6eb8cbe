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
                           row_plan)
from ..core.kernels import LogprobRowStats, logprob_partials
from ..core.loop import DeviceBlocks, DeviceGrads, longest_chunk, run_chunks
from .kernels import logprob_logit_grad_scaled, logprob_token_terms, policy_token_terms

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


def _blocks(p: LogprobProblem, chunks: list[tuple[int, int]]) -> DeviceBlocks:
    """The chunks' float32 logit block; the distilled rows' hidden states gathered once before the loop (views
    when ``row_index`` is ``arange(N)``: no per-chunk gather launches; else ``Na x H`` more memory)."""
    return DeviceBlocks((p.head,), p.row_index, p.contiguous, longest_chunk(chunks), gather="once")


def _targets(p: LogprobProblem) -> torch.Tensor:
    """The distilled rows' targets ``[Na]`` int64, contiguous (one gather unless the rows are all rows)."""
    return p.target_ids.contiguous() if p.contiguous else p.target_ids.index_select(0, p.row_index)


def _grads(p: LogprobProblem, chunks, need_hidden: bool, need_weight: bool, need_bias: bool) -> DeviceGrads:
    """d(hidden) and d(weight) by the accumulator, d(bias) by one column-sum launch per chunk."""
    return DeviceGrads(p.head, p.row_index, p.contiguous, need_hidden=need_hidden, need_weight=need_weight,
                       need_bias=need_bias, block_rows=longest_chunk(chunks), bias="column_sum")


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
    targets = _targets(p)
    bias = p.head.used_bias

    def epilogue(c):  # 3 launches per chunk with the product
        start, stop = c.start, c.stop
        x = c.logits[0]
        part = logprob_partials(x, bias, temperature=p.temperature, softcap=p.softcap, with_entropy=with_entropy)
        logprob_token_terms(x, bias, part, targets[start:stop],
                            (logp[start:stop], lse[start:stop], frame[0, start:stop],
                             frame[1, start:stop] if with_entropy else None,
                             entropy[start:stop] if with_entropy else None),
                            temperature=p.temperature, softcap=p.softcap)

    run_chunks(chunks, _blocks(p, chunks), epilogue)
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
    grads = _grads(p, chunks, need_hidden, need_weight, need_bias)
    if not grads.active or p.n_rows == 0:
        return grads.finish()
    if grad_entropy is not None and frame is None:
        raise ValueError("logprob_backward: grad_entropy needs the frame returned by logprob_forward")
    targets = _targets(p)
    # the upstream scales of all rows at once (not per chunk): d logp / dz and dH / dz carry 1 / tau
    scale = (grad_logp.to(torch.float32) / p.temperature).contiguous()
    scale_e = None if grad_entropy is None else (grad_entropy.to(torch.float32) / p.temperature).contiguous()

    def epilogue(c):  # 4 launches per chunk (5 with a bias), the d(weight) fold's product per group
        start, stop = c.start, c.stop
        stats = LogprobRowStats(lse[start:stop], lse[start:stop] if frame is None else frame[0, start:stop],
                                lse[start:stop] if frame is None else frame[1, start:stop], None)
        return logprob_logit_grad_scaled(c.logits[0], p.head.used_bias, targets[start:stop], stats.lse,
                                         scale[start:stop], c.grad_block(), temperature=p.temperature,
                                         softcap=p.softcap, frame=stats,
                                         scale_entropy=None if scale_e is None else scale_e[start:stop])

    run_chunks(chunks, _blocks(p, chunks), epilogue, grads)
    return grads.finish()


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
    gathered once before the loop (:class:`~sod_kernels.core.loop.DeviceBlocks` with ``gather="once"``).  The per-token losses go to an
    ``[Na]`` buffer summed once at the end (fixed order: deterministic, no atomics).
    """
    p = LogprobProblem.build(hidden, weight, bias, row_index, target_ids, temperature, softcap)
    device = hidden.device
    chunks = p.chunks(need_hidden or need_weight or (need_bias and bias is not None), chunk_size)
    longest = longest_chunk(chunks)
    grads = _grads(p, chunks, need_hidden, need_weight, need_bias)
    n = p.n_rows
    logp = torch.empty(n, dtype=torch.float32, device=device)
    loss_rows = torch.empty(n, dtype=torch.float32, device=device)
    lse = torch.empty(longest, dtype=torch.float32, device=device)
    scale = torch.empty_like(lse)
    old = old.to(torch.float32).contiguous()
    adv = adv.to(torch.float32).contiguous()
    targets = _targets(p)
    bias = p.head.used_bias

    def epilogue(ch):
        start, stop, c = ch.start, ch.stop, ch.size
        x = ch.logits[0]
        part = logprob_partials(x, bias, temperature=p.temperature, softcap=p.softcap)
        policy_token_terms(x, bias, part, targets[start:stop], old[start:stop], adv[start:stop], clip, divisor,
                           (logp[start:stop], loss_rows[start:stop], lse[:c], scale[:c]),
                           temperature=p.temperature, softcap=p.softcap)
        if grads.active:
            return logprob_logit_grad_scaled(x, bias, targets[start:stop], lse[:c], scale[:c], ch.grad_block(),
                                             temperature=p.temperature, softcap=p.softcap)
        return None

    run_chunks(chunks, _blocks(p, chunks), epilogue, grads)
    return loss_rows.sum(dtype=torch.float64), logp, grads.finish()

