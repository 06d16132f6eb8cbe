"""``fused_topk_logprobs``: a model's exact top-k log-probabilities per position, without ``N x V`` memory.

What a sparse teacher returns (:func:`sod_kernels.fused_sparse_sod_loss` takes it): per position the ``k``
ids with the largest log-softmax values and those values.  Rows are processed in chunks: one float32 logit
block ``[C, V]`` (:func:`sod_kernels.core.chunks.logits_into`), its log-sum-exp, and ``torch.topk`` on keys
that make every entry distinct, so the result is exact and deterministic:

- key = (the float32 logit mapped to an order-preserving integer) * 2^32 + (V - 1 - id): a larger logit
  wins, and among equal logits the lower id (``-0.0`` counts as ``+0.0``).
- The top-k of the keys is unique, so it does not depend on ``torch.topk``'s tie handling, the device or
  the chunk size; the ids come out largest log-prob first, ties in ascending id order.

Memory per chunk: the float32 block and an int64 key block (about 24 bytes per entry with temporaries),
sized from a byte budget (``memory="low"``: :data:`~sod_kernels.core.chunks.LOW_MEMORY_CHUNK_BYTES`; ``"fast"``:
:data:`~sod_kernels.core.chunks.FAST_CHUNK_BYTES` on CUDA, the low budget elsewhere); O(N k) outputs.
No gradient (the teacher is scored, not trained).
"""

from __future__ import annotations

import torch

from ..core.validation import MEMORY_MODES, check_choice, check_chunk_size, check_lm_head, check_positive
from ..core.chunks import FAST_CHUNK_BYTES, LOW_MEMORY_CHUNK_BYTES, LMHead, chunk_rows, even_chunks
from ..core.loop import DeviceBlocks, longest_chunk, run_chunks
from ..core.runtime import check_softcap, no_autocast

BYTES_PER_ENTRY = 24          # float32 logits + int64 keys + int32 temporaries
SIGN_FREE_BITS = 0x7FFFFFFF   # float32 bits below the sign: flipped for negative values


def _order_keys(z: torch.Tensor) -> torch.Tensor:
    """``[C, V]`` int64 keys of float32 logits: larger logit -> larger key; equal logits -> lower id larger."""
    bits = z.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & SIGN_FREE_BITS)   # IEEE order as signed integers (negatives flipped)
    vocab = z.shape[1]
    low = torch.arange(vocab - 1, -1, -1, dtype=torch.int64, device=z.device)
    return ordered.to(torch.int64).mul_(1 << 32).add_(low)


def fused_topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, bias: torch.Tensor | None = None,
                        temperature: float = 1.0, chunk_size: int | None = None, softcap: float | None = None,
                        memory: str = "fast"):
    """The ``k`` largest entries of ``log_softmax((hidden @ weight.T + bias) / temperature)`` per position.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` floating (float32 / bfloat16 / float16 / float64).
        weight: ``[V, H]`` lm_head weight of the same dtype.
        k: number of ids per position, ``1 <= k <= V``.
        bias: optional ``[V]``.
        temperature: ``> 0``; the logits are divided by it.
        chunk_size: rows per chunk (default: from a memory budget and ``V``).
        softcap: logit soft-capping (Gemma 2/3 ``final_logit_softcapping``): the logits are
            ``softcap * tanh((hidden @ weight.T + bias) / softcap)``, before the temperature; None (default)
            for none, else a finite number > 0.
        memory: ``"fast"`` (default) or ``"low"``: row chunks sized from the small low-memory budget (more,
            smaller logit products); ``"fast"`` uses the large budget on CUDA and the small one elsewhere.  Both
            give the same ids and log-probabilities (the keys make the result independent of the chunking).
    Returns:
        ``(ids, logprobs)``: ``[..., k]`` int64 ids and ``[..., k]`` float32 log-probabilities (the leading
        shape of ``hidden``), largest first; equal values in ascending id order.  The logits are formed in
        float32 (float32 accumulation) whatever the input dtype.  No gradient flows.
    """
    check_lm_head(hidden, weight, bias, hidden_name="hidden", weight_name="weight", bias_name="bias")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    V = weight.shape[0]
    if not 1 <= k <= V:
        raise ValueError(f"k must satisfy 1 <= k <= V = {V} (the vocabulary size), got {k}")
    temperature = check_positive(temperature, "temperature")
    softcap = check_softcap(softcap, "softcap")
    check_chunk_size(chunk_size)
    check_choice(memory, "memory", MEMORY_MODES)
    if hidden.device != weight.device or (bias is not None and bias.device != weight.device):
        raise ValueError(f"hidden, weight and bias must be on one device, got hidden on {hidden.device} and weight "
                         f"on {weight.device}")
    lead = tuple(hidden.shape[:-1])
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w = weight.detach()
    if w.dtype == torch.float64 or (h.device.type != "cuda" and w.dtype != torch.float32):
        w = w.float()   # one float32 copy (16-bit on CUDA multiply natively with float32 output)
    b = None if bias is None else bias.detach().float()
    N = h.shape[0]
    budget = FAST_CHUNK_BYTES if memory == "fast" and h.device.type == "cuda" else LOW_MEMORY_CHUNK_BYTES
    rows = chunk_rows(N, V, BYTES_PER_ENTRY, budget=budget, chunk_size=chunk_size)
    ids = torch.empty(N, k, dtype=torch.int64, device=h.device)
    logprobs = torch.empty(N, k, dtype=torch.float32, device=h.device)
    lse_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    chunks = even_chunks(N, rows)
    if h.dtype != w.dtype:
        h = h.to(w.dtype)   # the products take one dtype (a float32 copy of float64 or CPU 16-bit states)
    blocks = DeviceBlocks((LMHead(h, w, None, V),), torch.arange(N, device=h.device), True, longest_chunk(chunks))

    def epilogue(c):
        z = c.logits[0]
        if b is not None:
            z += b
        if softcap is not None:  # cap * tanh(x / cap), in place on the float32 block
            z.div_(softcap).tanh_().mul_(softcap)
        if temperature != 1.0:
            z /= temperature
        z += 0.0  # -0.0 -> +0.0, so that equal values have equal keys
        lse = torch.logsumexp(z, dim=1)
        lse_sum.add_(lse.sum())
        top = _order_keys(z).topk(k, dim=1).values
        cols = (V - 1) - (top & 0xFFFFFFFF)
        ids[c.start:c.stop] = cols
        logprobs[c.start:c.stop] = z.gather(1, cols) - lse[:, None]

    with torch.no_grad(), no_autocast(h.device):
        run_chunks(chunks, blocks, epilogue)
    if N and not torch.isfinite(lse_sum):
        raise ValueError("the logits are not finite: hidden, weight or bias hold NaN or Inf (or the logits "
                         "overflow float32)")
    return ids.reshape(*lead, k), logprobs.reshape(*lead, k)
