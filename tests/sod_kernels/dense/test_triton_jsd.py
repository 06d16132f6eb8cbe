"""The Triton backend's generalized JSD and hard-label term (SPEC section 14) against float64 autograd.

The backend functions are called directly: ``single_pass_loss`` on a ``KLProblem``, and
``divergence_forward`` / ``divergence_backward`` in both memory modes.  The oracle is float64 autograd through
:func:`reference.ref_jsd` (or the KLs) on log-softmaxes of :func:`reference.sod_reference.ref_logits`, on the
same dtype-rounded inputs.  Without CUDA the kernels run under Triton's interpreter with 16-column blocks, so
the odd sizes below span several column blocks, vocabulary splits, row chunks and (with the low-memory
budget shrunk) vocabulary slices.  Tolerances follow the existing Triton tests (SPEC 9): float32 tight,
bfloat16 loose (its gradients are rounded to 8 bits of mantissa).
"""

from __future__ import annotations

import pytest
import torch

from reference.sod_reference import ref_jsd, ref_logits
from sod_kernels.dense import triton_backend
from tests.conftest import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
N, HS, HT, V, PAD = 37, 24, 40, 203, 5
CHUNK = 8                      # rows per chunk: 5 chunks of 37 rows
SLICE_BUDGET = CHUNK * 10 * 64  # low-memory byte budget giving 64-column vocabulary slices (4 slices of 203)
D_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5}
D_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}

# (divergence, beta, hard-label term, soft-caps (student, teacher))
CASES = [
    ("jsd", 0.3, False, (None, None)),
    ("jsd", 0.7, True, (None, None)),
    ("jsd", 0.3, True, (4.0, 3.0)),
    ("reverse_kl", 0.5, True, (None, None)),
    ("forward_kl", 0.5, True, (4.0, None)),
]
CASE_IDS = ["jsd0.3", "jsd0.7-hard", "jsd0.3-hard-caps", "reverse-hard", "forward-hard-cap"]


def _inputs(dtype, seed, bias=True, scale=2.0):
    """``(sh, sw, sb, th, tw, tb)`` (float64 drawn, rounded to ``dtype``; the teacher vocabulary padded by
    ``PAD``) and the targets ``[N]`` int64."""
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(N, HS, generator=g, dtype=torch.float64)
    sw = torch.randn(V, HS, generator=g, dtype=torch.float64) * scale / HS ** 0.5
    th = torch.randn(N, HT, generator=g, dtype=torch.float64)
    tw = torch.randn(V + PAD, HT, generator=g, dtype=torch.float64) * scale / HT ** 0.5
    sb = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    tb = torch.randn(V + PAD, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    cast = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    return [cast(x) for x in (sh, sw, sb, th, tw, tb)], y.to(DEVICE)


def _reference(tensors, rows, y, *, divergence, beta, temperature, caps):
    """Float64 ``(D [Na], logp_s(y) [Na], leaves (sh, sw, sb))`` with autograd to the student leaves."""
    sh, sw, sb, th, tw, tb = tensors
    up = lambda x: None if x is None else x.detach().double().cpu()  # noqa: E731
    leaves = [up(x).requires_grad_() if x is not None else None for x in (sh, sw, sb)]
    r = rows.cpu()
    ls = torch.log_softmax(ref_logits(leaves[0][r], leaves[1], leaves[2], temperature, softcap=caps[0]), -1)
    lt = torch.log_softmax(ref_logits(up(th)[r], up(tw), up(tb), temperature, vocab=V, softcap=caps[1]), -1)
    if divergence == "jsd":
        D = ref_jsd(ls, lt, beta)
    elif divergence == "reverse_kl":
        D = (ls.exp() * (ls - lt)).sum(-1)
    else:
        D = (lt.exp() * (lt - ls)).sum(-1)
    lp_s = ls.gather(1, y.cpu()[r][:, None]).squeeze(1)
    return D, lp_s, leaves


def _rel_err(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm()) / max(float(want.norm()), 1e-30)


def _check_grads(got, leaves, dtype, bias):
    for g, leaf in zip(got, leaves):
        if leaf is None:
            assert g is None or not bias
            continue
        assert g is not None and g.dtype == dtype and g.shape == leaf.shape
        assert _rel_err(g, leaf.grad) < GRAD_RTOL[dtype], (_rel_err(g, leaf.grad), dtype)


def _rows():
    """A sorted subset of the rows (not ``arange``: the gathered path), 30 of 37."""
    return torch.randperm(N, generator=torch.Generator().manual_seed(7))[:30].sort().values.to(DEVICE)


@pytest.mark.parametrize("memory", ["fast", "low"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_two_pass_matches_float64_autograd(case, memory, monkeypatch):
    divergence, beta, hard, caps = case
    monkeypatch.setattr(triton_backend, "LOW_MEMORY_CHUNK_BYTES", SLICE_BUDGET)
    dtype, temperature = torch.float32, 0.7
    tensors, y = _inputs(dtype, seed=1)
    rows = _rows()
    opts = dict(divergence=divergence, temperature=temperature, beta=beta, student_softcap=caps[0],
                teacher_softcap=caps[1])
    D, lse_s, lse_t, lp_s, lp_t, frame = triton_backend.divergence_forward(
        *tensors, rows, y, chunk_size=CHUNK, memory=memory, **opts)
    ref_D, ref_lp, leaves = _reference(tensors, rows, y, divergence=divergence, beta=beta,
                                       temperature=temperature, caps=caps)
    assert D.dtype == torch.float32 and D.shape == (rows.numel(),)
    assert torch.allclose(D.double().cpu(), ref_D.detach(), rtol=D_RTOL[dtype], atol=D_ATOL[dtype])
    assert torch.allclose(lp_s.double().cpu(), ref_lp.detach(), rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(3)
    grad_D = torch.randn(rows.numel(), generator=g, dtype=torch.float64) + 0.5
    grad_lp = torch.randn(rows.numel(), generator=g, dtype=torch.float64) if hard else None
    target = (ref_D * grad_D).sum() + ((ref_lp * grad_lp).sum() if hard else 0.0)
    target.backward()
    for saved in (frame, None):  # the saved frame, and the statistics recomputed in backward
        got = triton_backend.divergence_backward(
            *tensors, rows, lse_s, lse_t, D, grad_D.float().to(DEVICE), frame=saved, chunk_size=CHUNK,
            memory=memory, target_ids=y if hard else None,
            grad_target_logprob=grad_lp.float().to(DEVICE) if hard else None, **opts)
        _check_grads(got, leaves, dtype, bias=True)
        outside = torch.ones(N, dtype=torch.bool, device=DEVICE)
        outside[rows] = False
        assert not got[0][outside].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_single_pass_matches_float64_autograd(case, dtype):
    divergence, beta, hard, caps = case
    temperature, coef, lam = 1.3, 0.7, (0.4 if hard else 0.0)
    tensors, y = _inputs(dtype, seed=2)
    rows = torch.arange(N, device=DEVICE)
    p = triton_backend.KLProblem.build(*tensors[:3], *tensors[3:], rows, y, divergence, temperature,
                                       student_softcap=caps[0], teacher_softcap=caps[1], beta=beta)
    weights = torch.rand(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    w32 = weights.float().to(DEVICE)
    chunks = [(a, min(a + CHUNK, N)) for a in range(0, N, CHUNK)]
    normalizer = float(N)
    extra = {"hard_loss_weight": lam} if hard else {}
    res = triton_backend.single_pass_loss(p, chunks, lambda a, b, D, s: w32[a:b], coef=coef, normalizer=normalizer,
                                          need_hidden=True, need_weight=True, need_bias=True, **extra)
    ref_D, ref_lp, leaves = _reference(tensors, rows, y, divergence=divergence, beta=beta,
                                       temperature=temperature, caps=caps)
    ref_loss = coef * (weights * ref_D).sum() / normalizer - lam * ref_lp.sum() / normalizer
    assert res.loss.dtype == torch.float32 and res.loss.shape == ()
    assert torch.allclose(res.loss.double().cpu(), ref_loss.detach(), rtol=LOSS_RTOL[dtype], atol=1e-7)
    assert torch.allclose(res.D.double().cpu(), ref_D.detach(), rtol=D_RTOL[dtype], atol=D_ATOL[dtype])
    assert torch.allclose(res.lp_s.double().cpu(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    ref_loss.backward()
    _check_grads(res.grads, leaves, dtype, bias=True)


def test_hard_term_alone_is_the_cross_entropy_gradient():
    """With every step weight 0 the single pass is the hard-label cross-entropy alone (JSD problem)."""
    dtype, temperature, lam = torch.float32, 0.8, 1.5
    tensors, y = _inputs(dtype, seed=4, bias=False)
    rows = torch.arange(N, device=DEVICE)
    p = triton_backend.KLProblem.build(*tensors[:3], *tensors[3:], rows, y, "jsd", temperature, beta=0.5)
    zero = torch.zeros(N, device=DEVICE)
    res = triton_backend.single_pass_loss(p, [(0, 20), (20, N)], lambda a, b, D, s: zero[a:b], coef=1.0,
                                          normalizer=2.0, need_hidden=True, need_weight=True, need_bias=False,
                                          hard_loss_weight=lam)
    _, ref_lp, leaves = _reference(tensors, rows, y, divergence="jsd", beta=0.5, temperature=temperature,
                                   caps=(None, None))
    ref_loss = -lam * ref_lp.sum() / 2.0
    assert torch.allclose(res.loss.double().cpu(), ref_loss.detach(), rtol=1e-5)
    ref_loss.backward()
    _check_grads(res.grads[:2], leaves[:2], dtype, bias=False)
    assert res.grads[2] is None


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_two_pass_bf16_jsd(memory, monkeypatch):
    """bfloat16 inputs (float32 logits, bf16 gradient blocks), JSD with the hard-label term and caps."""
    monkeypatch.setattr(triton_backend, "LOW_MEMORY_CHUNK_BYTES", SLICE_BUDGET)
    dtype, temperature, beta, caps = torch.bfloat16, 1.6, 0.7, (5.0, 4.0)
    tensors, y = _inputs(dtype, seed=9)
    rows = _rows()
    opts = dict(divergence="jsd", temperature=temperature, beta=beta, student_softcap=caps[0],
                teacher_softcap=caps[1])
    D, lse_s, lse_t, lp_s, _, frame = triton_backend.divergence_forward(*tensors, rows, y, chunk_size=CHUNK,
                                                                        memory=memory, **opts)
    ref_D, ref_lp, leaves = _reference(tensors, rows, y, divergence="jsd", beta=beta, temperature=temperature,
                                       caps=caps)
    assert torch.allclose(D.double().cpu(), ref_D.detach(), rtol=D_RTOL[dtype], atol=D_ATOL[dtype])
    g = torch.Generator().manual_seed(8)
    grad_D = torch.randn(rows.numel(), generator=g, dtype=torch.float64)
    grad_lp = torch.randn(rows.numel(), generator=g, dtype=torch.float64)
    ((ref_D * grad_D).sum() + (ref_lp * grad_lp).sum()).backward()
    got = triton_backend.divergence_backward(*tensors, rows, lse_s, lse_t, D, grad_D.float().to(DEVICE),
                                             frame=frame, chunk_size=CHUNK, memory=memory, target_ids=y,
                                             grad_target_logprob=grad_lp.float().to(DEVICE), **opts)
    _check_grads(got, leaves, dtype, bias=True)


def test_peaked_jsd_is_finite_and_accurate():
    """Logits spread over tens of nats (most probabilities underflow in float32): log M from the shifted
    log-probs keeps D and the gradient finite and accurate."""
    dtype, temperature, beta = torch.float32, 0.5, 0.3
    tensors, y = _inputs(dtype, seed=12, scale=15.0)
    rows = torch.arange(N, device=DEVICE)
    D, lse_s, lse_t, _, _, frame = triton_backend.divergence_forward(*tensors, rows, y, divergence="jsd",
                                                                     temperature=temperature, beta=beta,
                                                                     chunk_size=CHUNK)
    ref_D, _, leaves = _reference(tensors, rows, y, divergence="jsd", beta=beta, temperature=temperature,
                                  caps=(None, None))
    assert torch.isfinite(D).all()
    assert torch.allclose(D.double().cpu(), ref_D.detach(), rtol=1e-5, atol=1e-5)
    ref_D.sum().backward()
    got = triton_backend.divergence_backward(*tensors, rows, lse_s, lse_t, D, torch.ones(N, device=DEVICE),
                                             divergence="jsd", temperature=temperature, beta=beta, frame=frame,
                                             chunk_size=CHUNK)
    assert all(torch.isfinite(x).all() for x in got)
    _check_grads(got, leaves, dtype, bias=True)


def test_jsd_beta_outside_the_open_interval_is_refused():
    tensors, y = _inputs(torch.float32, seed=0)
    rows = torch.arange(N, device=DEVICE)
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="beta"):
            triton_backend.divergence_forward(*tensors, rows, y, divergence="jsd", temperature=1.0, beta=beta)


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_two_pass_hard_term_without_divergence_gradient(memory, monkeypatch):
    """``grad_divergence=None``: the backward is the sampled log-prob term alone (reverse-KL problem)."""
    monkeypatch.setattr(triton_backend, "LOW_MEMORY_CHUNK_BYTES", SLICE_BUDGET)
    tensors, y = _inputs(torch.float32, seed=6)
    rows = _rows()
    opts = dict(divergence="reverse_kl", temperature=1.4)
    D, lse_s, lse_t, _, _, frame = triton_backend.divergence_forward(*tensors, rows, y, chunk_size=CHUNK,
                                                                     memory=memory, **opts)
    _, ref_lp, leaves = _reference(tensors, rows, y, divergence="reverse_kl", beta=0.5, temperature=1.4,
                                   caps=(None, None))
    grad_lp = torch.randn(rows.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (ref_lp * grad_lp).sum().backward()
    got = triton_backend.divergence_backward(*tensors, rows, lse_s, lse_t, D, None, frame=frame, chunk_size=CHUNK,
                                             memory=memory, target_ids=y,
                                             grad_target_logprob=grad_lp.float().to(DEVICE), **opts)
    _check_grads(got, leaves, torch.float32, bias=True)


def test_single_pass_jsd_is_bitwise_reproducible():
    tensors, y = _inputs(torch.float32, seed=10)
    rows = torch.arange(N, device=DEVICE)
    ones = torch.ones(N, device=DEVICE)
    chunks = [(a, min(a + CHUNK, N)) for a in range(0, N, CHUNK)]
    runs = []
    for _ in range(2):
        p = triton_backend.KLProblem.build(*tensors, rows, y, "jsd", 0.9, beta=0.4, student_softcap=6.0)
        res = triton_backend.single_pass_loss(p, chunks, lambda a, b, D, s: ones[a:b], coef=1.0, normalizer=float(N),
                                              need_hidden=True, need_weight=True, need_bias=True,
                                              hard_loss_weight=0.3)
        runs.append((res.loss, res.D, *res.grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
