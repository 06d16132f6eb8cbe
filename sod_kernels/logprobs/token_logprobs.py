"""Log-probability of the sampled token, fused with the lm_head (docs/math.md: ``logp_new``).

``fused_token_logprobs(hidden, weight, target_ids)`` returns ``log softmax(hidden @ weight.T / tau)[y]``
for every position without ever holding the ``tokens x vocabulary`` logits: the log-sum-exp is
accumulated online over vocabulary tiles and the target logit is one gathered dot product
``hidden[i] . weight[y_i]``.  The backward pass recomputes the logit tiles from the saved per-row lse:
``d logit = g * (onehot(y) - p) / tau``, contracted with the weight (d hidden) and the hidden states
(d weight), and summed over rows (d bias).

Two backends implement the same pair of functions (``logprob_forward`` / ``logprob_backward``):
- ``"torch"``: this module, chunked PyTorch (rows in chunks of ``C``: ``sod_kernels.core.tiles.rows_per_chunk`` rows,
  at least ``MIN_CHUNK_ROWS``, so that about two ``C x V`` blocks exist at a time); CPU default; float64
  supported.
- ``"triton"``: :mod:`sod_kernels.logprobs.triton_backend` (the chunked core: cuBLAS logit blocks, Triton
  epilogues, atomic-free contractions); CUDA default; on CPU tensors it needs ``TRITON_INTERPRET=1``.

:class:`TokenLogprobs` is the autograd Function both backends plug into; it works on a row subset
``row_index`` so that callers (the policy loss) only pay for the tokens they use.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..core.validation import (BACKENDS, MEMORY_MODES, check_choice, check_chunk_size, check_lm_head, check_positive,
                               check_same_device, check_shape, check_tensor)
from ..core.chunks import even_chunks
from ..core.loop import TileGrads, TorchRows, run_chunks
from ..core.rows import chunk_row_index
from ..core.tiles import apply_softcap, compute_dtype, rows_per_chunk, tile_logits, tile_logits_and_slope
from ..core.options import PassOptions, input_grads
from ..core import runtime
from ..core.runtime import check_softcap, no_autocast, refuse_double_backward, resolve_backend, zero_student_grads
from . import cpu_backend

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# At least this many rows per chunk: with the divergence backend's ~2M-float blocks a 152k vocabulary gets
# 13-row chunks, whose thin matrix products run ~2.5x slower on CPU than 128-row ones (measured with
# benchmarks/policy.py); a 128 x 152k fp32 block is 78 MB, still nothing like N x V.
MIN_CHUNK_ROWS = 128


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return rows_per_chunk(vocab, chunk_size)
    return max(rows_per_chunk(vocab), MIN_CHUNK_ROWS)


# ------------------------------------------------------------------------------------ chunked torch backend
def _weights_in(dtype: torch.dtype, weight: torch.Tensor, bias: torch.Tensor | None):
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def logprob_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_index: torch.Tensor,
                    target_ids: torch.Tensor, *, temperature: float, with_entropy: bool = False,
                    chunk_size: int | None = None, softcap: float | None = None, memory: str = "fast",
                    keep_block: bool = False):
    """Sampled-token log-probs of the rows ``row_index`` (chunked PyTorch; both ``memory`` modes run the same
    row chunks).

    Args:
        hidden: ``[N, H]``; weight ``[V, H]``; bias ``[V]`` or None (one floating dtype).
        row_index: ``[Na]`` int64 rows to compute.
        target_ids: ``[N]`` int64 in ``[0, V)``.
        softcap: ``cap tanh(x / cap)`` of the raw logits ``x`` (before the temperature), or None.
        keep_block: on the CPU path (``memory="fast"``, CPU tensors) keep the last chunk's logit block for
            :func:`logprob_backward` (a backward will follow).
    Returns:
        ``(logp [Na], lse [Na], entropy [Na] or None, kept)`` in float32 (float64 for float64 inputs); ``lse``
        is the log-sum-exp of the temperature-scaled logits, saved for the backward pass; ``entropy`` is
        that of the softmax (``with_entropy``); ``kept`` the CPU path's kept block (``keep_block``) or None.
    """
    if memory == "fast" and cpu_backend.enabled(hidden):  # whole-row chunks, compiled epilogue (cpu_backend.py)
        return cpu_backend.logprob_forward(hidden, weight, bias, row_index, target_ids, temperature=temperature,
                                            with_entropy=with_entropy, chunk_size=chunk_size, softcap=softcap,
                                            keep_block=keep_block)
    dt = compute_dtype(hidden.dtype)
    w, b = _weights_in(dt, weight, bias)
    Na = row_index.numel()
    logp = torch.empty(Na, dtype=dt, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    rows_idx, contiguous = chunk_row_index(row_index, hidden.shape[0])

    def epilogue(c):
        start, stop, h = c.start, c.stop, c.hidden[0]
        z = tile_logits(h, w, b, temperature, softcap)
        chunk_lse = torch.logsumexp(z, dim=-1)
        if with_entropy:  # H = -sum p log p, with log p = z - lse
            log_p = z.sub_(chunk_lse[:, None])
            entropy[start:stop] = -(log_p.exp() * log_p).sum(-1)
        y = target_ids[c.rows]
        # The one gathered dot product: hidden . weight[y] (+ bias[y]), scaled like the tile logits.
        target_logit = (h * w[y]).sum(-1)
        if b is not None:
            target_logit = target_logit + b[y]
        lse[start:stop] = chunk_lse
        logp[start:stop] = apply_softcap(target_logit, softcap) / temperature - chunk_lse

    with torch.no_grad():
        run_chunks(even_chunks(Na, _chunk_rows(w.shape[0], chunk_size)),
                   TorchRows((hidden,), rows_idx, contiguous, dt), epilogue)
    return logp, lse, entropy, None


def logprob_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_index: torch.Tensor,
                     target_ids: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor, *, temperature: float,
                     grad_entropy: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                     need_hidden: bool = True, need_weight: bool = True, need_bias: bool = True,
                     chunk_size: int | None = None, softcap: float | None = None, memory: str = "fast",
                     kept=None):
    """Gradients of ``sum_i grad_logp[i] logp[i] (+ grad_entropy[i] H[i])`` w.r.t. hidden ``[N, H]``, weight
    ``[V, H]``, bias ``[V]``.

    Per row, with raw logits ``x``: ``d logp / dx = (onehot(y) - p) / tau`` and
    ``dH / dx = -p (log p + H) / tau`` (``entropy`` = H is needed with ``grad_entropy``); with ``softcap`` both
    are multiplied by the cap's slope ``1 - tanh^2(x / cap)``.  Rows outside
    ``row_index`` get zero gradient.  ``kept``: the forward's kept block (:func:`logprob_forward`), used and
    overwritten on the CPU path, whose product it saves.  Returns the three gradients in the inputs' dtypes
    (None where not needed).
    """
    if memory == "fast" and cpu_backend.enabled(hidden):
        return cpu_backend.logprob_backward(hidden, weight, bias, row_index, target_ids, lse, grad_logp,
                                             temperature=temperature, grad_entropy=grad_entropy, entropy=entropy,
                                             need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
                                             chunk_size=chunk_size, softcap=softcap, kept=kept)
    dt = compute_dtype(hidden.dtype)
    w, b = _weights_in(dt, weight, bias)
    V = w.shape[0]
    grads = TileGrads(hidden, w, bias, dt, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
                      like=(hidden, weight, bias))
    if not grads.active:
        return grads.finish()
    rows_idx, contiguous = chunk_row_index(row_index, hidden.shape[0])

    def epilogue(c):
        start, stop, h = c.start, c.stop, c.hidden[0]
        scale = grad_logp[start:stop].to(dt)[:, None] / temperature
        z, slope = tile_logits_and_slope(h, w, b, temperature, softcap)
        log_p = z.sub_(lse[start:stop, None])
        p = log_p.exp()
        dx = p.neg()
        dx.scatter_add_(1, target_ids[c.rows][:, None], torch.ones_like(dx[:, :1]))
        dx *= scale
        if grad_entropy is not None:
            g_h = grad_entropy[start:stop].to(dt)[:, None] / temperature
            dx -= g_h * p * log_p.add_(entropy[start:stop, None].to(dt))
        c.fold_tile(dx, slice(0, V), w, slope)   # one tile: the whole vocabulary

    with torch.no_grad():
        run_chunks(even_chunks(row_index.numel(), _chunk_rows(V, chunk_size)),
                   TorchRows((hidden,), rows_idx, contiguous, dt), epilogue, grads)
    return grads.finish()


# --------------------------------------------------------------------------------------------- autograd
def backend_module(name: str) -> ModuleType:
    """The two-pass backend ``name``: this module's chunked torch path, or the Triton module (imported lazily)."""
    return runtime.backend_module(name, __package__, torch_module="token_logprobs")


class TokenLogprobs(torch.autograd.Function):
    """``logp[i] = log softmax(hidden[row_index[i]] @ weight.T / tau)[target_ids[row_index[i]]]`` and, with
    ``options.with_entropy``, the entropy ``H[i]`` of the same softmax.

    Inputs: hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, row_index ``[Na]`` int64,
    target_ids ``[N]`` int64, and :class:`~sod_kernels.core.options.PassOptions` (temperature, backend,
    with_entropy, chunk_size, memory, and ``student_softcap``: ``cap tanh(x / cap)`` of the raw logits before the
    temperature, or None).  Outputs: ``logp [Na]`` and ``entropy [Na]`` (empty without ``with_entropy``),
    float32 (float64 for float64 inputs), both differentiable w.r.t. hidden, weight and bias.  First-order only.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_index, target_ids, options: PassOptions):
        # the torch backend's CPU path keeps its last logit block for the backward (frame) when one will follow
        keep = {"keep_block": any(ctx.needs_input_grad[:3])} if options.backend == "torch" else {}
        with no_autocast(hidden.device):
            logp, lse, entropy, frame = backend_module(options.backend).logprob_forward(
                hidden, weight, bias, row_index, target_ids, with_entropy=options.with_entropy, **_kwargs(options),
                **keep)
        if entropy is None:
            entropy = logp.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, row_index, target_ids, lse)
        ctx.extra = (entropy.detach() if options.with_entropy else None, frame)
        ctx.options = options
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        refuse_double_backward("fused_token_logprobs")
        hidden, weight, bias, row_index, target_ids, lse = ctx.saved_tensors
        options: PassOptions = ctx.options
        entropy, frame = ctx.extra
        if options.backend == "torch":   # the kept block is overwritten: a second backward recomputes it
            extra_kept, ctx.extra = {"kept": frame}, (entropy, None)
        else:
            extra_kept = {}
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if grad_logp is None and grad_entropy is None or row_index.numel() == 0:
            return input_grads(ctx, zero_student_grads(hidden, weight, bias, need_h, need_w, need_b))
        if grad_logp is None:
            grad_logp = lse.new_zeros(lse.shape)
        extra = dict(extra_kept)
        if options.with_entropy and grad_entropy is not None:
            extra["grad_entropy"] = grad_entropy.contiguous()
            extra.update({"frame": frame} if options.backend == "triton" else {"entropy": entropy})
        with no_autocast(hidden.device):
            dh, dw, db = backend_module(options.backend).logprob_backward(
                hidden, weight, bias, row_index, target_ids, lse, grad_logp.contiguous(), need_hidden=need_h,
                need_weight=need_w, need_bias=need_b, **_kwargs(options), **extra)
        return input_grads(ctx, (dh, dw, db))


def _kwargs(options: PassOptions) -> dict:
    return {"temperature": options.temperature, "chunk_size": options.chunk_size, "softcap": options.student_softcap,
            "memory": options.memory}


def check_target_ids(target_ids: torch.Tensor, lead: tuple[int, ...], vocab: int, *, check_values: bool,
                     name: str = "target_ids", hidden_name: str = "hidden") -> None:
    check_tensor(target_ids, name, ndim=(len(lead),), integer=True)
    check_shape(target_ids, name, lead, f"the leading shape of {hidden_name}")
    if check_values and target_ids.numel() and bool(((target_ids < 0) | (target_ids >= vocab)).any()):
        raise ValueError(f"{name} must lie in [0, {vocab}) (the vocabulary of the weight)")


def resolve_logprob_backend(backend: str, hidden: torch.Tensor, hidden_name: str = "hidden") -> str:
    """``backend`` name -> ``"torch"`` / ``"triton"``; the Triton path takes fp32 / bf16 / fp16 only."""
    check_choice(backend, "backend", BACKENDS)
    impl = resolve_backend(backend, hidden.device)
    if impl == "triton" and hidden.dtype not in TRITON_DTYPES:
        if backend == "auto":
            return "torch"
        raise TypeError(f"backend='triton' supports {hidden_name} in float32, bfloat16 or float16, got "
                        f"{hidden.dtype}; use backend='torch' for float64")
    return impl


def fused_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, *,
                         bias: torch.Tensor | None = None, temperature: float = 1.0, backend: str = "auto",
                         return_entropy: bool = False, chunk_size: int | None = None, check_inputs: bool = True,
                         softcap: float | None = None, memory: str = "fast"):
    """``log softmax((hidden @ weight.T (+ bias)) / temperature)[target_ids]`` without materializing logits.

    Args:
        hidden: ``[B, T, H]`` or ``[T, H]``, float32 / bfloat16 / float16 (float64 on the torch backend);
            receives a gradient.
        weight: ``[V, H]`` lm_head weight, same dtype; receives a gradient.
        target_ids: ``[B, T]`` (or ``[T]``) integer tokens in ``[0, V)``.
        bias: optional ``[V]``; receives a gradient.
        temperature: ``> 0``; the logits are divided by it.
        backend: ``"auto"`` (Triton for CUDA tensors, chunked PyTorch otherwise), ``"triton"``, ``"torch"``.
        return_entropy: also return the entropy ``H = -sum_v p(v) log p(v)`` of each position's softmax (same
            pass, differentiable), as ``(logprobs, entropy)``.
        chunk_size: rows per chunk (default: from a memory budget and the vocabulary size).
        check_inputs: check that ``target_ids`` lie in ``[0, V)`` (one host sync).
        softcap: logit soft-capping (Gemma 2/3 ``final_logit_softcapping``): the logits are
            ``softcap * tanh((hidden @ weight.T + bias) / softcap)``, before the temperature; None (default)
            for none, else a finite number > 0.  Applied inside the kernels, gradient included.
        memory: ``"fast"`` (default) or ``"low"``: on the Triton backend, row chunks sized from a small memory
            budget (more, smaller logit products); the torch backend runs the same chunks in both modes.
    Returns:
        ``[B, T]`` (or ``[T]``) float32 (float64 for float64 inputs) log-probabilities, or
        ``(logprobs, entropy)`` with ``return_entropy``.
    Memory beyond the inputs and gradients: O(N) statistics and about two ``C x V`` chunk blocks (plus a
    float32 d(weight) accumulator on the Triton path); the ``N x V`` logits are never stored.  On CPU tensors
    (``memory="fast"``) the forward keeps its last chunk's block (at most 128 MiB) until the backward, which
    starts from it instead of recomputing it; nothing is kept when no input needs a gradient.  Time: the
    ``2 N V H`` FLOPs of the logit product forward; backward the recomputed product plus ``4 N V H``.
    """
    check_lm_head(hidden, weight, bias, hidden_name="hidden", weight_name="weight", bias_name="bias")
    temperature = check_positive(temperature, "temperature")
    softcap = check_softcap(softcap, "softcap")
    check_chunk_size(chunk_size)
    check_choice(memory, "memory", MEMORY_MODES)
    lead = tuple(hidden.shape[:-1])
    check_target_ids(target_ids, lead, weight.shape[0], check_values=check_inputs)
    check_same_device(hidden=hidden, weight=weight, target_ids=target_ids, bias=bias)
    impl = resolve_logprob_backend(backend, hidden)
    flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = target_ids.reshape(-1).to(torch.int64).contiguous()
    rows = torch.arange(flat.shape[0], device=flat.device)
    options = PassOptions(backend=impl, memory=memory, chunk_size=chunk_size, temperature=temperature,
                          student_softcap=softcap, with_entropy=bool(return_entropy))
    logp, entropy = TokenLogprobs.apply(flat, weight.contiguous(), None if bias is None else bias.contiguous(),
                                        rows, y, options)
    if return_entropy:
        return logp.reshape(lead), entropy.reshape(lead)
    return logp.reshape(lead)
