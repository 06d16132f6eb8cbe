"""The one chunked loop (``sod_kernels.core.loop``) with a toy epilogue whose gradient is known in closed form:
``L = sum_{i, v} G[i, v] z[i, v]`` with ``z = h W^T + b`` gives ``d(logits) = G``, ``d(hidden) = G W``,
``d(weight) = G^T h``, ``d(bias) = colsum(G)``; checked in float64 against those formulas on odd sizes, both
paths (device blocks and gradient sinks, the CPU blocks with d(logits) in place), contiguous and gathered rows,
every d(bias) schedule, chunk sizes that do not divide the rows, and an empty call."""

from __future__ import annotations

import pytest
import torch

from sod_kernels.core.chunks import LMHead, even_chunks
from sod_kernels.core.cpu_pass import ComputeHead
from sod_kernels.core.loop import (CpuBlocks, CpuGrads, DeviceBlocks, DeviceGrads, TileGrads, TorchRows, longest_chunk,
                                   run_chunks)
from sod_kernels.core.rows import chunk_row_index


def _problem(n=37, vocab=29, width=11, seed=0, rows=None, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=g)
    weight = torch.randn(vocab, width, generator=g) / width ** 0.5
    b = torch.randn(vocab, generator=g) if bias else None
    row_index = torch.arange(n) if rows is None else rows
    G = torch.randn(row_index.numel(), vocab, generator=g)
    return hidden, weight, b, row_index, G


def _expected(hidden, weight, b, row_index, G):
    h64, w64, G64 = hidden.double(), weight.double(), G.double()
    d_hidden = torch.zeros_like(h64)
    d_hidden[row_index] = G64 @ w64
    d_weight = G64.T @ h64[row_index]
    d_bias = None if b is None else G64.sum(0)
    logits = h64[row_index] @ w64.T
    return d_hidden, d_weight, d_bias, logits


def _close(a, b, tol=1e-4):
    assert a is not None and b is not None
    assert torch.allclose(a.double(), b, rtol=tol, atol=tol), (a.double() - b).abs().max()


@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("gather", ["chunk", "once"])
@pytest.mark.parametrize("bias", ["fold", "column_sum", "epilogue"])
def test_device_loop_folds_the_closed_form_gradient(gathered, gather, bias):
    rows = torch.tensor([0, 2, 3, 5, 8, 9, 10, 14, 20, 21, 30, 36]) if gathered else None
    hidden, weight, b, row_index, G = _problem(rows=rows)
    head = LMHead(hidden, weight, b, weight.shape[0])
    idx, contiguous = chunk_row_index(row_index, hidden.shape[0])
    chunks = even_chunks(idx.numel(), 5)
    grads = DeviceGrads(head, idx, contiguous, need_hidden=True, need_weight=True, need_bias=True,
                        block_rows=longest_chunk(chunks), bias=bias)
    seen = []
    d_hidden, d_weight, d_bias, logits = _expected(hidden, weight, b, row_index, G)

    def epilogue(c):
        seen.append((c.index, c.start, c.stop))
        _close(c.logits[0], logits[c.start:c.stop])
        out = c.grad_block()
        out.copy_(G[c.start:c.stop])
        if bias == "epilogue":
            grads.d_bias += out.sum(0)
        return out

    run_chunks(chunks, DeviceBlocks((head,), idx, contiguous, longest_chunk(chunks), gather=gather), epilogue, grads)
    got = grads.finish()
    assert seen == [(i, a, z) for i, (a, z) in enumerate(chunks)]
    _close(got[0], d_hidden)
    _close(got[1], d_weight)
    _close(got[2], d_bias)
    assert got[0].dtype == hidden.dtype and got[1].shape == weight.shape and got[2].shape == b.shape


def test_device_loop_with_only_a_bias_gradient_owns_its_block():
    hidden, weight, b, row_index, G = _problem(n=23, vocab=17)
    head = LMHead(hidden, weight, b, weight.shape[0])
    chunks = even_chunks(23, 7)
    grads = DeviceGrads(head, row_index, True, need_hidden=False, need_weight=False, need_bias=True,
                        block_rows=7, bias="column_sum")
    assert grads.active and not grads.acc.active

    def epilogue(c):
        out = c.grad_block()
        out.copy_(G[c.start:c.stop])
        return out

    run_chunks(chunks, DeviceBlocks((head,), row_index, True, 7), epilogue, grads)
    d_hidden, d_weight, d_bias = grads.finish()
    assert d_hidden is None and d_weight is None
    _close(d_bias, G.double().sum(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("gathered", [False, True])
def test_cpu_loop_writes_d_logits_in_place_and_folds_it(dtype, gathered):
    rows = torch.tensor([1, 4, 6, 7, 11, 12, 13, 18, 25, 31]) if gathered else None
    hidden, weight, b, row_index, G = _problem(rows=rows)
    hidden, weight, b = hidden.to(dtype), weight.to(dtype), b.to(dtype)
    source = LMHead(hidden, weight, b, weight.shape[0])
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    head = ComputeHead(source, compute)
    idx, contiguous = chunk_row_index(row_index, hidden.shape[0])
    chunks = even_chunks(idx.numel(), 4)
    grads = CpuGrads(idx.numel(), head, source, idx, contiguous, need_hidden=True, need_weight=True, need_bias=True)
    d_hidden, d_weight, d_bias, logits = _expected(hidden.float(), weight.float(), b.float(), row_index, G)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5

    def epilogue(c):
        assert c.logits[0].dtype == compute
        _close(c.logits[0], logits[c.start:c.stop], tol)
        out = c.grad_block()
        assert out.data_ptr() == c.logits[0].data_ptr()   # in place over the student's block
        out.copy_(G[c.start:c.stop])
        return out

    run_chunks(chunks, CpuBlocks((head,), idx, contiguous, longest_chunk(chunks)), epilogue, grads)
    got = grads.finish()
    assert [t.dtype for t in got] == [dtype] * 3
    _close(got[0], d_hidden, tol)
    _close(got[1], d_weight, tol)
    _close(got[2], d_bias, tol)


def test_two_models_get_their_own_blocks():
    hidden, weight, b, row_index, _ = _problem(n=19, vocab=13)
    teacher_h = torch.randn(19, 7)
    teacher_w = torch.randn(13, 7)
    heads = (LMHead(hidden, weight, b, 13), LMHead(teacher_h, teacher_w, None, 13))
    got_s, got_t = torch.empty(19, 13), torch.empty(19, 13)

    def epilogue(c):
        got_s[c.start:c.stop], got_t[c.start:c.stop] = c.logits
        assert c.hidden[1].shape == (c.size, 7)

    run_chunks(even_chunks(19, 6), DeviceBlocks(heads, row_index, True, 6), epilogue)
    _close(got_s, hidden.double() @ weight.double().T)
    _close(got_t, teacher_h.double() @ teacher_w.double().T)


def test_empty_call_and_misuse_are_errors_not_silence():
    hidden, weight, b, _, _ = _problem(n=5, vocab=7)
    head = LMHead(hidden, weight, b, 7)
    empty = torch.zeros(0, dtype=torch.int64)
    grads = DeviceGrads(head, empty, False, need_hidden=True, need_weight=True, need_bias=True, block_rows=1)
    run_chunks([], DeviceBlocks((head,), empty, False, 1), lambda c: pytest.fail("no chunk expected"), grads)
    d_hidden, d_weight, d_bias = grads.finish()
    assert torch.count_nonzero(d_hidden) == 0 and torch.count_nonzero(d_weight) == 0 and torch.count_nonzero(d_bias) == 0

    rows = torch.arange(5)
    with pytest.raises(RuntimeError, match="grad_block"):
        run_chunks([(0, 5)], DeviceBlocks((head,), rows, True, 5), lambda c: c.grad_block())
    with pytest.raises(RuntimeError, match="without gradients"):
        run_chunks([(0, 5)], DeviceBlocks((head,), rows, True, 5), lambda c: c.logits[0])
    with pytest.raises(ValueError, match="gather"):
        DeviceBlocks((head,), rows, True, 5, gather="sometimes")
    with pytest.raises(ValueError, match="bias"):
        DeviceGrads(head, rows, True, need_hidden=True, need_weight=True, need_bias=True, block_rows=5, bias="sum")


@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("whole_rows", [False, True])
def test_tile_path_folds_every_tile_and_each_chunk_once(gathered, whole_rows):
    """``TorchRows`` + ``TileGrads``: tiles of 8 columns folded with ``fold_tile`` (or one whole-vocabulary block
    returned by the epilogue), the chunk's d(hidden) rows written at its end; float64 like the torch backends."""
    rows = torch.tensor([0, 3, 4, 9, 10, 11, 17, 22, 30, 33, 36]) if gathered else None
    hidden, weight, b, row_index, G = _problem(rows=rows)
    hidden, weight, b, G = hidden.double(), weight.double(), b.double(), G.double()
    idx, contiguous = chunk_row_index(row_index, hidden.shape[0])
    grads = TileGrads(hidden, weight, b, torch.float64, need_hidden=True, need_weight=True, need_bias=True,
                      like=(hidden, weight, b))
    V = weight.shape[0]

    def epilogue(c):
        assert c.logits == () and c.hidden[0].dtype == torch.float64
        if whole_rows:
            return G[c.start:c.stop].clone()
        for v0 in range(0, V, 8):
            v1 = min(v0 + 8, V)
            c.fold_tile(G[c.start:c.stop, v0:v1].clone(), slice(v0, v1), weight[v0:v1])
        return None

    run_chunks(even_chunks(idx.numel(), 4), TorchRows((hidden,), idx, contiguous, torch.float64), epilogue, grads)
    got = grads.finish()
    d_hidden, d_weight, d_bias, _ = _expected(hidden, weight, b, row_index, G)
    for a, e in zip(got, (d_hidden, d_weight, d_bias)):
        assert torch.allclose(a, e, rtol=1e-12, atol=1e-12)
