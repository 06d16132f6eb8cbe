"""The chunk plan: rows per chunk from the byte budget (multiples of 128 above 128), chunks of whole steps,
and the d(weight) fold (rows per product, its environment knob)."""

from __future__ import annotations

import pytest
import torch

from sod_kernels.core.chunks import (DEFAULT_FOLD_ROWS, FAST_CHUNK_BYTES, GradAccumulator, LMHead, MAX_FOLD_ROWS,
                                     chunk_rows, fold_group, fold_rows)
from sod_kernels.steps.finish import single_pass_plan

HEADLINE_N, HEADLINE_V = 16384, 151936


def test_rows_are_multiples_of_128_above_128_and_of_32_below():
    for vocab in (151936, 128256, 32000, 50257, 7000):
        for per_entry in (6, 10, 12, 16):
            rows = chunk_rows(10 ** 6, vocab, per_entry, budget=FAST_CHUNK_BYTES)
            assert rows * vocab * per_entry <= FAST_CHUNK_BYTES or rows == 16
            assert rows % (128 if rows > 128 else 32) == 0, (vocab, per_entry, rows)
    assert chunk_rows(100, 1000, 4, chunk_size=37) == 37      # an explicit size is kept
    assert chunk_rows(20, 151936, 10) == 20                   # never more rows than there are


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_headline_kl_plan_is_32_chunks_of_two_256_token_steps(dtype):
    """At N = 16384, V = 152k, 16-bit inputs, "kl" steps of 256 tokens: 512-row chunks (not 256)."""
    steps = (torch.arange(HEADLINE_N) // 256).view(1, -1)
    row_index = torch.arange(HEADLINE_N)
    elem = torch.finfo(dtype).bits // 8
    chunks, _ = single_pass_plan(steps, row_index, None, "kl", 1e-6, 0.2, None, HEADLINE_V, elem)
    assert len(chunks) == 32 and {b - a for a, b in chunks} == {512}
    chunks, _ = single_pass_plan(steps, row_index, torch.ones(1, HEADLINE_N), "none", 1e-6, 0.2, None, HEADLINE_V,
                                 elem)
    assert {b - a for a, b in chunks} == {512}


def test_fold_rows_default_knob_and_errors(monkeypatch):
    monkeypatch.delenv("SOD_KERNELS_FOLD_ROWS", raising=False)
    assert fold_rows() == DEFAULT_FOLD_ROWS == 1024
    assert fold_group(512) == 2 and fold_group(416) == 3 and fold_group(2048) == 1
    monkeypatch.setenv("SOD_KERNELS_FOLD_ROWS", "4096")
    assert fold_group(512) == 8
    for bad in ("0", "-3", str(MAX_FOLD_ROWS + 1), "many"):
        monkeypatch.setenv("SOD_KERNELS_FOLD_ROWS", bad)
        with pytest.raises(ValueError, match="SOD_KERNELS_FOLD_ROWS"):
            fold_rows()


@pytest.mark.parametrize("fold", ["1", "64", "100", "4096"])
def test_gradients_do_not_depend_on_the_fold(monkeypatch, fold):
    """d(weight) folded in products of any number of whole chunks is the whole product (float32 accumulation,
    compared with float64)."""
    g = torch.Generator().manual_seed(3)
    n, v, h, c = 90, 33, 7, 16
    hidden, weight, grads = (torch.randn(*shape, generator=g) for shape in ((n, h), (v, h), (n, v)))
    monkeypatch.setenv("SOD_KERNELS_FOLD_ROWS", fold)
    acc = GradAccumulator(LMHead(hidden, weight, None, v), torch.arange(n), True, need_hidden=True,
                          need_weight=True, need_bias=False, block_rows=c)
    for start in range(0, n, c):
        stop = min(start + c, n)
        block = acc.grad_block(stop - start)
        block.copy_(grads[start:stop])
        acc.add(block, start, stop, hidden[start:stop])
    d_hidden, d_weight, _ = acc.finish()
    exact = lambda a, b: (a.double() @ b.double()).float()  # noqa: E731
    torch.testing.assert_close(d_weight, exact(grads.T, hidden), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_hidden, exact(grads, weight), rtol=1e-5, atol=1e-5)
