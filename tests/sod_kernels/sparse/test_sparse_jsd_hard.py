"""fused_sparse_sod_loss with divergence="jsd" (generalized JSD over the k + 1 coarse-grained cells) and the
hard-label term (hard_loss_weight), on both backends and both paths (single pass, two passes), against the
float64 reference (reference/sparse_reference.py).

The Triton backend runs under the interpreter without CUDA (conftest) at tiny sizes; the torch backend runs on
the CPU.  Tolerances follow tests/sod_kernels/sparse/test_sparse_teacher.py (float32: 1e-5 on the loss, 1e-4 on
gradients; bfloat16: 2e-2 on gradients).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import ref_sparse_sod_loss, ref_sparse_token_divergence
from reference.sod_reference import ref_jsd
from sod_kernels import fused_sparse_sod_loss
from sod_kernels.sparse import triton_backend as sparse_triton
from sod_kernels.sparse.rows import coarse_grained_rows
from tests.conftest import HAS_CUDA
from tests.helpers import step_masks

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["torch", "triton"]
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float64: 1e-10}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float64: 1e-9}
D_ATOL = 2e-6

# Masks [2, 9]: several steps per row, one step per row (a single response span), and nothing distilled.
MANY_STEPS = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0, 1], [1, 1, 1, 0, 0, 1, 1, 0, 1]])
ONE_STEP = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
NOTHING = torch.zeros(2, 9, dtype=torch.int64)


def _device(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


def _problem(lead, H, V, k, dtype, seed, *, bias=True, random_ids=False, target="mixed", device="cpu"):
    """``((hidden, weight, bias), ids, logprobs (float32), target_ids)``; ``target``: ``"listed"`` (every sampled
    token among the ids), ``"unlisted"`` (none; needs k < V) or ``"mixed"``."""
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    sw = torch.randn(V, H, generator=g, dtype=torch.float64) * 2.0 / H ** 0.5
    sb = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    logp = torch.log_softmax(torch.randn(*lead, V, generator=g, dtype=torch.float64) * 2.0, dim=-1)
    ids = torch.rand(*lead, V, generator=g).argsort(-1)[..., :k] if random_ids else logp.topk(k, dim=-1).indices
    a = logp.gather(-1, ids).float()
    if target == "listed" or k == V:
        y = ids.gather(-1, torch.randint(0, k, (*lead, 1), generator=g)).squeeze(-1)
    else:
        listed = torch.zeros(*lead, V, dtype=torch.bool).scatter(-1, ids, True)
        y = torch.rand(*lead, V, generator=g).masked_fill(listed, -1.0).argmax(-1)  # a random unlisted id
        if target == "mixed":
            y = torch.where(torch.rand(lead, generator=g) < 0.5, ids[..., 0], y)
    cast = lambda x: None if x is None else x.to(dtype).to(device)  # noqa: E731
    return [cast(x) for x in (sh, sw, sb)], ids.to(device), a.to(device), y.to(device)


def _rel_err(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    norm = float(ref.norm())
    return float((got - ref).norm()) if norm < 1e-10 else float((got - ref).norm()) / norm


def _check(backend, dtype=torch.float32, *, mask=MANY_STEPS, single=False, H=5, V=23, k=4, beta=0.25, hard=0.0,
           bias=True, random_ids=False, target="mixed", step_divergence=None, use_token_weights=False,
           reduction="token_mean", seed=0, **options):
    """The fused loss (stats, loss, gradients) against the float64 reference; the loss and gradients are compared
    given the fused weights (constants), the weights themselves against the reference's."""
    device = _device(backend)
    lead = (mask.shape[1],) if single else tuple(mask.shape)
    mask = mask[0] if single else mask
    (sh, sw, sb), ids, a, y = _problem(lead, H, V, k, dtype, seed, bias=bias, random_ids=random_ids, target=target,
                                       device=device)
    kw = dict(target_ids=y, epsilon=1e-4, delta=0.25, coef=0.7, divergence=options.pop("divergence", "jsd"),
              beta=beta, hard_loss_weight=hard, reduction=reduction, **options)
    if use_token_weights:
        kw["token_weights"] = torch.rand(lead, generator=torch.Generator().manual_seed(seed + 2)).to(device)
    else:
        kw["step_divergence"] = step_divergence
    leaves = [x.detach().requires_grad_() for x in (sh, sw) + ((sb,) if bias else ())]
    stats = fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, mask.to(device),
                                  student_bias=leaves[2] if bias else None, return_stats=True, backend=backend, **kw)
    cpu = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()
           if key not in ("memory", "chunk_size")}
    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in leaves]
    common = dict(student_bias=ref_leaves[2] if bias else None)
    # The reference's own step weights (the step statistics it reports are checked against the fused ones).
    _, ref = ref_sparse_sod_loss(*ref_leaves[:2], ids.cpu(), a.cpu(), mask, **common,
                                 **{**cpu, "step_divergence": step_divergence or ("none" if use_token_weights else
                                                                                  "kl")})
    rtol = LOSS_RTOL[dtype]
    want_D = ref["token_divergence"].detach()
    assert torch.allclose(stats.token_divergence.double().cpu(), want_D.clamp(min=0), rtol=rtol * 10, atol=D_ATOL)
    if not use_token_weights:
        got_w = stats.token_weights.double().cpu()
        want_w = ref["token_weights"].detach().double()
        assert torch.allclose(got_w, want_w, rtol=1e-3 if dtype != torch.float64 else 1e-9, atol=1e-6)
    # The loss and gradients given the fused weights: token_weights replaces the step weights in the reference.
    weights = stats.token_weights.detach().double().cpu()
    ref_kw = {**cpu, "token_weights": weights, "step_divergence": "none"}
    want_loss, _ = ref_sparse_sod_loss(*ref_leaves[:2], ids.cpu(), a.cpu(), mask, **common, **ref_kw)
    loss = stats.loss
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(loss.detach().double().cpu(), want_loss.detach(), rtol=rtol, atol=1e-6 * (rtol > 1e-9))
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.5
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    (want_loss * upstream).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert got.grad is not None and got.grad.dtype == dtype and got.grad.shape == got.shape
        want_grad = torch.zeros_like(want) if want.grad is None else want.grad
        assert _rel_err(got.grad, want_grad) < GRAD_RTOL[dtype], (_rel_err(got.grad, want_grad), dtype)
    return stats


# --------------------------------------------------------------------------------- against the reference
CASES = {
    # name: options of _check
    "jsd beta=0.25 k<V steps": dict(beta=0.25, temperature=0.7),
    "jsd beta=0.6 k<V softcap sum": dict(beta=0.6, student_softcap=2.5, reduction="sum"),
    "jsd beta=0.6 k=V": dict(beta=0.6, V=13, k=13, temperature=1.3),
    "jsd one step per row": dict(beta=0.6, mask=ONE_STEP, random_ids=True),
    "jsd sampled": dict(beta=0.25, step_divergence="sampled", temperature=1.4),
    "jsd none reduction none": dict(beta=0.6, step_divergence="none", reduction="none"),
    "jsd token_weights no bias": dict(beta=0.25, use_token_weights=True, bias=False),
    "jsd single sequence": dict(beta=0.6, single=True, step_divergence="none"),
    "hard + jsd softcap tau": dict(beta=0.6, hard=0.5, student_softcap=3.0, temperature=0.8),
    "hard + jsd k=V sum": dict(beta=0.25, hard=1.0, V=11, k=11, reduction="sum"),
    "hard + reverse_kl reduction none": dict(divergence="reverse_kl", hard=0.3, reduction="none"),
    "hard + forward_kl sampled": dict(divergence="forward_kl", hard=0.8, step_divergence="sampled"),
    "hard + jsd token_weights": dict(beta=0.6, hard=0.4, use_token_weights=True, random_ids=True),
    "hard + jsd two passes (short chunks)": dict(beta=0.25, hard=0.6, chunk_size=2, mask=ONE_STEP),
    "hard + jsd memory low": dict(beta=0.6, hard=0.6, memory="low", student_softcap=3.0),
    "hard unlisted targets": dict(beta=0.6, hard=0.9, target="unlisted", step_divergence="none"),
    "hard listed targets": dict(beta=0.6, hard=0.9, target="listed", step_divergence="none", reduction="sum"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference_float32(backend, case):
    _check(backend, torch.float32, **CASES[case])


@pytest.mark.parametrize("case", ["jsd beta=0.6 k<V softcap sum", "hard + jsd softcap tau", "hard + jsd k=V sum",
                                  "hard + reverse_kl reduction none", "hard unlisted targets"])
def test_torch_backend_float64(case):
    _check("torch", torch.float64, **CASES[case])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["jsd beta=0.25 k<V steps", "hard + jsd softcap tau"])
def test_bfloat16_loosely(backend, case):
    _check(backend, torch.bfloat16, **CASES[case])


_PROPERTY = dict(mask=step_masks(max_rows=3, max_len=10, max_steps=4), single=st.booleans(), H=st.integers(1, 12),
                 V=st.integers(2, 60), k_frac=st.floats(0.0, 1.0), random_ids=st.booleans(),
                 beta=st.sampled_from([0.25, 0.6, 0.01, 0.97]), hard=st.sampled_from([0.0, 0.5]),
                 step_divergence=st.sampled_from(["kl", "sampled", "none", "token_weights"]),
                 reduction=st.sampled_from(["token_mean", "sum", "none"]), temperature=st.sampled_from([1.0, 0.6, 1.7]),
                 softcap=st.sampled_from([None, 3.0]), bias=st.booleans(), chunk_size=st.sampled_from([None, 1, 3]),
                 seed=st.integers(0, 2**31 - 2))


def _run_property(backend, mask, single, H, V, k_frac, random_ids, beta, hard, step_divergence, reduction,
                  temperature, softcap, bias, chunk_size, seed):
    if single:
        mask = mask[:1] if mask.shape[0] else torch.zeros(1, mask.shape[1], dtype=mask.dtype)
    tw = step_divergence == "token_weights"
    _check(backend, torch.float32, mask=mask, single=single, H=H, V=V, k=max(1, min(V, round(k_frac * V))),
           beta=beta, hard=hard, bias=bias, random_ids=random_ids, use_token_weights=tw,
           step_divergence=None if tw else step_divergence, reduction=reduction, seed=seed, temperature=temperature,
           student_softcap=softcap, chunk_size=chunk_size)


@settings(max_examples=12)
@given(**_PROPERTY)
def test_triton_backend_property(**kw):
    _run_property("triton", **kw)


@settings(max_examples=20)
@given(**_PROPERTY)
def test_torch_backend_property(**kw):
    _run_property("torch", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_jsd_is_never_above_the_full_jsd(backend):
    """The JSD is an f-divergence: coarse-graining onto the k + 1 cells never increases it (no floors involved)."""
    device = _device(backend)
    for V, k, seed in ((31, 1, 0), (31, 5, 1), (31, 30, 2), (12, 12, 3)):
        (sh, sw, _), ids, _, _ = _problem((8,), 6, V, k, torch.float32, seed, bias=False, random_ids=seed % 2 == 1,
                                          device=device)
        g = torch.Generator().manual_seed(seed + 7)
        full = torch.log_softmax(torch.randn(8, V, generator=g, dtype=torch.float64) * 3.0, dim=-1)
        a = full.gather(-1, ids.cpu())
        for beta in (0.25, 0.6):
            stats = fused_sparse_sod_loss(sh, sw, ids, a.to(device), torch.ones(8, dtype=torch.int64, device=device),
                                          divergence="jsd", beta=beta, backend=backend, return_stats=True)
            logp_s = torch.log_softmax(sh.double().cpu() @ sw.double().cpu().T, dim=-1)
            dense = ref_jsd(logp_s, full, beta)
            sparse = stats.token_divergence.double().cpu()
            assert (sparse <= dense * (1 + 1e-5) + 1e-6).all(), (sparse - dense).max()
            if k == V:
                assert torch.allclose(sparse, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_and_two_pass_agree(backend, monkeypatch):
    """The Triton single pass (reduction="sum") and the two-pass path (reduction="none", summed) give the same loss
    and gradients with the JSD and the hard term."""
    calls = []
    real = sparse_triton.single_pass_loss
    monkeypatch.setattr(sparse_triton, "single_pass_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    device = _device(backend)
    (sh, sw, sb), ids, a, y = _problem((2, 9), 6, 29, 5, torch.float32, seed=3, device=device)
    results = []
    for reduction in ("sum", "none"):
        h = sh.detach().clone().requires_grad_()
        loss = fused_sparse_sod_loss(h, sw, ids, a, MANY_STEPS.to(device), target_ids=y, student_bias=sb,
                                     divergence="jsd", beta=0.4, hard_loss_weight=0.7, student_softcap=3.0,
                                     backend=backend, reduction=reduction).sum()
        loss.backward()
        results.append((loss.detach(), h.grad))
        assert bool(calls) == (backend == "triton" and reduction == "sum")
        calls.clear()
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-6, atol=1e-6) and _rel_err(g1, g2) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only_call_gives_the_same_loss(backend):
    """Without gradients (torch.no_grad: two passes' forward only) the loss is the one the gradient path gives."""
    device = _device(backend)
    (sh, sw, sb), ids, a, y = _problem((2, 9), 6, 25, 4, torch.float32, seed=8, device=device)
    kw = dict(target_ids=y, student_bias=sb, divergence="jsd", beta=0.6, hard_loss_weight=0.9, student_softcap=3.0,
              backend=backend)
    with torch.no_grad():
        plain = fused_sparse_sod_loss(sh, sw, ids, a, MANY_STEPS.to(device), **kw)
    graded = fused_sparse_sod_loss(sh.detach().clone().requires_grad_(), sw, ids, a, MANY_STEPS.to(device), **kw)
    assert torch.allclose(plain, graded.detach(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta,kl", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_jsd_ends_are_exactly_the_kls(backend, beta, kl, reduction):
    """beta = 0 / 1 are the forward / reverse KL, bit for bit (loss and gradients), whatever the hard term."""
    device = _device(backend)
    (sh, sw, sb), ids, a, y = _problem((2, 9), 5, 21, 4, torch.float32, seed=4, device=device)
    runs = []
    for divergence in ("jsd", kl):
        leaves = [x.detach().clone().requires_grad_() for x in (sh, sw, sb)]
        loss = fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, MANY_STEPS.to(device), target_ids=y,
                                     student_bias=leaves[2], divergence=divergence, beta=beta, hard_loss_weight=0.3,
                                     backend=backend, reduction=reduction)
        loss.sum().backward()
        runs.append([loss.detach()] + [x.grad for x in leaves])
    for x, z in zip(*runs):
        assert torch.equal(x, z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_term_alone_is_the_cross_entropy(backend):
    """coef = 0: the loss is lambda times the mean student cross-entropy of the targets, listed or not, and its
    gradient that of the materialized cross-entropy."""
    device = _device(backend)
    for target in ("listed", "unlisted"):
        (sh, sw, sb), ids, a, y = _problem((2, 9), 5, 17, 3, torch.float32, seed=5, target=target, device=device)
        h = sh.detach().clone().requires_grad_()
        loss = fused_sparse_sod_loss(h, sw, ids, a, MANY_STEPS.to(device), target_ids=y, student_bias=sb,
                                     coef=0.0, hard_loss_weight=2.0, temperature=0.9, backend=backend)
        loss.backward()
        ref_h = sh.detach().double().cpu().requires_grad_()
        logp = torch.log_softmax((ref_h @ sw.double().cpu().T + sb.double().cpu()) / 0.9, dim=-1)
        nll = -logp.gather(-1, y.cpu()[..., None]).squeeze(-1)
        m = MANY_STEPS.bool()
        want = 2.0 * nll[m].sum() / m.sum()
        want.backward()
        assert abs(float(loss.detach()) - float(want.detach())) <= 1e-5 * abs(float(want.detach()))
        assert _rel_err(h.grad, ref_h.grad) < 1e-4


# ------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["token_mean", "sum", "none"])
def test_no_distilled_tokens_gives_exact_zeros(backend, reduction):
    device = _device(backend)
    (sh, sw, sb), ids, a, y = _problem((2, 9), 5, 19, 4, torch.float32, seed=6, device=device)
    leaves = [x.requires_grad_() for x in (sh, sw, sb)]
    loss = fused_sparse_sod_loss(sh, sw, ids, a, NOTHING.to(device), target_ids=y, student_bias=sb,
                                 divergence="jsd", beta=0.3, hard_loss_weight=0.5, reduction=reduction,
                                 backend=backend)
    assert torch.isfinite(loss).all() and not loss.detach().any()
    loss.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and not leaf.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_with_empty_tails_and_confident_students(backend):
    """A teacher whose listed ids hold all its mass (P = 0) and students whose tail underflows: finite, no floor
    needed, equal to the reference (gradients included)."""
    device = _device(backend)
    n, H, V, k = 6, 5, 23, 4
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(n, H, generator=g), torch.randn(V, H, generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(n)])
    a = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64), dim=-1).float()
    bias = torch.zeros(V)
    bias[ids[:3].reshape(-1)] = 60.0
    leaves = [x.clone().to(device).requires_grad_() for x in (h, w, bias)]
    loss = fused_sparse_sod_loss(leaves[0], leaves[1], ids.to(device), a.to(device),
                                 torch.ones(n, dtype=torch.int64, device=device), student_bias=leaves[2],
                                 divergence="jsd", beta=0.6, step_divergence="none", reduction="sum", backend=backend)
    loss.backward()
    ref_leaves = [x.double().requires_grad_() for x in (h, w, bias)]
    want = ref_sparse_token_divergence(ref_leaves[0], ref_leaves[1], ids, a, student_bias=ref_leaves[2],
                                       divergence="jsd", beta=0.6).sum()
    want.backward()
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    assert torch.allclose(loss.double().cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in zip(leaves, ref_leaves):
        assert _rel_err(got.grad, ref.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic_with_hard_term(backend):
    device = _device(backend)
    (sh, sw, sb), ids, a, y = _problem((2, 9), 6, 27, 4, torch.float32, seed=10, device=device)
    runs = []
    for _ in range(2):
        leaves = [x.detach().clone().requires_grad_() for x in (sh, sw, sb)]
        loss = fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, MANY_STEPS.to(device), target_ids=y,
                                     student_bias=leaves[2], divergence="jsd", beta=0.4, hard_loss_weight=0.5,
                                     backend=backend, chunk_size=5)
        loss.backward()
        runs.append([loss.detach()] + [x.grad for x in leaves])
    for x, z in zip(*runs):
        assert torch.equal(x, z)


def test_coarse_grained_rows_keeps_its_forward_kl_spelling():
    """The vocabulary-parallel loss calls ``coarse_grained_rows(..., forward_kl=...)``: unchanged, and equal to
    ``divergence=``; the JSD's cell probabilities are returned for the hard term."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, generator=g)
    lse_tail = torch.randn(4, generator=g) + 1.0
    a = torch.log_softmax(torch.randn(4, 6, generator=g), -1)[:, :3]
    for flag, name in ((True, "forward_kl"), (False, "reverse_kl")):
        old = coarse_grained_rows(z, lse_tail, a, forward_kl=flag, vocab=10)
        new = coarse_grained_rows(z, lse_tail, a, divergence=name, vocab=10)
        for x, y in zip(old, new):
            assert torch.equal(x, y) if x is not None else y is None
    t = coarse_grained_rows(z, lse_tail, a, divergence="jsd", beta=0.3, vocab=10)
    total = t.prob_ids.sum(1) + t.prob_tail
    assert torch.allclose(total, torch.ones_like(total), atol=1e-12)
    with pytest.raises(ValueError, match="beta"):
        coarse_grained_rows(z, lse_tail, a, divergence="jsd", beta=1.0, vocab=10)


# ------------------------------------------------------------------------------------------- validation
def _valid():
    (sh, sw, sb), ids, a, y = _problem((2, 4), 5, 12, 3, torch.float32, seed=14)
    return dict(student_hidden=sh, student_weight=sw, teacher_topk_ids=ids, teacher_topk_logprobs=a,
                response_mask=torch.ones(2, 4, dtype=torch.int64), target_ids=y, student_bias=sb, backend="torch")


@pytest.mark.parametrize("options,error,match", [
    ({"divergence": "jsd", "beta": -0.1}, ValueError, "beta"),
    ({"divergence": "jsd", "beta": 1.5}, ValueError, "beta"),
    ({"divergence": "jsd", "beta": math.nan}, ValueError, "beta"),
    ({"divergence": "jsd", "beta": "0.5"}, TypeError, "beta"),
    ({"divergence": "reverse_kl", "beta": 2.0}, ValueError, "beta"),
    ({"hard_loss_weight": 0.5, "target_ids": None}, ValueError, "target_ids"),
    ({"hard_loss_weight": -1.0}, ValueError, "hard_loss_weight"),
    ({"hard_loss_weight": math.inf}, ValueError, "hard_loss_weight"),
])
def test_bad_options_raise(options, error, match):
    with pytest.raises(error, match=match):
        fused_sparse_sod_loss(**{**_valid(), **options})
