"""The Triton backend of fused_sod_loss (sod_kernels.triton_divergence) against reference/ in float64.

Without CUDA the epilogue kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1) with
tiny column blocks (16) so that the odd test sizes below span several blocks and vocabulary splits with
masked edges; the logit products then run on the CPU in float32.  With CUDA the same tests run the real
kernels and cuBLAS products.  Chunk sizes are drawn small so that rows span several chunks (and steps
several chunks, which sends "kl"/"sampled" weights to the two-pass path).  Tolerances follow SPEC 9.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from reference import ref_fused_sod_loss
from sod_kernels import fused_sod_loss, step_ids_from_mask
from sod_kernels.dense import torch_backend as chunked_torch
from sod_kernels.dense import loss as sod_loss
from sod_kernels.dense import triton_backend as triton_divergence
from tests.conftest import HAS_CUDA
from tests.helpers import step_masks

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# SPEC section 9 (fp16 gradients are held to a tighter bound than bf16's: 3 more mantissa bits).
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
STAT_ATOL = 1e-5
FLOAT32_BYTES = 4
D_ABS_ERROR = 1e-6  # float32 error of one token's D (log-sum-exp terms of size O(1..log V))


def _inputs(lead, Hs, Ht, V, Vt, dtype, seed, bias, scale):
    """Student/teacher hidden states, weights, biases (float64 drawn, cast to dtype) and target ids."""
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(*lead, Hs, generator=g, dtype=torch.float64)
    sw = torch.randn(V, Hs, generator=g, dtype=torch.float64) * scale / Hs ** 0.5
    th = torch.randn(*lead, Ht, generator=g, dtype=torch.float64)
    tw = torch.randn(Vt, Ht, generator=g, dtype=torch.float64) * scale / Ht ** 0.5
    sb = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    tb = torch.randn(Vt, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, lead, generator=g)
    cast = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    return [cast(x) for x in (sh, sw, th, tw, sb, tb)], y.to(DEVICE)


ZERO_GRADIENT_NORM = 1e-10  # reference norms below this are zero up to float64 rounding


def _rel_err(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    ref_norm = float(ref.norm())
    if ref_norm < ZERO_GRADIENT_NORM:  # an exactly-zero gradient (e.g. V = 1) up to float64 rounding
        return float((got - ref).norm())
    return float((got - ref).norm()) / ref_norm


def _padded(rows: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64).reshape(len(rows), width)


def _check_fused_against_reference(mask, lead, Hs, Ht, V, Vt, dtype, seed, bias, scale, memory="fast",
                                   chunk_size=None, **options):
    (sh, sw, th, tw, sb, tb), y = _inputs(lead, Hs, Ht, V, Vt, dtype, seed, bias, scale)
    mask = mask.to(DEVICE)
    kw = dict(target_ids=y, epsilon=1e-4, delta=0.25, coef=0.7, **options)
    leaves = [x.detach().requires_grad_() for x in (sh, sw) + ((sb,) if bias else ())]
    stats = fused_sod_loss(leaves[0], leaves[1], th, tw, mask, student_bias=leaves[2] if bias else None,
                           teacher_bias=tb, return_stats=True, backend="triton", memory=memory,
                           chunk_size=chunk_size, **kw)
    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in leaves]
    up = lambda x: None if x is None else x.detach().double().cpu()  # noqa: E731
    ref_loss, ref = ref_fused_sod_loss(ref_leaves[0], ref_leaves[1], up(th), up(tw), mask.cpu(),
                                       student_bias=ref_leaves[2] if bias else None, teacher_bias=up(tb),
                                       **{**kw, "target_ids": y.cpu()})
    loss = stats.loss
    assert loss.dtype == torch.float32
    rtol = LOSS_RTOL[dtype]
    assert torch.allclose(stats.token_divergence.double().cpu(), ref["token_divergence"].detach(), rtol=rtol,
                          atol=STAT_ATOL)
    # Per-step statistics, as rows of the 2-D batch ([T, H] inputs drop the row in both implementations).
    got_d, got_w, got_k = stats.step_divergence.cpu(), stats.step_weights.cpu(), stats.num_steps.cpu()
    ref_d, ref_w, ref_k = ref["step_divergence"], ref["step_weights"], ref["num_steps"]
    if len(lead) == 1:
        got_d, got_w, got_k = got_d[None], got_w[None], got_k[None]
        ref_d, ref_w, ref_k = [ref_d], [ref_w], [ref_k]
    assert got_k.tolist() == list(ref_k)
    width = got_d.shape[-1]
    assert width >= max([len(r) for r in ref_d], default=0)
    assert torch.allclose(got_d.double(), _padded(ref_d, width), rtol=rtol * 10, atol=STAT_ATOL)
    # w_k = min((d_1 + eps) / (d_k + eps), 1 + delta) turns an absolute error e of the d's into a relative
    # error of up to e (1 / (d_1 + eps) + 1 / (d_k + eps)) of w_k (large when d_1 is tiny: the method's
    # conditioning, not the kernel's).
    eps = kw["epsilon"]
    sensitivity = [[D_ABS_ERROR * (1 / (row[0] + eps) + 1 / (d + eps)) for d in row] for row in ref_d]
    allowed = (rtol * 10 + _padded(sensitivity, width)) * _padded(ref_w, width) + 1e-12
    assert ((got_w.double() - _padded(ref_w, width)).abs() <= allowed).all()
    ids = step_ids_from_mask(mask.cpu().reshape(-1, mask.shape[-1]))
    padded_w = torch.cat([got_w, torch.zeros(got_w.shape[0], 1, dtype=got_w.dtype)], dim=1)  # width may be 0
    spread = torch.where(ids >= 0, padded_w.gather(1, ids.clamp(min=0)), torch.zeros((), dtype=got_w.dtype))
    assert torch.equal(stats.token_weights.cpu().reshape(ids.shape), spread)

    # The loss and its gradients against the reference given the kernel's step weights (constants for the
    # gradient, SPEC section 5); the weights themselves were checked above.
    weights = stats.token_weights.detach().double().cpu()
    per_token = kw["coef"] * weights * ref["token_divergence"]
    normalizer = max(int((mask != 0).sum()), 1)
    reduce = {"none": lambda x: x, "sum": torch.sum, "token_mean": lambda x: x.sum() / normalizer}
    ref_loss = reduce[options["reduction"]](per_token)
    # Absolute floor: each float32 D carries ~1 ulp of its O(1) log-sum-exp terms (SPEC section 3's formula
    # subtracts them), so the loss may be off by D_ABS_ERROR * coef * sum(w) / normalizer.
    divisor = normalizer if options["reduction"] == "token_mean" else 1
    floor = D_ABS_ERROR * kw["coef"] * float(weights.sum()) / divisor
    assert torch.allclose(loss.detach().double().cpu(), ref_loss.detach(), rtol=rtol, atol=max(floor, 1e-12))

    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.5
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    (ref_loss * upstream).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert got.grad is not None and got.grad.dtype == dtype and got.grad.shape == got.shape
        want_grad = torch.zeros_like(want) if want.grad is None else want.grad
        # A 16-bit gradient below the dtype's normal range has only absolute precision (its subnormal spacing):
        # the allowance is relative for normal values plus one smallest-normal per entry.
        diff = float((got.grad.detach().double().cpu() - want_grad.detach().double()).norm())
        allowed = GRAD_RTOL[dtype] * float(want_grad.norm()) + torch.finfo(dtype).tiny * want_grad.numel() ** 0.5
        assert _rel_err(got.grad, want_grad) < GRAD_RTOL[dtype] or diff <= allowed, \
            (_rel_err(got.grad, want_grad), diff, allowed, dtype)


@settings(max_examples=60)
@given(mask=step_masks(max_rows=3, max_len=21, max_steps=5), single=st.booleans(), Hs=st.integers(1, 40),
       Ht=st.integers(1, 40), V=st.integers(2, 230), pad=st.sampled_from([0, 0, 3, 37]),
       divergence=st.sampled_from(["reverse_kl", "forward_kl"]),
       step_divergence=st.sampled_from(["kl", "sampled", "none"]),
       reduction=st.sampled_from(["token_mean", "sum", "none"]), temperature=st.sampled_from([1.0, 0.6, 1.7]),
       bias=st.booleans(), dtype=st.sampled_from(DTYPES), scale=st.sampled_from([0.5, 1.0, 3.0]),
       memory=st.sampled_from(["fast", "fast", "low"]), chunk_size=st.sampled_from([None, 1, 4, 9]),
       seed=st.integers(0, 2**31 - 2))
def test_fused_sod_loss_matches_reference(mask, single, Hs, Ht, V, pad, divergence, step_divergence, reduction,
                                          temperature, bias, dtype, scale, memory, chunk_size, seed):
    if single:
        mask = mask[:1] if mask.shape[0] else torch.zeros(1, mask.shape[1], dtype=mask.dtype)
    lead = (mask.shape[1],) if single else tuple(mask.shape)
    _check_fused_against_reference(mask[0] if single else mask, lead, Hs, Ht, V, V + pad, dtype, seed, bias, scale,
                                   divergence=divergence, step_divergence=step_divergence, reduction=reduction,
                                   temperature=temperature, memory=memory, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_peaked_distributions(dtype, divergence):
    """Logits spread over tens of nats (near one-hot softmaxes, most p_s underflow): still within SPEC."""
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1]])
    _check_fused_against_reference(mask, tuple(mask.shape), 24, 33, 197, 205, dtype, seed=11, bias=True, scale=12.0,
                                   divergence=divergence, step_divergence="kl", reduction="token_mean",
                                   temperature=0.8)


@settings(max_examples=40)
@given(n=st.integers(1, 40), rows_frac=st.floats(0.05, 1.0), Hs=st.integers(1, 50), Ht=st.integers(1, 50),
       V=st.integers(1, 300), pad=st.integers(0, 20), divergence=st.sampled_from(["reverse_kl", "forward_kl"]),
       temperature=st.sampled_from([1.0, 0.45, 2.0]), bias=st.booleans(), target=st.booleans(),
       dtype=st.sampled_from(DTYPES), chunk_size=st.sampled_from([None, 1, 3, 16]),
       memory=st.sampled_from(["fast", "low"]), saved_frame=st.booleans(),
       need=st.sampled_from([(True, True, True), (True, False, False), (False, True, False), (False, False, True)]),
       seed=st.integers(0, 2**31 - 2))
def test_divergence_kernels_match_chunked_backend(n, rows_frac, Hs, Ht, V, pad, divergence, temperature, bias,
                                                  target, dtype, chunk_size, memory, saved_frame, need, seed):
    """divergence_forward/backward directly, with explicit chunk sizes and both memory modes, against the
    chunked PyTorch backend run in float64 on the same (dtype-rounded) inputs."""
    (sh, sw, th, tw, sb, tb), y = _inputs((n,), Hs, Ht, V, V + pad, dtype, seed, bias, scale=2.0)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=g)[:max(1, int(rows_frac * n))].sort().values.to(DEVICE)
    y = y if target else None
    opts = dict(divergence=divergence, temperature=temperature)
    got = triton_divergence.divergence_forward(sh, sw, sb, th, tw, tb, rows, y, chunk_size=chunk_size, memory=memory,
                                               **opts)
    up = lambda x: None if x is None else x.double()  # noqa: E731
    want = chunked_torch.divergence_forward(up(sh), up(sw), up(sb), up(th), up(tw), up(tb), rows, y, **opts)
    for a, b in zip(got[:5], want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == torch.float32 and a.shape == (rows.numel(),)
            assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5), float((a.double() - b).abs().max())
    grad = torch.randn(rows.numel(), generator=g, dtype=torch.float64).to(DEVICE)
    need_h, need_w, need_b = need
    back = dict(need_hidden=need_h, need_weight=need_w, need_bias=need_b, **opts)
    dh, dw, db = triton_divergence.divergence_backward(sh, sw, sb, th, tw, tb, rows, got[1], got[2], got[0],
                                                       grad.float(), frame=got[5] if saved_frame else None,
                                                       chunk_size=chunk_size, memory=memory, **back)
    rh, rw, rb = chunked_torch.divergence_backward(up(sh), up(sw), up(sb), up(th), up(tw), up(tb), rows, want[1],
                                                   want[2], want[0], grad, frame=want[5], **back)
    # SPEC 9, CCE-style: where the gradient itself is small next to the logits (nearly equal distributions,
    # V = 2) float32 logits cannot give 1e-4; then the error may not exceed the chunked backend's own error
    # computed with the same float32 logits (plus the tolerance).
    same = lambda x: None if x is None else x.float()  # noqa: E731
    f32 = chunked_torch.divergence_forward(same(sh), same(sw), same(sb), same(th), same(tw), same(tb), rows, None,
                                           **opts)
    fh, fw, fb = chunked_torch.divergence_backward(same(sh), same(sw), same(sb), same(th), same(tw), same(tb), rows,
                                                   f32[1], f32[2], f32[0], grad.float(), frame=f32[5], **back)
    for a, b, f, needed in ((dh, rh, fh, need_h), (dw, rw, fw, need_w), (db, rb, fb, need_b and bias)):
        assert (a is None) == (not needed) == (b is None)
        if a is not None:
            assert a.dtype == dtype and a.shape == b.shape
            allowed = GRAD_RTOL[dtype] + 2 * _rel_err(f, b)
            assert _rel_err(a, b) < allowed, (_rel_err(a, b), allowed)
    if dh is not None:  # rows outside row_index get exactly zero gradient
        outside = torch.ones(n, dtype=torch.bool, device=DEVICE)
        outside[rows] = False
        assert not dh[outside].any()


@pytest.mark.parametrize("reduction", ["token_mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_masked_batch_gives_exact_zero(reduction, dtype):
    (sh, sw, th, tw, sb, tb), y = _inputs((2, 9), 12, 10, 70, 75, dtype, seed=3, bias=True, scale=1.0)
    leaves = [x.requires_grad_() for x in (sh, sw, sb)]
    loss = fused_sod_loss(sh, sw, th, tw, torch.zeros(2, 9, dtype=torch.int64, device=DEVICE), target_ids=y,
                          student_bias=sb, teacher_bias=tb, reduction=reduction, backend="triton")
    assert not loss.detach().any() and torch.isfinite(loss).all()
    loss.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and not leaf.grad.any()


@pytest.mark.parametrize("step_divergence", ["kl", "sampled"])
def test_step_ids_equal_the_equivalent_mask(step_divergence):
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1]])
    (sh, sw, th, tw, _, _), y = _inputs(tuple(mask.shape), 17, 21, 150, 150, torch.float32, seed=5, bias=False,
                                        scale=2.0)
    results = []
    for kwargs in ({"response_mask": mask.to(DEVICE)}, {"step_ids": step_ids_from_mask(mask).to(DEVICE)}):
        h = sh.detach().clone().requires_grad_()
        stats = fused_sod_loss(h, sw, th, tw, target_ids=y, step_divergence=step_divergence, return_stats=True,
                               backend="triton", **kwargs)
        stats.loss.backward()
        results.append((stats.loss.detach(), stats.step_weights, stats.token_divergence, h.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_float64_is_refused_with_a_pointer_to_the_torch_backend():
    (sh, sw, th, tw, _, _), _ = _inputs((4,), 8, 8, 20, 20, torch.float64, seed=0, bias=False, scale=1.0)
    with pytest.raises(TypeError, match="backend='torch'"):
        fused_sod_loss(sh, sw, th, tw, torch.ones(4, dtype=torch.int64, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        triton_divergence.divergence_forward(sh, sw, None, th, tw, None, torch.arange(4, device=DEVICE), None,
                                             divergence="reverse_kl", temperature=1.0)


class _RecordSizes(TorchDispatchMode):
    """Records the size in bytes of every tensor produced by an op while active."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel() * t.element_size()))
        return out


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_triton_path_allocates_nothing_of_size_tokens_x_vocabulary(divergence):
    """At N = 64 tokens, V = 480, H = 6: N x V = 30720 elements, more than all inputs and gradients
    together (~9k); with 6-row chunks (gradient blocks of two chunks) no tensor created during forward +
    backward may reach a quarter of an
    N x V float32 block in bytes (the interpreter's own argument copies are byte tensors, hence bytes)."""
    N, H, V = 64, 6, 480
    (sh, sw, th, tw, sb, tb), y = _inputs((N,), H, H, V, V + 8, torch.float32, seed=2, bias=True, scale=2.0)
    mask = (torch.arange(N, device=DEVICE) % 5 != 0).to(torch.int64)
    leaves = [x.requires_grad_() for x in (sh, sw, sb)]
    recorder = _RecordSizes()
    with recorder:
        loss = fused_sod_loss(sh, sw, th, tw, mask, target_ids=y, student_bias=sb, teacher_bias=tb,
                              divergence=divergence, step_divergence="sampled", backend="triton", chunk_size=6)
        loss.backward()
    assert all(leaf.grad is not None for leaf in leaves)
    assert recorder.sizes, "the dispatch recorder saw no tensor at all"
    largest = max(recorder.sizes, key=lambda item: item[1])
    assert largest[1] < N * V * FLOAT32_BYTES // 4, largest
