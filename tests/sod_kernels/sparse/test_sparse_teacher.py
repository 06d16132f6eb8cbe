"""fused_sparse_sod_loss (a teacher given as top-k log-probs) on both backends against reference/ in float64.

The Triton backend runs under the interpreter without CUDA (conftest), with tiny column and id blocks so
that the odd sizes below cross block edges; the torch backend runs on the CPU.  Teachers are random
distributions whose ids are either their own top-k or random distinct ids; sampled tokens are sometimes
listed and sometimes not.  Tolerances follow the dense loss's (float32: 1e-5 on the loss, 1e-4 on gradients;
16-bit: 2e-2 on gradients).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from reference import ref_sparse_sod_loss, ref_sparse_token_divergence
from sod_kernels import SODStats, fused_sod_loss, fused_sparse_sod_loss
from sod_kernels.sparse import triton_backend as sparse_triton
from sod_kernels.sparse.rows import TAIL_FLOOR, teacher_tail_floor
from sod_kernels.sparse.validation import logprob_tolerance
from tests.conftest import HAS_CUDA
from tests.helpers import step_masks

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["torch", "triton"]
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4, torch.float64: 1e-10}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-9}
D_ATOL = 2e-6          # float32 error of one token's D (terms of size O(1 .. log V))
ZERO_NORM = 1e-10
ROOT = Path(__file__).resolve().parents[3]


def _device(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


def _teacher(lead, V, k, g, *, scale=2.0, random_ids=False, dtype=torch.float32):
    """``(ids [..., k], logprobs [..., k] of dtype, full teacher log-softmax [..., V] float64)``."""
    logp = torch.log_softmax(torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale, dim=-1)
    if random_ids:
        ids = torch.rand(*lead, V, generator=g).argsort(dim=-1)[..., :k]
    else:
        ids = logp.topk(k, dim=-1).indices
    return ids, logp.gather(-1, ids).to(dtype), logp


def _problem(lead, H, V, k, dtype, seed, *, bias=True, scale=2.0, random_ids=False, lp_dtype=torch.float32,
             device="cpu"):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    sw = torch.randn(V, H, generator=g, dtype=torch.float64) * scale / max(H, 1) ** 0.5
    sb = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    ids, a, full = _teacher(lead, V, k, g, scale=scale, random_ids=random_ids, dtype=lp_dtype)
    y = torch.randint(0, V, lead, generator=g)
    listed = torch.rand(lead, generator=g) < 0.5  # half of the sampled tokens are among the ids
    y = torch.where(listed, ids[..., 0], y)
    cast = lambda x: None if x is None else x.to(dtype).to(device)  # noqa: E731
    return [cast(x) for x in (sh, sw, sb)], ids.to(device), a.to(device), y.to(device), full


def _rel_err(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    norm = float(ref.norm())
    return float((got - ref).norm()) if norm < ZERO_NORM else float((got - ref).norm()) / norm


def _padded(rows, width):
    return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64).reshape(len(rows), width)


def _check_against_reference(mask, lead, H, V, k, dtype, seed, backend, *, bias=True, scale=2.0, random_ids=False,
                             lp_dtype=torch.float32, chunk_size=None, use_token_weights=False, **options):
    device = _device(backend)
    (sh, sw, sb), ids, a, y, _ = _problem(lead, H, V, k, dtype, seed, bias=bias, scale=scale, random_ids=random_ids,
                                          lp_dtype=lp_dtype, device=device)
    mask = mask.to(device)
    kw = dict(target_ids=y, epsilon=1e-4, delta=0.25, coef=0.7, **options)
    if use_token_weights:
        kw["token_weights"] = torch.rand(lead, generator=torch.Generator().manual_seed(seed + 2)).to(device)
    leaves = [x.detach().requires_grad_() for x in (sh, sw) + ((sb,) if bias else ())]
    stats = fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, mask, student_bias=leaves[2] if bias else None,
                                  return_stats=True, backend=backend, chunk_size=chunk_size, **kw)
    assert isinstance(stats, SODStats)
    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in leaves]
    cpu = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    ref_loss, ref = ref_sparse_sod_loss(ref_leaves[0], ref_leaves[1], ids.cpu(), a.cpu(), mask.cpu(),
                                        student_bias=ref_leaves[2] if bias else None,
                                        **{**cpu, "step_divergence": cpu.get("step_divergence") or
                                           ("none" if use_token_weights else "kl")})
    rtol = LOSS_RTOL[dtype]
    want_D = ref["token_divergence"].detach()
    assert torch.allclose(stats.token_divergence.double().cpu(), want_D.clamp(min=0), rtol=rtol * 10, atol=D_ATOL)
    got_d, got_w, got_k = stats.step_divergence.cpu(), stats.step_weights.cpu(), stats.num_steps.cpu()
    ref_d, ref_w, ref_k = ref["step_divergence"], ref["step_weights"], ref["num_steps"]
    if len(lead) == 1:
        got_d, got_w, got_k = got_d[None], got_w[None], got_k[None]
        ref_d, ref_w, ref_k = [ref_d], [ref_w], [ref_k]
    assert got_k.tolist() == list(ref_k)
    width = got_d.shape[-1]
    assert torch.allclose(got_d.double(), _padded(ref_d, width), rtol=rtol * 10, atol=D_ATOL)
    # w_k = min((d_1 + eps) / (d_k + eps), 1 + delta): an absolute error e of the d's is a relative error of up
    # to e (1 / (d_1 + eps) + 1 / (d_k + eps)) of w_k (the method's conditioning).
    eps = kw["epsilon"]
    sensitivity = [[D_ATOL * (1 / (row[0] + eps) + 1 / (d + eps)) for d in row] for row in ref_d]
    allowed = (rtol * 10 + _padded(sensitivity, width)) * _padded(ref_w, width) + 1e-12
    if not use_token_weights:
        assert ((got_w.double() - _padded(ref_w, width)).abs() <= allowed).all()

    # The loss and its gradients against the reference given the kernel's weights (constants).
    weights = stats.token_weights.detach().double().cpu()
    per_token = kw["coef"] * weights * ref["token_divergence"]
    normalizer = max(int((mask != 0).sum()), 1)
    reduce = {"none": lambda x: x, "sum": torch.sum, "token_mean": lambda x: x.sum() / normalizer}
    want_loss = reduce[options["reduction"]](per_token)
    divisor = normalizer if options["reduction"] == "token_mean" else 1
    floor = D_ATOL * kw["coef"] * float(weights.sum()) / divisor
    loss = stats.loss
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(loss.detach().double().cpu(), want_loss.detach(), rtol=rtol, atol=max(floor, 1e-12))
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.5
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    (want_loss * upstream).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert got.grad is not None and got.grad.dtype == dtype and got.grad.shape == got.shape
        want_grad = torch.zeros_like(want) if want.grad is None else want.grad
        # A 16-bit gradient below the dtype's normal range has only absolute precision (its subnormal spacing),
        # and a gradient that is small because its O(|input|) terms cancel (saturated rows) has only the dtype's
        # rounding of those terms: the allowance is relative for normal values plus, per entry, the larger of one
        # smallest-normal and one rounding unit of the largest input entry.
        diff = float((got.grad.detach().double().cpu() - want_grad.detach().double()).norm())
        unit = max(torch.finfo(dtype).tiny, torch.finfo(dtype).eps * max((float(x.detach().abs().max()) for x in leaves if x.numel()), default=0.0))
        allowed = GRAD_RTOL[dtype] * float(want_grad.norm()) + unit * want_grad.numel() ** 0.5
        assert _rel_err(got.grad, want_grad) < GRAD_RTOL[dtype] or diff <= allowed, \
            (_rel_err(got.grad, want_grad), diff, allowed, dtype)
    return stats


_SETTINGS = dict(mask=step_masks(max_rows=3, max_len=12, max_steps=4), single=st.booleans(), H=st.integers(1, 24),
                 V=st.integers(2, 120), k_frac=st.floats(0.0, 1.0), random_ids=st.booleans(),
                 divergence=st.sampled_from(["reverse_kl", "forward_kl"]),
                 step_divergence=st.sampled_from(["kl", "sampled", "none", "token_weights"]),
                 reduction=st.sampled_from(["token_mean", "sum", "none"]), temperature=st.sampled_from([1.0, 0.6, 1.7]),
                 bias=st.booleans(), scale=st.sampled_from([0.5, 2.0, 6.0]),
                 lp_dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16]),
                 chunk_size=st.sampled_from([None, 1, 3, 7]), seed=st.integers(0, 2**31 - 2))


def _run_property(backend, dtype, mask, single, H, V, k_frac, random_ids, divergence, step_divergence, reduction,
                  temperature, bias, scale, lp_dtype, chunk_size, seed):
    if single:
        mask = mask[:1] if mask.shape[0] else torch.zeros(1, mask.shape[1], dtype=mask.dtype)
    lead = (mask.shape[1],) if single else tuple(mask.shape)
    k = max(1, min(V, round(k_frac * V)))
    tw = step_divergence == "token_weights"
    _check_against_reference(mask[0] if single else mask, lead, H, V, k, dtype, seed, backend, bias=bias, scale=scale,
                             random_ids=random_ids, lp_dtype=lp_dtype, chunk_size=chunk_size, use_token_weights=tw,
                             divergence=divergence, step_divergence=None if tw else step_divergence,
                             reduction=reduction, temperature=temperature)


@settings(max_examples=30)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), **_SETTINGS)
def test_triton_backend_matches_reference(dtype, **kw):
    _run_property("triton", dtype, **kw)


@settings(max_examples=40)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), **_SETTINGS)
def test_torch_backend_matches_reference(dtype, **kw):
    _run_property("torch", dtype, **kw)


# ------------------------------------------------------------------------------- facts about the divergence
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_every_id_listed_equals_the_dense_loss(backend, divergence):
    """k = V (the ids are a permutation of the vocabulary): the loss and gradients of fused_sod_loss."""
    device = _device(backend)
    B, T, Hs, Ht, V = 2, 9, 13, 11, 41
    g = torch.Generator().manual_seed(7)
    sh, th = torch.randn(B, T, Hs, generator=g), torch.randn(B, T, Ht, generator=g)
    sw, tw = torch.randn(V, Hs, generator=g) * 0.8, torch.randn(V, Ht, generator=g) * 0.8
    sb = torch.randn(V, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 0, 0, 1, 1, 0]])
    y = torch.randint(0, V, (B, T), generator=g)
    tau = 0.8
    full = torch.log_softmax((th.double() @ tw.double().T) / tau, dim=-1)
    ids = torch.rand(B, T, V, generator=g).argsort(dim=-1)
    a = full.gather(-1, ids).float()
    on = lambda x: x.to(device)  # noqa: E731
    results = []
    for sparse in (True, False):
        h, w, b = (x.clone().to(device).requires_grad_() for x in (sh, sw, sb))
        common = dict(target_ids=on(y), divergence=divergence, step_divergence="sampled", temperature=tau,
                      student_bias=b, backend=backend, return_stats=True)
        if sparse:
            stats = fused_sparse_sod_loss(h, w, on(ids), on(a), on(mask), **common)
        else:
            stats = fused_sod_loss(h, w, on(th), on(tw), on(mask), **common)
        stats.loss.backward()
        results.append((stats, h.grad, w.grad, b.grad))
    (s, *gs), (d, *gd) = results
    assert torch.allclose(s.loss, d.loss, rtol=1e-5, atol=1e-7)
    assert torch.allclose(s.token_divergence, d.token_divergence, rtol=1e-5, atol=D_ATOL)
    assert torch.allclose(s.step_weights, d.step_weights, rtol=1e-4, atol=1e-6)
    for x, z in zip(gs, gd):
        assert _rel_err(x, z) < 1e-4


# Excess of the sparse KL over the full one allowed by the rounding of the teacher's log-probs: float64 log-probs
# give the teacher's tail to ~1e-16; float32 ones only to the teacher floor (~5e-7), which a tail just above
# it can miss by a fraction of itself (measured worst case over 800 random teachers: 1.5e-4 nats).
NEVER_ABOVE_SLACK = {torch.float64: 1e-5, torch.float32: 1e-3}


@settings(max_examples=25)
@given(n=st.integers(1, 12), V=st.integers(3, 150), k_frac=st.floats(0.0, 0.95), random_ids=st.booleans(),
       divergence=st.sampled_from(["reverse_kl", "forward_kl"]), scale=st.sampled_from([0.5, 2.0, 8.0, 16.0]),
       lp_dtype=st.sampled_from([torch.float64, torch.float32]), backend=st.sampled_from(BACKENDS),
       seed=st.integers(0, 2**31 - 2))
def test_sparse_kl_is_never_above_the_full_kl(n, V, k_frac, random_ids, divergence, scale, lp_dtype, backend, seed):
    """Coarse-graining never increases a KL divergence (data processing), for any choice of ids, up to the
    rounding of the teacher's log-probs (confident teachers whose listed mass rounds to 1 included)."""
    k = max(1, min(V - 1, round(k_frac * V)))
    (sh, sw, _), ids, a, _, full = _problem((n,), 9, V, k, torch.float32, seed, bias=False, scale=scale,
                                            random_ids=random_ids, lp_dtype=lp_dtype, device=_device(backend))
    stats = fused_sparse_sod_loss(sh, sw, ids, a, torch.ones(n, dtype=torch.int64, device=sh.device),
                                  divergence=divergence, backend=backend, return_stats=True)
    logp_s = torch.log_softmax(sh.double().cpu() @ sw.double().cpu().T, dim=-1)
    if divergence == "reverse_kl":
        dense = (logp_s.exp() * (logp_s - full)).sum(-1)
    else:
        dense = (full.exp() * (full - logp_s)).sum(-1)
    sparse = stats.token_divergence.double().cpu()
    assert (sparse <= dense * (1 + 1e-5) + NEVER_ABOVE_SLACK[lp_dtype]).all(), (sparse - dense).max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_tail_masses_at_the_floor(backend, divergence):
    """A teacher whose listed ids hold all its mass (P = 0) and a student whose tail underflows (Q ~ e^-60):
    finite, and equal to the reference with the documented floor, gradients included."""
    device = _device(backend)
    n, H, V, k = 6, 5, 23, 4
    g = torch.Generator().manual_seed(3)
    h = torch.randn(n, H, generator=g)
    w = torch.randn(V, H, generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(n)])
    a = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64), dim=-1).float()  # sum exp = 1
    bias = torch.zeros(V)
    bias[ids[:3].reshape(-1)] = 60.0  # rows 0-2: the student's mass is on (some of) the ids
    leaves = [x.clone().to(device).requires_grad_() for x in (h, w, bias)]
    loss = fused_sparse_sod_loss(leaves[0], leaves[1], ids.to(device), a.to(device),
                                 torch.ones(n, dtype=torch.int64, device=device), student_bias=leaves[2],
                                 divergence=divergence, step_divergence="none", reduction="sum", backend=backend)
    loss.backward()
    ref_leaves = [x.double().requires_grad_() for x in (h, w, bias)]
    want = ref_sparse_token_divergence(ref_leaves[0], ref_leaves[1], ids, a, student_bias=ref_leaves[2],
                                       divergence=divergence).sum()
    want.backward()
    assert torch.isfinite(loss) and float(loss) > 0
    assert torch.allclose(loss.double().cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in zip(leaves, ref_leaves):
        assert _rel_err(got.grad, ref.grad) < 1e-4
    assert TAIL_FLOOR == 1e-12
    assert teacher_tail_floor(20, torch.float32) == pytest.approx(4.76e-7, rel=1e-3)
    assert teacher_tail_floor(20, torch.float64) == TAIL_FLOOR
    assert teacher_tail_floor(20, torch.bfloat16) == pytest.approx(0.031, rel=0.02)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("case", ["offset", "one_hot"])
def test_large_logits_gradient_is_no_worse_than_fp32_logits(backend, divergence, case):
    """Logits of magnitude ~1e4: a common offset of 1e4 on O(1) logits, or near one-hot softmaxes facing a
    teacher that disagrees.  The loss and gradient are no worse than the materialized float32 computation's
    (both against float64), and the gradient is not zero."""
    device = _device(backend)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 16, dtype=torch.int64)
    mask[:, ::2] = 0
    sh = torch.randn(4, 16, 16, generator=g)
    if case == "offset":
        sw, sb = torch.randn(64, 16, generator=g) * 0.75, 1e4 + torch.randn(64, generator=g)
    else:
        sh, sw, sb = sh * 1e4, torch.randn(64, 16, generator=g) / 8, torch.zeros(64)
    student = torch.log_softmax(sh.double() @ sw.double().T + sb.double(), dim=-1)
    teacher = torch.log_softmax(2 * torch.randn(4, 16, 64, generator=g, dtype=torch.float64), dim=-1)
    ids = torch.cat([student.topk(2, dim=-1).indices, teacher.topk(6, dim=-1).indices], dim=-1)
    ids = torch.stack([torch.stack([row.unique(sorted=False)[:5] for row in seq]) for seq in ids])
    a = teacher.gather(-1, ids).float()
    ref_w = sw.double().requires_grad_()
    ref, _ = ref_sparse_sod_loss(sh.double(), ref_w, ids, a, mask, student_bias=sb.double(), divergence=divergence)
    ref.backward()
    naive_w = sw.clone().requires_grad_()
    naive, _ = ref_sparse_sod_loss(sh, naive_w, ids, a, mask, student_bias=sb, divergence=divergence)
    naive.backward()
    w = sw.to(device).requires_grad_()
    loss = fused_sparse_sod_loss(sh.to(device), w, ids.to(device), a.to(device), mask.to(device),
                                 student_bias=sb.to(device), divergence=divergence, backend=backend)
    loss.backward()
    assert abs(float(loss) - float(ref)) <= 10 * abs(float(naive) - float(ref)) + 1e-5 * abs(float(ref))
    ref_norm = float(ref_w.grad.norm())
    assert case == "one_hot" and divergence == "reverse_kl" or ref_norm > 1e-3  # p_s-weighted: ~0 when one-hot
    err = float((w.grad.cpu().double() - ref_w.grad).norm())
    naive_err = float((naive_w.grad.double() - ref_w.grad).norm())
    assert err <= 10 * naive_err + 1e-5 * ref_norm + 1e-9, (err, naive_err, ref_norm)


# --------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["token_mean", "sum", "none"])
def test_empty_and_fully_masked_batches_give_exact_zeros(backend, reduction):
    device = _device(backend)
    for lead in ((0, 5), (2, 6)):
        (sh, sw, sb), ids, a, y, _ = _problem(lead, 7, 30, 4, torch.float32, seed=1, device=device)
        leaves = [x.requires_grad_() for x in (sh, sw, sb)]
        loss = fused_sparse_sod_loss(sh, sw, ids, a, torch.zeros(lead, dtype=torch.int64, device=device),
                                     target_ids=y, student_bias=sb, reduction=reduction, backend=backend)
        assert torch.isfinite(loss).all() and not loss.detach().any()
        loss.sum().backward()
        for leaf in leaves:
            assert leaf.grad is not None and not leaf.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_outside_the_steps_are_never_read(backend):
    """Padding ids / log-probs (out of range, repeated, positive) outside the mask change nothing."""
    device = _device(backend)
    mask = torch.tensor([[1, 1, 0, 1, 0]], device=device)
    (sh, sw, _), ids, a, _, _ = _problem((1, 5), 6, 25, 3, torch.float32, seed=4, bias=False, device=device)
    base = fused_sparse_sod_loss(sh, sw, ids, a, mask, backend=backend)
    ids2, a2 = ids.clone(), a.clone()
    ids2[0, 2] = torch.tensor([-5, 99, 99])
    a2[0, 4] = 3.0
    assert torch.equal(base, fused_sparse_sod_loss(sh, sw, ids2, a2, mask, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_above_zero_within_rounding_read_as_zero(backend):
    device = _device(backend)
    (sh, sw, _), _, _, _, _ = _problem((3,), 4, 10, 2, torch.float32, seed=5, bias=False, device=device)
    ids = torch.tensor([[1, 2]] * 3, device=device)
    a = torch.tensor([[0.0, -30.0]] * 3, device=device)
    mask = torch.ones(3, dtype=torch.int64, device=device)
    base = fused_sparse_sod_loss(sh, sw, ids, a, mask, backend=backend)
    nudged = fused_sparse_sod_loss(sh, sw, ids, a + torch.tensor([5e-5, 0.0], device=device), mask, backend=backend)
    assert torch.equal(base, nudged)
    assert logprob_tolerance(2, torch.float32) > 5e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_sequence_and_step_ids_inputs_agree(backend):
    device = _device(backend)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1], device=device)
    (sh, sw, sb), ids, a, y, _ = _problem((9,), 8, 33, 5, torch.float32, seed=6, device=device)
    from sod_kernels import step_ids_from_mask
    one = fused_sparse_sod_loss(sh, sw, ids, a, mask, target_ids=y, student_bias=sb, step_divergence="sampled",
                                backend=backend, return_stats=True)
    two = fused_sparse_sod_loss(sh[None], sw, ids[None], a[None], step_ids=step_ids_from_mask(mask[None]),
                                target_ids=y[None], student_bias=sb, step_divergence="sampled", backend=backend,
                                return_stats=True)
    assert torch.equal(one.loss, two.loss) and torch.equal(one.step_weights, two.step_weights[0])
    assert one.token_divergence.shape == (9,) and two.token_divergence.shape == (1, 9)


# ----------------------------------------------------------------------------------- execution contract
@pytest.mark.parametrize("case", ["token_weights", "none", "kl", "sampled"])
def test_single_pass_runs_when_the_weights_are_known_in_pass(case, monkeypatch):
    calls = []
    real = sparse_triton.single_pass_loss
    monkeypatch.setattr(sparse_triton, "single_pass_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    lead = (2, 11)
    (sh, sw, sb), ids, a, y, _ = _problem(lead, 9, 47, 6, torch.float32, seed=8, device=DEVICE)
    mask = (torch.rand(lead, generator=torch.Generator().manual_seed(0)) > 0.3).long().to(DEVICE)
    kw = {"token_weights": torch.rand(lead, device=DEVICE)} if case == "token_weights" else {"step_divergence": case}
    grads = []
    for reduction in ("sum", "none"):
        h = sh.detach().clone().requires_grad_()
        loss = fused_sparse_sod_loss(h, sw, ids, a, mask, target_ids=y, student_bias=sb, backend="triton",
                                     reduction=reduction, **kw)
        loss.sum().backward()
        grads.append((loss.sum().detach(), h.grad))
        assert bool(calls) == (reduction == "sum")
        calls.clear()
    (l1, g1), (l2, g2) = grads
    assert torch.allclose(l1, l2, rtol=1e-6, atol=1e-7) and _rel_err(g1, g2) < 1e-5


def test_steps_longer_than_a_chunk_use_two_passes(monkeypatch):
    calls = []
    real = sparse_triton.single_pass_loss
    monkeypatch.setattr(sparse_triton, "single_pass_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    (sh, sw, _), ids, a, _, _ = _problem((2, 10), 6, 29, 3, torch.float32, seed=9, bias=False, device=DEVICE)
    mask = torch.ones(2, 10, dtype=torch.int64, device=DEVICE)
    h = sh.detach().requires_grad_()
    fused_sparse_sod_loss(h, sw, ids, a, mask, backend="triton", chunk_size=4).backward()
    assert not calls
    g4, h.grad = h.grad.clone(), None
    fused_sparse_sod_loss(h, sw, ids, a, mask, backend="triton", chunk_size=10).backward()
    assert calls and _rel_err(g4, h.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend):
    device = _device(backend)
    (sh, sw, sb), ids, a, y, _ = _problem((2, 8), 10, 37, 5, torch.float32, seed=10, device=device)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1], [0, 1, 1, 1, 1, 0, 1, 1]], device=device)
    runs = []
    for _ in range(2):
        leaves = [x.detach().clone().requires_grad_() for x in (sh, sw, sb)]
        loss = fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, mask, student_bias=leaves[2], backend=backend,
                                     chunk_size=5)
        loss.backward()
        runs.append([loss.detach()] + [x.grad for x in leaves])
    for x, z in zip(*runs):
        assert torch.equal(x, z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend):
    device = _device(backend)
    (sh, sw, _), ids, a, _, _ = _problem((6,), 5, 20, 3, torch.float32, seed=11, bias=False, device=device)
    h = sh.requires_grad_()
    loss = fused_sparse_sod_loss(h, sw, ids, a, torch.ones(6, dtype=torch.int64, device=device), backend=backend)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_changes_nothing(backend):
    device = _device(backend)
    (sh, sw, sb), ids, a, _, _ = _problem((7,), 6, 31, 4, torch.float32, seed=12, device=device)
    mask = torch.ones(7, dtype=torch.int64, device=device)
    outside = fused_sparse_sod_loss(sh, sw, ids, a, mask, student_bias=sb, backend=backend)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        inside = fused_sparse_sod_loss(sh, sw, ids, a, mask, student_bias=sb, backend=backend)
    assert torch.equal(outside, inside)


class _RecordSizes(TorchDispatchMode):
    """The size in bytes of every tensor an op produces while active."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel() * t.element_size()))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_nothing_of_size_tokens_x_vocabulary_is_allocated(backend, reduction):
    """N = 64, V = 480, H = 6, k = 16: N x V = 30720 entries, more than all inputs and gradients together; with
    6-row chunks (the gradient blocks of two chunks sit side by side) no tensor made in forward + backward
    reaches a quarter of an N x V float32 block."""
    device = _device(backend)
    N, H, V, k = 64, 6, 480, 16
    (sh, sw, sb), ids, a, y, _ = _problem((N,), H, V, k, torch.float32, seed=13, device=device)
    mask = (torch.arange(N, device=device) % 5 != 0).long()
    leaves = [x.requires_grad_() for x in (sh, sw, sb)]
    recorder = _RecordSizes()
    with recorder:
        loss = fused_sparse_sod_loss(sh, sw, ids, a, mask, target_ids=y, student_bias=sb, step_divergence="sampled",
                                     backend=backend, reduction=reduction, chunk_size=6)
        loss.sum().backward()
    assert all(leaf.grad is not None for leaf in leaves)
    largest = max(recorder.sizes, key=lambda item: item[1])
    assert largest[1] < N * V * 4 // 4, largest


# ------------------------------------------------------------------------------------------- validation
def _valid(device="cpu"):
    (sh, sw, sb), ids, a, y, _ = _problem((2, 4), 5, 12, 3, torch.float32, seed=14, device=device)
    return dict(student_hidden=sh, student_weight=sw, teacher_topk_ids=ids, teacher_topk_logprobs=a,
                response_mask=torch.ones(2, 4, dtype=torch.int64), target_ids=y, student_bias=sb)


def _with(**changes):
    def make():
        kw = _valid()
        for key, value in changes.items():
            kw[key] = value(kw) if callable(value) else value
        return kw
    return make


def _set(name, index, value):
    def change(kw):
        x = kw[name].clone()
        x[index] = value
        return x
    return change


BAD_INPUTS = [
    ("float ids", _with(teacher_topk_ids=lambda kw: kw["teacher_topk_ids"].float()), TypeError, "teacher_topk_ids"),
    ("integer logprobs", _with(teacher_topk_logprobs=lambda kw: kw["teacher_topk_ids"]), TypeError,
     "teacher_topk_logprobs"),
    ("ids leading shape", _with(teacher_topk_ids=lambda kw: kw["teacher_topk_ids"][:, :3]), ValueError,
     "teacher_topk_ids"),
    ("ids rank", _with(teacher_topk_ids=lambda kw: kw["teacher_topk_ids"][..., 0]), ValueError, "teacher_topk_ids"),
    ("k = 0", _with(teacher_topk_ids=lambda kw: kw["teacher_topk_ids"][..., :0],
                    teacher_topk_logprobs=lambda kw: kw["teacher_topk_logprobs"][..., :0]), ValueError, "k = 0"),
    ("k > V", _with(teacher_topk_ids=torch.arange(13).expand(2, 4, 13),
                    teacher_topk_logprobs=torch.full((2, 4, 13), -3.0)), ValueError, "more than the student vocabulary"),
    ("logprob shape", _with(teacher_topk_logprobs=lambda kw: kw["teacher_topk_logprobs"][..., :2]), ValueError,
     "teacher_topk_logprobs"),
    ("negative id", _with(teacher_topk_ids=_set("teacher_topk_ids", (1, 2, 0), -1)), ValueError, r"\[0, 12\)"),
    ("id = V", _with(teacher_topk_ids=_set("teacher_topk_ids", (0, 0, 2), 12)), ValueError, r"\[0, 12\)"),
    ("repeated id", _with(teacher_topk_ids=lambda kw: torch.tensor([3, 5, 3]).expand(2, 4, 3)), ValueError,
     "repeat"),
    ("positive logprob", _with(teacher_topk_logprobs=_set("teacher_topk_logprobs", (0, 1, 1), 0.5)), ValueError,
     "<= 0"),
    ("exp-sum above 1", _with(teacher_topk_logprobs=torch.full((2, 4, 3), math.log(0.4))), ValueError, "sum to more"),
    ("nan logprob", _with(teacher_topk_logprobs=_set("teacher_topk_logprobs", (1, 1, 0), float("nan"))), ValueError,
     "finite"),
    ("-inf logprob", _with(teacher_topk_logprobs=_set("teacher_topk_logprobs", (1, 1, 0), float("-inf"))),
     ValueError, "finite"),
    ("target out of range", _with(target_ids=_set("target_ids", (0, 0), 12)), ValueError, "target_ids"),
    ("hidden size", _with(student_weight=lambda kw: kw["student_weight"][:, :4]), ValueError, "student_hidden"),
    ("mask values", _with(response_mask=torch.full((2, 4), 2)), ValueError, "response_mask"),
    ("ids on another device", _with(teacher_topk_ids=lambda kw: kw["teacher_topk_ids"].to("meta")), ValueError,
     "same device"),
]


@pytest.mark.parametrize("name,make,error,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(name, make, error, match):
    with pytest.raises(error, match=match):
        fused_sparse_sod_loss(**make(), backend="torch")


@pytest.mark.parametrize("options,match", [
    ({"step_divergence": "sampled", "target_ids": None}, "needs target_ids"),
    ({"token_weights": torch.ones(2, 4), "step_divergence": "kl"}, "token_weights"),
    ({"divergence": "js"}, "divergence"), ({"reduction": "mean"}, "reduction"), ({"temperature": 0.0}, "temperature"),
    ({"epsilon": 0.0}, "epsilon"), ({"chunk_size": 0}, "chunk_size"), ({"backend": "cuda"}, "backend"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        fused_sparse_sod_loss(**{**_valid(), "backend": "torch", **options})


def test_float64_on_the_triton_backend_points_to_torch():
    kw = _valid(DEVICE)
    kw = {key: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v.to(DEVICE))
          for key, v in kw.items()}
    kw["teacher_topk_logprobs"] = kw["teacher_topk_logprobs"].float()
    with pytest.raises(TypeError, match="backend='torch'"):
        fused_sparse_sod_loss(**kw, backend="triton")


# ----------------------------------------------------------------------------------------------- docs
def test_docs_example_runs_and_prints_what_it_says(capsys):
    text = (ROOT / "docs" / "sparse_teacher.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks
    namespace: dict = {"__name__": "sparse_teacher_doc"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/sparse_teacher.md block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", out)]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], out
    assert "teacher ids (4, 24, 8) log-probs (4, 24, 8)" in out
    match = re.search(r"k = (\d+) of V = (\d+): sparse KL ([\d.]+) <= full KL ([\d.]+)", out)
    assert match is not None, out
    assert float(match.group(3)) <= float(match.group(4)) + 1e-6
    assert namespace["ids"].shape[-1] == int(match.group(1))


# ------------------------------------------------------------------------------------------ benchmark
def test_benchmark_compares_the_same_loss_and_its_error_study_is_sound():
    """benchmarks/sparse.py's materialized baseline is this loss (value and gradients), and its error study
    reports non-negative errors that vanish when k = V."""
    from benchmarks import sparse as bench

    size = {"N": 48, "V": 90, "Hs": 12, "Ht": 10, "dtype": "float32"}
    inputs, ids, logprobs = bench.build_case(size, 7, "cpu", seed=3)
    sh, sw, steps = inputs.student_hidden, inputs.student_weight, inputs.step_ids
    for divergence in ("reverse_kl", "forward_kl"):
        inputs.zero_grads()
        fused_sparse_sod_loss(sh, sw, ids, logprobs, step_ids=steps[0], divergence=divergence).backward()
        fused = (sh.grad.clone(), sw.grad.clone())
        inputs.zero_grads()
        bench.naive_sparse_loss(sh, sw, ids, logprobs, steps, divergence).backward()
        assert _rel_err(fused[0], sh.grad) < 1e-4 and _rel_err(fused[1], sw.grad) < 1e-4
    rows = bench.error_vs_k({"N": 40, "V": 50, "Hs": 8, "Ht": 8}, (1, 5, 50))
    assert len(rows) == 6
    for r in rows:
        assert r["kl_relative_error"] >= -1e-5 and r["kl_sparse"] > 0
        if r["k"] == 50:
            assert abs(r["kl_relative_error"]) < 1e-5 and r["grad_relative_error"] < 1e-4
    assert rows[0]["kl_relative_error"] > rows[1]["kl_relative_error"]
