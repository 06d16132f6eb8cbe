"""fused_sod_loss on the chunked PyTorch backend against reference/ (SPEC sections 3-6)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference import ref_fused_sod_loss
from sod_kernels import SODLoss, fused_sod_loss, step_ids_from_mask
from sod_kernels.core import tiles
from tests.helpers import step_masks


def _problem(mask, Hs, Ht, V, Vt, dtype, seed, bias, peaked=False):
    g = torch.Generator().manual_seed(seed)
    B, T = mask.shape
    scale = 3.0 if peaked else 1.0
    sh = torch.randn(B, T, Hs, generator=g, dtype=torch.float64)
    sw = torch.randn(V, Hs, generator=g, dtype=torch.float64) * scale / Hs ** 0.5
    th = torch.randn(B, T, Ht, generator=g, dtype=torch.float64)
    tw = torch.randn(Vt, Ht, generator=g, dtype=torch.float64) * scale / Ht ** 0.5
    sb = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    tb = torch.randn(Vt, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return [cast(x) for x in (sh, sw, th, tw, sb, tb)], y


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@given(mask=step_masks(max_rows=3, max_len=40, max_steps=8), Hs=st.integers(1, 19), Ht=st.integers(1, 23),
       V=st.integers(2, 70), pad=st.integers(0, 5), divergence=st.sampled_from(["reverse_kl", "forward_kl"]),
       step_divergence=st.sampled_from(["kl", "sampled", "none"]), reduction=st.sampled_from(["token_mean", "sum", "none"]),
       temperature=st.sampled_from([1.0, 0.6, 1.7]), bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       chunk=st.sampled_from([None, 1, 3]), vocab_tile=st.sampled_from([None, 1, 7, 16]),
       seed=st.integers(0, 2**31 - 1))
def test_torch_backend_matches_reference(mask, Hs, Ht, V, pad, divergence, step_divergence, reduction, temperature,
                                         bias, dtype, chunk, vocab_tile, seed):
    (sh, sw, th, tw, sb, tb), y = _problem(mask, Hs, Ht, V, V + pad, dtype, seed, bias)
    with pytest.MonkeyPatch.context() as mp:
        if vocab_tile is not None:  # several vocabulary tiles per row: the online log-sum-exp path
            mp.setattr(tiles, "VOCAB_TILE", vocab_tile)
        if chunk is not None:
            mp.setattr(tiles, "CHUNK_ELEMENTS", chunk * tiles.vocab_tile(V))
        _check_against_reference(mask, sh, sw, th, tw, sb, tb, y, bias, dtype, divergence=divergence,
                                 step_divergence=step_divergence, temperature=temperature, reduction=reduction)


def _check_against_reference(mask, sh, sw, th, tw, sb, tb, y, bias, dtype, **options):
    kw = dict(target_ids=y, epsilon=1e-4, delta=0.25, coef=0.7, teacher_bias=tb, **options)
    leaves = [x.detach().requires_grad_() for x in (sh, sw) + ((sb,) if bias else ())]
    stats = fused_sod_loss(leaves[0], leaves[1], th, tw, mask, student_bias=leaves[2] if bias else None,
                           return_stats=True, backend="torch", **kw)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_loss, ref = ref_fused_sod_loss(ref_leaves[0], ref_leaves[1], th.double(), tw.double(), mask,
                                       student_bias=ref_leaves[2] if bias else None,
                                       **{**kw, "teacher_bias": None if tb is None else tb.double()})
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert stats.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(stats.loss.double(), ref_loss.detach(), rtol=tol, atol=tol)
    assert torch.allclose(stats.token_divergence.double(), ref["token_divergence"].detach(), rtol=tol, atol=tol * 10)
    assert torch.allclose(stats.token_weights.double(), ref["token_weights"], rtol=1e-4, atol=1e-5)
    assert stats.num_steps.tolist() == ref["num_steps"]
    K = max(ref["num_steps"], default=0)
    assert stats.step_divergence.shape == (mask.shape[0], K) == stats.step_weights.shape
    for b, (d, w) in enumerate(zip(ref["step_divergence"], ref["step_weights"])):
        k = len(d)
        assert torch.allclose(stats.step_divergence[b, :k].double(), torch.tensor(d, dtype=torch.float64),
                              rtol=1e-4, atol=1e-6)
        assert torch.allclose(stats.step_weights[b, :k].double(), torch.tensor(w, dtype=torch.float64),
                              rtol=1e-4, atol=1e-6)
    total = stats.loss.sum()
    if mask.sum() == 0:
        assert total.item() == 0.0
    grads = torch.autograd.grad(total, leaves, allow_unused=False)
    ref_grads = torch.autograd.grad(ref_loss.sum(), ref_leaves)
    for g_, r_ in zip(grads, ref_grads):
        assert g_.dtype == dtype
        if r_.norm() == 0:
            assert bool((g_ == 0).all())
        else:
            assert _rel(g_, r_) < (1e-9 if dtype == torch.float64 else 1e-4)


@given(mask=step_masks(max_rows=2, max_len=30, max_steps=6), seed=st.integers(0, 10_000),
       divergence=st.sampled_from(["reverse_kl", "forward_kl"]))
def test_bf16_inputs_within_spec_tolerance(mask, seed, divergence):
    (sh, sw, th, tw, _, _), _ = _problem(mask, 16, 24, 50, 53, torch.float64, seed, False)
    bf = [x.to(torch.bfloat16) for x in (sh, sw, th, tw)]
    leaves = [bf[0].detach().requires_grad_(), bf[1].detach().requires_grad_()]
    loss = fused_sod_loss(leaves[0], leaves[1], bf[2], bf[3], mask, divergence=divergence, backend="torch")
    # Reference on the same (bf16-rounded) values, in float64.
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_loss, _ = ref_fused_sod_loss(ref_leaves[0], ref_leaves[1], bf[2].double(), bf[3].double(), mask,
                                     divergence=divergence)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(abs(ref_loss.item()), 1e-3)
    if mask.sum() == 0:
        return
    loss.backward()
    ref_loss.backward()
    for g_, r_ in zip((leaves[0].grad, leaves[1].grad), (ref_leaves[0].grad, ref_leaves[1].grad)):
        assert g_.dtype == torch.bfloat16
        assert _rel(g_, r_) < 2e-2


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 0, 1]])
    sh = torch.randn(2, 7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    sw = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    sb = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    th, tw = torch.randn(2, 7, 5, dtype=torch.float64, generator=g), torch.randn(11, 5, dtype=torch.float64, generator=g)
    for divergence in ("reverse_kl", "forward_kl"):
        # Step weights are constants for the gradient (SPEC section 5): gradcheck with weights that do not
        # depend on the inputs ("none"), and with fixed non-trivial weights through reduction="none".
        # memory="low": gradcheck calls backward repeatedly on one forward, which only the recomputing two-pass
        # path allows (the single pass is checked against the float64 reference in test_cpu_single_pass.py).
        fn = lambda a, b, c: fused_sod_loss(a, b, th, tw, mask, student_bias=c, divergence=divergence,  # noqa: E731
                                            step_divergence="none", temperature=0.8, backend="torch",
                                            memory="low")
        assert torch.autograd.gradcheck(fn, (sh, sw, sb))
        fixed = torch.rand(2, 7, dtype=torch.float64, generator=g)
        fn = lambda a, b, c: (fixed * fused_sod_loss(a, b, th, tw, mask, student_bias=c,  # noqa: E731
                                                     divergence=divergence, reduction="none", backend="torch",
                                                     step_divergence="none")).sum()
        assert torch.autograd.gradcheck(fn, (sh, sw, sb))


def test_all_masked_batch_gives_exact_zero_and_zero_grads():
    sh = torch.randn(3, 5, 4, requires_grad=True)
    sw = torch.randn(7, 4, requires_grad=True)
    sb = torch.randn(7, requires_grad=True)
    for reduction in ("token_mean", "sum", "none"):
        out = fused_sod_loss(sh, sw, torch.randn(3, 5, 6), torch.randn(7, 6), torch.zeros(3, 5), student_bias=sb,
                             reduction=reduction, return_stats=True, backend="torch")
        assert bool((out.loss == 0).all()) and not bool(torch.isnan(out.loss).any())
        out.loss.sum().backward()
        assert bool((sh.grad == 0).all()) and bool((sw.grad == 0).all()) and bool((sb.grad == 0).all())
        assert out.num_steps.tolist() == [0, 0, 0] and out.step_weights.shape == (3, 0)
        sh.grad = sw.grad = sb.grad = None


def test_empty_batch():
    sh = torch.randn(0, 5, 4, requires_grad=True)
    loss = fused_sod_loss(sh, torch.randn(7, 4), torch.randn(0, 5, 6), torch.randn(7, 6), torch.zeros(0, 5),
                          backend="torch")
    assert loss.item() == 0.0


def test_step_ids_and_single_sequence_inputs_agree_with_mask_inputs():
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 1, 1]])
    sh, sw = torch.randn(1, 9, 6, generator=g), torch.randn(10, 6, generator=g)
    th, tw = torch.randn(1, 9, 8, generator=g), torch.randn(10, 8, generator=g)
    a = fused_sod_loss(sh, sw, th, tw, mask, return_stats=True, backend="torch")
    b = fused_sod_loss(sh, sw, th, tw, step_ids=step_ids_from_mask(mask), return_stats=True, backend="torch")
    c = fused_sod_loss(sh[0], sw, th[0], tw, mask[0], return_stats=True, backend="torch")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.token_weights, b.token_weights)
    assert torch.allclose(a.loss, c.loss) and c.token_divergence.shape == (9,)
    assert torch.allclose(a.step_weights[0], c.step_weights) and c.num_steps.shape == ()
    per_token = fused_sod_loss(sh[0], sw, th[0], tw, mask[0], reduction="none", backend="torch")
    assert per_token.shape == (9,)


def test_module_wrapper_matches_function():
    g = torch.Generator().manual_seed(6)
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    args = (torch.randn(1, 5, 3, generator=g), torch.randn(8, 3, generator=g), torch.randn(1, 5, 4, generator=g),
            torch.randn(8, 4, generator=g))
    module = SODLoss(divergence="forward_kl", coef=2.0, backend="torch")
    assert torch.equal(module(*args, mask), fused_sod_loss(*args, mask, divergence="forward_kl", coef=2.0))
    assert "forward_kl" in repr(module)


def test_no_tokens_by_vocabulary_tensor_is_created(monkeypatch):
    """The torch path's two passes process tiles of rows: no tensor reaches N x V elements (here N*V dominates)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    N, V, H = 96, 1000, 8
    monkeypatch.setattr(tiles, "CHUNK_ELEMENTS", 8 * V)  # 8 rows x the whole vocabulary per tile
    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    sh = torch.randn(1, N, H, requires_grad=True)
    sw = torch.randn(V, H, requires_grad=True)
    with Record():
        loss = fused_sod_loss(sh, sw, torch.randn(1, N, H), torch.randn(V, H), torch.ones(1, N), backend="torch",
                              memory="low")  # the two-pass tiles (the single pass: tests/sod_kernels/test_cpu_backends.py)
        loss.backward()
    assert max(sizes) < N * V / 8
    assert max(sizes) >= 8 * V  # the chunk blocks themselves were seen


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_peaked_distributions(divergence):
    mask = torch.ones(2, 20, dtype=torch.int64)
    (sh, sw, th, tw, _, _), _ = _problem(mask, 12, 12, 300, 300, torch.float32, 0, False, peaked=True)
    sh = (sh * 4).requires_grad_()
    loss = fused_sod_loss(sh, sw, th * 4, tw, mask, divergence=divergence, backend="torch")
    ref, _ = ref_fused_sod_loss(sh.detach().double(), sw.double(), (th * 4).double(), tw.double(), mask,
                                divergence=divergence)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
