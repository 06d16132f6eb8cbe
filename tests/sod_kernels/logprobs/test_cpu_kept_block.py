"""The CPU path of fused_token_logprobs keeps its forward's last logit block for the backward
(sod_kernels.core.loop.CpuBlocks keep_last / reuse): one logit product fewer per call, the same gradients bit
for bit, the reference's numbers, and nothing kept where no backward follows or after the backward."""

from __future__ import annotations

import pytest
import torch

from reference import ref_token_logprobs
from sod_kernels import fused_token_logprobs
from sod_kernels.core import cpu_pass, cpu_products
from sod_kernels.core.chunks import LMHead
from sod_kernels.core.loop import CpuBlocks, KeptBlocks
from sod_kernels.logprobs import cpu_backend


def _problem(N, H, V, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), y, up


@pytest.fixture
def products(monkeypatch):
    """Counts the logit products of the CPU path (one per chunk that is not kept)."""
    calls = []
    real = cpu_products.logits_into
    monkeypatch.setattr(cpu_products, "logits_into", lambda p: calls.append(p[0][2].shape[0]) or real(p))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,chunk_size", [(1, None), (37, 8), (40, 8), (53, None), (29, 29)])
def test_backward_skips_the_kept_product_and_gives_the_same_gradients(products, N, chunk_size, dtype):
    h0, w0, b0, y, up = _problem(N, 12, 301, dtype, seed=N)
    h, w, b = (t.clone().requires_grad_() for t in (h0, w0, b0))
    lp = fused_token_logprobs(h, w, y, bias=b, temperature=0.9, chunk_size=chunk_size)
    chunks = len(products)
    loss = (lp * up.to(lp.dtype)).sum()
    loss.backward(retain_graph=True)
    assert len(products) == 2 * chunks - 1            # the backward reused the last chunk's block
    first = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    loss.backward()                                   # a second backward: nothing kept any more, all recomputed
    assert len(products) == 3 * chunks - 1
    for a, c in zip(first, (h.grad, w.grad, b.grad)):
        assert torch.equal(a, c)                      # the kept block is the product the recomputation forms


@pytest.mark.parametrize("entropy", [False, True])
def test_gradients_match_the_reference(entropy):
    h0, w0, b0, y, up = _problem(61, 10, 257, torch.float64, seed=3)
    ins = [t.clone().requires_grad_() for t in (h0, w0, b0)]
    out = fused_token_logprobs(*ins[:2], y, bias=ins[2], temperature=1.3, chunk_size=16, return_entropy=entropy)
    lp = out[0] if entropy else out
    (lp * up).sum().backward()
    ref_in = [t.clone().requires_grad_() for t in (h0, w0, b0)]
    ref = ref_token_logprobs(ref_in[0], ref_in[1], y, ref_in[2], 1.3)
    (ref * up).sum().backward()
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
    for a, c in zip(ins, ref_in):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-11, atol=1e-12)


def test_entropy_gradient_with_the_kept_block_equals_a_recomputed_one(products):
    h0, w0, _, y, up = _problem(45, 9, 190, torch.float32, seed=4, bias=False)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    lp, ent = fused_token_logprobs(h, w, y, chunk_size=10, return_entropy=True)
    loss = (lp * up.float()).sum() - 0.2 * ent.sum()
    loss.backward(retain_graph=True)
    first = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    loss.backward()
    assert len(products) == 5 + 4 + 5
    assert torch.equal(first[0], h.grad) and torch.equal(first[1], w.grad)


def test_only_the_hidden_gradient_and_a_row_subset():
    # the policy loss's path: a row subset of the tokens (TokenLogprobs directly), the weight frozen
    from sod_kernels.core.options import PassOptions
    from sod_kernels.logprobs.token_logprobs import TokenLogprobs

    h0, w0, _, y, up = _problem(50, 8, 133, torch.float64, seed=5, bias=False)
    rows = torch.tensor([1, 4, 5, 9, 20, 21, 22, 40, 49])
    opts = PassOptions(backend="torch", memory="fast", chunk_size=4, temperature=1.0, student_softcap=None,
                       with_entropy=False)
    h = h0.clone().requires_grad_()
    lp, _ = TokenLogprobs.apply(h, w0, None, rows, y, opts)
    (lp * up[rows]).sum().backward()
    ref_h = h0.clone().requires_grad_()
    (ref_token_logprobs(ref_h, w0, y)[rows] * up[rows]).sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-11, atol=1e-12)
    assert float(h.grad[[0, 2, 3]].abs().max()) == 0.0


def test_nothing_is_kept_without_gradients():
    h0, w0, _, y, _ = _problem(30, 8, 100, torch.float32, seed=6, bias=False)
    _, _, _, kept = cpu_backend.logprob_forward(h0, w0, None, torch.arange(30), y, temperature=1.0,
                                                 keep_block=False)
    assert kept is None
    _, _, _, kept = cpu_backend.logprob_forward(h0, w0, None, torch.arange(30), y, temperature=1.0,
                                                 keep_block=True, chunk_size=7)
    assert isinstance(kept, KeptBlocks) and (kept.start, kept.stop) == (28, 30)
    assert kept.nbytes == 7 * 100 * 4                 # the one reusable buffer: the longest chunk's rows


def test_the_kept_block_is_released_by_the_backward():
    h0, w0, _, y, _ = _problem(30, 8, 100, torch.float32, seed=7, bias=False)
    h = h0.clone().requires_grad_()
    lp = fused_token_logprobs(h, w0, y, chunk_size=7)
    node = lp.grad_fn
    while not hasattr(node, "extra"):                 # the TokenLogprobs node under the reshape
        node = node.next_functions[0][0]
    assert isinstance(node.extra[1], KeptBlocks)
    lp.sum().backward(retain_graph=True)
    assert node.extra[1] is None                      # overwritten by the backward: not held, not reused


def _head(N, V, H, dtype=torch.float32, seed=8):
    g = torch.Generator().manual_seed(seed)
    src = LMHead(torch.randn(N, H, generator=g, dtype=dtype), torch.randn(V, H, generator=g, dtype=dtype), None, V)
    return cpu_pass.ComputeHead(src, dtype)


def test_cpu_blocks_reuse_only_a_matching_first_chunk(products):
    head = _head(20, 50, 6)
    first = CpuBlocks((head,), torch.arange(20), True, 8, keep_last=True)
    for i, (a, c) in enumerate([(0, 8), (8, 16), (16, 20)]):
        first.chunk(i, a, c, None)
    first.release()
    kept = first.kept
    expected = kept.buffers[0][:4 * 50].view(4, 50).clone()
    torch.testing.assert_close(expected, head.hidden[16:20] @ head.weight.T)
    assert len(products) == 3
    # a pass whose first chunk is another one ignores the kept block (and recomputes everything)
    other = CpuBlocks((head,), torch.arange(20), True, 8, reuse=kept)
    other.chunk(0, 0, 8, None)
    other.chunk(2, 16, 20, None)
    assert not other.reused and len(products) == 5
    # the matching first chunk is taken as it is, the next ones are computed into the same buffer
    again = CpuBlocks((head,), torch.arange(20), True, 8, keep_last=True)
    for i, (a, c) in enumerate([(0, 8), (8, 16), (16, 20)]):
        again.chunk(i, a, c, None)
    again.release()
    reuse = CpuBlocks((head,), torch.arange(20), True, 8, reuse=again.kept)
    c = reuse.chunk(0, 16, 20, None)
    assert reuse.reused and len(products) == 8
    assert c.logits[0].data_ptr() == again.kept.buffers[0].data_ptr()
    assert torch.equal(c.logits[0], expected)
    reuse.chunk(1, 0, 8, None)
    assert len(products) == 9


def test_cpu_blocks_ignore_a_kept_block_of_another_shape_or_dtype():
    head = _head(20, 50, 6)
    small = KeptBlocks(16, 20, [torch.zeros(4 * 50)])
    assert not CpuBlocks((head,), torch.arange(20), True, 8, reuse=small)._reuse   # too small for 8 rows
    wrong = KeptBlocks(16, 20, [torch.zeros(8 * 50, dtype=torch.float64)])
    assert CpuBlocks((head,), torch.arange(20), True, 8, reuse=wrong)._reuse is None
    fine = KeptBlocks(16, 20, [torch.zeros(8 * 50)])
    assert CpuBlocks((head,), torch.arange(20), True, 8, reuse=fine)._reuse is fine
