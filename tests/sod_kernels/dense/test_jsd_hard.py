"""fused_sod_loss with divergence="jsd" (generalized Jensen-Shannon, ``beta``) and a hard-label term
(``hard_loss_weight``) on CPU tensors (SPEC section 14): the torch backend's two-pass tile sweeps
(``memory="low"``, ``reduction="none"``) and the CPU single pass (``memory="fast"``, compiled and eager
epilogues), against the float64 reference in reference/ (loss and the gradients of hidden, weight, bias).
The Triton backend is tested elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference import ref_fused_sod_loss
from reference.sod_reference import ref_token_divergence
from sod_kernels import fused_sod_loss
from sod_kernels.core import cpu_epilogue, tiles
from sod_kernels.dense import torch_backend
from tests.helpers import dense_cpu_paths, dense_problem, relative_error, step_masks


_problem, _rel, _Paths = dense_problem, relative_error, dense_cpu_paths


def _compare(mask, inputs, y, dtype, *, memory="fast", token_weights=None, chunk_size=None, upstream_seed=0,
             coef=0.7, **options):
    """fused_sod_loss against ref_fused_sod_loss in float64: the loss and the gradients of every student leaf
    (with a random upstream gradient for reduction="none")."""
    sh, sw, th, tw, sb, tb = inputs
    leaves = [x.detach().requires_grad_() for x in (sh, sw) + ((sb,) if sb is not None else ())]
    kw = dict(target_ids=y, epsilon=1e-4, delta=0.25, coef=coef, teacher_bias=tb, **options)
    loss = fused_sod_loss(leaves[0], leaves[1], th, tw, mask, student_bias=leaves[2] if sb is not None else None,
                          token_weights=token_weights, memory=memory, backend="torch", chunk_size=chunk_size, **kw)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_loss, _ = ref_fused_sod_loss(ref_leaves[0], ref_leaves[1], th.double(), tw.double(), mask,
                                     student_bias=ref_leaves[2] if sb is not None else None,
                                     token_weights=None if token_weights is None else token_weights.double(),
                                     **{**kw, "teacher_bias": None if tb is None else tb.double()})
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == ref_loss.shape
    assert torch.allclose(loss.double(), ref_loss.detach(), rtol=tol, atol=tol)
    if mask.sum() == 0:
        assert bool((loss == 0).all())
    up = torch.rand(ref_loss.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
    grads = torch.autograd.grad((loss * up.to(loss.dtype)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_loss * up).sum(), ref_leaves)
    for g_, r_ in zip(grads, ref_grads):
        assert g_.dtype == dtype
        if r_.norm() == 0:
            assert bool((g_ == 0).all())
        else:
            assert _rel(g_, r_) < (1e-9 if dtype == torch.float64 else 2e-4)
    return loss


# ----------------------------------------------------------------------------------- against the reference
@given(mask=step_masks(max_rows=3, max_len=40, max_steps=8), Hs=st.integers(1, 19), Ht=st.integers(1, 23),
       V=st.integers(2, 70), pad=st.integers(0, 5), beta=st.sampled_from([0.2, 0.5, 0.9]),
       hard=st.sampled_from([0.0, 0.0, 0.35]), weighting=st.sampled_from(["kl", "sampled", "none", "token_weights"]),
       reduction=st.sampled_from(["token_mean", "sum", "none"]), memory=st.sampled_from(["fast", "low"]),
       temperature=st.sampled_from([1.0, 0.6, 1.7]), bias=st.booleans(),
       caps=st.sampled_from([(None, None), (1.5, None), (None, 2.5), (1.5, 2.5)]),
       dtype=st.sampled_from([torch.float32, torch.float64]), chunk=st.sampled_from([None, 1, 5, 16]),
       vocab_tile=st.sampled_from([None, 1, 7]), row_blocks=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_jsd_matches_the_reference(mask, Hs, Ht, V, pad, beta, hard, weighting, reduction, memory, temperature, bias,
                                   caps, dtype, chunk, vocab_tile, row_blocks, seed):
    inputs, y = _problem(*mask.shape, Hs, Ht, V, V + pad, dtype, seed, bias, scale=3.0)
    token_weights = None
    if weighting == "token_weights":
        token_weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2
    with pytest.MonkeyPatch.context() as mp:
        if vocab_tile is not None:  # several vocabulary tiles per row in the two-pass sweeps
            mp.setattr(tiles, "VOCAB_TILE", vocab_tile)
        if row_blocks:              # the single pass's JSD statistics over sub-blocks of 2 rows
            mp.setattr(cpu_epilogue, "TEMPORARY_BYTES", 1)
        _compare(mask, inputs, y, dtype, memory=memory, token_weights=token_weights, divergence="jsd", beta=beta,
                 hard_loss_weight=hard, step_divergence="none" if weighting == "token_weights" else weighting,
                 reduction=reduction, temperature=temperature, chunk_size=chunk, student_softcap=caps[0],
                 teacher_softcap=caps[1], upstream_seed=seed)


@given(mask=step_masks(max_rows=3, max_len=30, max_steps=6), V=st.integers(2, 50), pad=st.integers(0, 3),
       divergence=st.sampled_from(["reverse_kl", "forward_kl", "jsd"]), hard=st.sampled_from([0.2, 1.0, 3.0]),
       weighting=st.sampled_from(["kl", "sampled", "none"]), reduction=st.sampled_from(["token_mean", "sum", "none"]),
       memory=st.sampled_from(["fast", "low"]), caps=st.sampled_from([(None, None), (1.5, 2.5)]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_hard_label_term_matches_the_reference(mask, V, pad, divergence, hard, weighting, reduction, memory, caps,
                                               dtype, seed):
    inputs, y = _problem(*mask.shape, 7, 5, V, V + pad, dtype, seed, bias=True, scale=3.0)
    _compare(mask, inputs, y, dtype, memory=memory, divergence=divergence, beta=0.4, hard_loss_weight=hard,
             step_divergence=weighting, reduction=reduction, temperature=0.8, student_softcap=caps[0],
             teacher_softcap=caps[1], upstream_seed=seed)


def test_stats_and_extreme_logits_match_the_reference():
    """Very peaked logits (probabilities that underflow in float32 and float64): log M comes from the
    log-probs, so D, its stats and the gradients stay finite and exact."""
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]])
    for scale in (30.0, 300.0):
        inputs, y = _problem(2, 10, 6, 9, 37, 40, torch.float64, 3, scale=scale)
        for memory in ("fast", "low"):
            _compare(mask, inputs, y, torch.float64, memory=memory, divergence="jsd", beta=0.3, hard_loss_weight=0.5,
                     temperature=0.9)
    inputs, y = _problem(2, 10, 6, 9, 37, 40, torch.float64, 4, scale=3.0)
    sh, sw, th, tw, sb, tb = inputs
    stats = fused_sod_loss(sh, sw, th, tw, mask, divergence="jsd", beta=0.7, student_bias=sb, teacher_bias=tb,
                           temperature=1.3, return_stats=True, backend="torch")
    D = ref_token_divergence(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, divergence="jsd", beta=0.7,
                             temperature=1.3) * mask
    assert torch.allclose(stats.token_divergence, D, rtol=1e-12, atol=1e-14)
    assert bool((D[mask.bool()] > 0).all())


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_float32_gradient_of_peaked_rows_is_accurate_in_absolute_terms(memory):
    """Peaked float32 rows: the JSD's logit gradient (1 - beta) p_s (r - c) is tiny where the student's mass
    sits, so c must be formed with the very p_s the backward uses (the tile sweep normalizes by its own sums:
    exp(z - lse) sums to 1 only up to an ulp of the largest logit); the error stays at an ulp of r, not the
    lse's rounding.  Identity heads make d(hidden) the logit gradient itself."""
    g = torch.Generator().manual_seed(0)
    V, N = 64, 6
    zs = (torch.randn(1, N, V, generator=g, dtype=torch.float64) * 30).float()
    zt = (torch.randn(1, N, V, generator=g, dtype=torch.float64) * 30).float()
    eye = torch.eye(V)
    mask = torch.ones(1, N, dtype=torch.int64)
    h = zs.clone().requires_grad_()
    fused_sod_loss(h, eye, zt, eye, mask, divergence="jsd", beta=0.5, step_divergence="none", memory=memory,
                   reduction="sum").backward()
    ref_h = zs.double().requires_grad_()
    ref, _ = ref_fused_sod_loss(ref_h, eye.double(), zt.double(), eye.double(), mask, divergence="jsd", beta=0.5,
                                step_divergence="none", reduction="sum")
    ref.backward()
    assert float((h.grad.double() - ref_h.grad).abs().max()) < 1e-7


# ------------------------------------------------------------------------------------------ sizes and edges
@pytest.mark.parametrize("memory", ["fast", "low"])
@pytest.mark.parametrize("reduction", ["token_mean", "sum", "none"])
def test_no_distilled_tokens_and_an_empty_batch(memory, reduction):
    for B, T in ((2, 7), (0, 5)):
        inputs, y = _problem(B, T, 4, 6, 13, 15, torch.float64, 1)
        _compare(torch.zeros(B, T, dtype=torch.int64), inputs, y, torch.float64, memory=memory, divergence="jsd",
                 beta=0.5, hard_loss_weight=0.7, reduction=reduction)


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_single_step_and_many_step_rows(memory):
    one = torch.ones(1, 45, dtype=torch.int64)                                 # one step of the whole row
    many = torch.tensor([[1, 0] * 20 + [1, 1, 1, 0, 1]])                       # 22 single-token steps and one of 3
    for mask in (one, many, torch.cat([torch.zeros(1, 45, dtype=torch.int64), many])):
        inputs, y = _problem(*mask.shape, 9, 11, 61, 64, torch.float64, 7)
        for step_divergence in ("kl", "sampled"):
            _compare(mask, inputs, y, torch.float64, memory=memory, divergence="jsd", beta=0.2, hard_loss_weight=0.3,
                     step_divergence=step_divergence, temperature=1.4, chunk_size=8 if memory == "low" else None)


def test_one_token_sequences_and_2d_inputs():
    inputs, y = _problem(1, 1, 3, 5, 9, 9, torch.float64, 2)
    _compare(torch.ones(1, 1, dtype=torch.int64), inputs, y, torch.float64, divergence="jsd", beta=0.9,
             hard_loss_weight=0.4)
    inputs, y = _problem(1, 12, 3, 5, 9, 10, torch.float64, 5)
    sh, sw, th, tw, sb, tb = inputs
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0])
    flat = [x[0] for x in (sh, th)]
    for memory in ("fast", "low"):
        h = flat[0].detach().requires_grad_()
        loss = fused_sod_loss(h, sw, flat[1], tw, mask, target_ids=y[0], divergence="jsd", beta=0.5,
                              hard_loss_weight=0.6, memory=memory)
        loss.backward()
        ref_h = flat[0].detach().requires_grad_()
        ref, _ = ref_fused_sod_loss(ref_h, sw, flat[1], tw, mask, target_ids=y[0], divergence="jsd", beta=0.5,
                                    hard_loss_weight=0.6)
        ref.backward()
        assert torch.allclose(loss, ref, rtol=1e-12) and _rel(h.grad, ref_h.grad) < 1e-10


def test_paths_on_cpu(monkeypatch):
    """JSD and the hard term run in the single pass by default on CPU tensors, in the tile sweeps otherwise."""
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0]])
    (sh, sw, th, tw, _, _), y = _problem(2, 11, 8, 6, 40, 40, torch.float32, 0, bias=False)

    def call(**options):
        paths = _Paths(monkeypatch)
        out = fused_sod_loss(sh.detach().requires_grad_(), sw, th, tw, mask, target_ids=y, backend="torch",
                             **options)
        out.sum().backward()
        return paths.single, paths.two_pass

    assert call(divergence="jsd", beta=0.3) == (1, 0)
    assert call(hard_loss_weight=0.5) == (1, 0)
    assert call(divergence="jsd", hard_loss_weight=0.5, step_divergence="sampled") == (1, 0)
    assert call(divergence="jsd", beta=0.3, memory="low") == (0, 1)
    assert call(divergence="jsd", hard_loss_weight=0.5, reduction="none") == (0, 1)


def test_two_pass_backward_without_the_frame_recomputes_the_centre():
    """The torch backend's JSD backward takes c = KL(p_s || M) from the forward's frame, or recomputes it."""
    inputs, y = _problem(1, 9, 5, 6, 29, 31, torch.float64, 8)
    sh, sw, th, tw, sb, tb = (x[0] if x.dim() == 3 else x for x in inputs)
    rows = torch.tensor([0, 2, 3, 4, 7, 8])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiles, "VOCAB_TILE", 8)
        D, ls, lt, _, _, frame = torch_backend.divergence_forward(sh, sw, sb, th, tw, tb, rows, None, divergence="jsd",
                                                                  temperature=0.7, beta=0.35, student_softcap=2.0)
        g = torch.rand(6, dtype=torch.float64)
        kw = dict(divergence="jsd", temperature=0.7, beta=0.35, student_softcap=2.0)
        with_frame = torch_backend.divergence_backward(sh, sw, sb, th, tw, tb, rows, ls, lt, D, g, frame=frame, **kw)
        without = torch_backend.divergence_backward(sh, sw, sb, th, tw, tb, rows, ls, lt, D, g, **kw)
    for a, b in zip(with_frame, without):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------ identities
@pytest.mark.parametrize("memory", ["fast", "low"])
@pytest.mark.parametrize("beta,kl", [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0, "forward_kl"), (1, "reverse_kl")])
def test_jsd_ends_are_exactly_the_kls(memory, beta, kl):
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1]])
    (sh, sw, th, tw, sb, tb), y = _problem(2, 12, 16, 12, 60, 63, torch.float32, 5)

    def run(**options):
        h, w, b = (x.detach().clone().requires_grad_() for x in (sh, sw, sb))
        loss = fused_sod_loss(h, w, th, tw, mask, target_ids=y, student_bias=b, teacher_bias=tb, memory=memory,
                              temperature=0.8, hard_loss_weight=0.2, **options)
        loss.backward()
        return loss.detach(), h.grad, w.grad, b.grad

    for a, b in zip(run(divergence="jsd", beta=beta), run(divergence=kl)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("memory", ["fast", "low"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_term_alone_is_the_mean_cross_entropy(memory, dtype):
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1]])
    (sh, sw, th, tw, sb, _), y = _problem(2, 12, 10, 7, 45, 47, dtype, 9)
    h, w, b = (x.detach().clone().requires_grad_() for x in (sh, sw, sb))
    loss = fused_sod_loss(h, w, th, tw, mask, target_ids=y, student_bias=b, coef=0.0, hard_loss_weight=1.0,
                          divergence="jsd", temperature=1.0, memory=memory)
    loss.backward()
    h2, w2, b2 = (x.detach().clone().double().requires_grad_() for x in (sh, sw, sb))
    logits = h2 @ w2.T + b2
    ce = torch.nn.functional.cross_entropy(logits[mask.bool()], y[mask.bool()])
    ce.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(loss.item() - ce.item()) <= tol * abs(ce.item())
    for a, r in ((h.grad, h2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        assert _rel(a, r) < (1e-10 if dtype == torch.float64 else 1e-4)


# ----------------------------------------------------------------------------------- dtypes and determinism
def test_bf16_inputs_compute_in_float32():
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 0]])
    (sh, sw, th, tw, _, _), y = _problem(1, 8, 16, 24, 50, 53, torch.float64, 2, bias=False)
    bf = [x.to(torch.bfloat16) for x in (sh, sw, th, tw)]
    for memory in ("fast", "low"):
        leaves = [bf[0].detach().requires_grad_(), bf[1].detach().requires_grad_()]
        loss = fused_sod_loss(leaves[0], leaves[1], bf[2], bf[3], mask, target_ids=y, divergence="jsd", beta=0.5,
                              hard_loss_weight=0.3, memory=memory)
        loss.backward()
        ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
        ref, _ = ref_fused_sod_loss(ref_leaves[0], ref_leaves[1], bf[2].double(), bf[3].double(), mask, target_ids=y,
                                    divergence="jsd", beta=0.5, hard_loss_weight=0.3)
        ref.backward()
        assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
        for g_, r_ in zip((leaves[0].grad, leaves[1].grad), (ref_leaves[0].grad, ref_leaves[1].grad)):
            assert g_.dtype == torch.bfloat16 and _rel(g_, r_) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jsd_statistics_in_row_blocks_equal_one_call(dtype, monkeypatch):
    """run_row_blocks splits only rows: each row's statistics are those of one call, bitwise, odd row counts."""
    g = torch.Generator().manual_seed(5)
    C, V = 37, 301
    xs, xt = torch.randn(C, V, generator=g, dtype=dtype) * 4, torch.randn(C, V, generator=g, dtype=dtype) * 4
    bs, bt = torch.randn(V, generator=g, dtype=dtype), torch.zeros(V, dtype=dtype)
    args = (bs, bt, torch.tensor(0.8, dtype=dtype), torch.tensor(1.0, dtype=dtype), torch.tensor(1.0, dtype=dtype),
            torch.tensor(0.3, dtype=dtype), False, False)
    one = (xs.clone(), xt.clone())
    whole = cpu_epilogue.run("jsd_stats", *one, *args, rows=C)
    monkeypatch.setattr(cpu_epilogue, "TEMPORARY_BYTES", 5 * 4 * V * xs.element_size())   # 5 rows per call
    blocks = (xs.clone(), xt.clone())
    split = cpu_epilogue.run_row_blocks("jsd_stats", *blocks, *args, rows=C)
    assert all(torch.equal(a, b) for a, b in zip(whole, split))
    assert torch.equal(one[0], blocks[0]) and torch.equal(one[1], blocks[1])


def test_bitwise_reproducible():
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1]])
    (sh, sw, th, tw, sb, tb), y = _problem(2, 12, 16, 12, 300, 303, torch.float32, 5)

    def run(**options):
        h, w = sh.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()
        loss = fused_sod_loss(h, w, th, tw, mask, target_ids=y, teacher_bias=tb, chunk_size=6, divergence="jsd",
                              beta=0.4, hard_loss_weight=0.5, **options)
        loss.sum().backward()
        return loss.detach(), h.grad, w.grad

    for options in ({}, {"memory": "low"}, {"reduction": "none"}):
        for a, b in zip(run(**options), run(**options)):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------- compiled epilogues
@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "1")
    monkeypatch.setattr(cpu_epilogue, "_broken", [])
    if not cpu_epilogue.compile_enabled():
        pytest.skip("torch.compile is not supported here")


# One shape family per variant (chunks of different row counts: dynamic sizes, compiled once per variant).
COMPILED_CASES = [
    # dtype, divergence, beta, hard, caps, weighting
    (torch.float32, "jsd", 0.5, 0.0, (None, None), "kl"),
    (torch.float64, "jsd", 0.2, 0.4, (1.5, 2.5), "sampled"),
    (torch.float32, "reverse_kl", 0.5, 0.4, (1.5, None), "kl"),
]


@pytest.mark.parametrize("dtype,divergence,beta,hard,caps,weighting", COMPILED_CASES)
def test_compiled_epilogues_match_eager_and_the_reference(compiled, monkeypatch, dtype, divergence, beta, hard, caps,
                                                          weighting):
    mask = torch.tensor([[0] + [1] * 20 + [0, 0] + [1] * 13 + [0] * 3 + [1] * 30 + [0],
                         [1] * 9 + [0] + [1] * 40 + [0] * 8 + [1] * 12])
    inputs, y = _problem(2, 70, 24, 40, 333, 340, dtype, 11, scale=3.0)
    options = dict(divergence=divergence, beta=beta, hard_loss_weight=hard, step_divergence=weighting,
                   student_softcap=caps[0], teacher_softcap=caps[1], temperature=0.8, chunk_size=48)

    def run():
        sh, sw, th, tw, sb, tb = inputs
        h, w, b = (x.detach().clone().requires_grad_() for x in (sh, sw, sb))
        loss = fused_sod_loss(h, w, th, tw, mask, target_ids=y, student_bias=b, teacher_bias=tb, **options)
        loss.backward()
        return loss.detach(), h.grad, w.grad, b.grad

    paths = _Paths(monkeypatch)
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "0")
    eager = run()
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "1")
    first, second = run(), run()
    assert paths.single == 3 and paths.two_pass == 0
    for a, b in zip(first, second):            # compiled runs are bitwise reproducible
        assert torch.equal(a, b)
    # compiled and eager agree to rounding (float32: the JSD's gradient (1 - beta) p_s (r - c) is small next to
    # the rounding of r, both are about 3e-6 from the float64 reference here, not always in the same direction)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(first, eager):
        assert _rel(a, b) < tol
    _compare(mask, inputs, y, dtype, memory="fast", **options)  # and the reference (compiled)


def test_compiled_jsd_is_not_recompiled_per_beta_call_or_chunk(compiled):
    from torch._dynamo.utils import counters

    mask = torch.ones(1, 45, dtype=torch.int64)
    (sh, sw, th, tw, _, _), y = _problem(1, 45, 24, 40, 333, 333, torch.float32, 3, bias=False)
    h = sh.requires_grad_()
    fused_sod_loss(h, sw, th, tw, mask, divergence="jsd", step_divergence="none", chunk_size=20).backward()
    before = dict(counters["stats"])
    for beta, V, chunk in ((0.3, 333, 7), (0.8, 250, 9), (0.5, 410, 16)):  # other betas, chunks, vocabularies
        w = sw[:V] if V <= 333 else torch.cat([sw, sw[:V - 333]])
        fused_sod_loss(h, w.contiguous(), th, tw[:V] if V <= 333 else torch.cat([tw, tw[:V - 333]]), mask,
                       divergence="jsd", beta=beta, step_divergence="none", chunk_size=chunk).backward()
    assert counters["stats"].get("unique_graphs", 0) == before.get("unique_graphs", 0)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("beta,error", [(-0.1, ValueError), (1.5, ValueError), (math.nan, ValueError),
                                        (math.inf, ValueError), ("0.5", TypeError), (None, TypeError),
                                        (True, TypeError)])
def test_bad_beta_is_refused(beta, error):
    (sh, sw, th, tw, _, _), y = _problem(1, 4, 3, 3, 7, 7, torch.float32, 0, bias=False)
    for divergence in ("jsd", "reverse_kl"):
        with pytest.raises(error, match="beta"):
            fused_sod_loss(sh, sw, th, tw, torch.ones(1, 4, dtype=torch.int64), divergence=divergence, beta=beta)


def test_bad_hard_loss_weight_is_refused():
    (sh, sw, th, tw, _, _), y = _problem(1, 4, 3, 3, 7, 7, torch.float32, 0, bias=False)
    mask = torch.ones(1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="target_ids"):
        fused_sod_loss(sh, sw, th, tw, mask, hard_loss_weight=0.5)
    with pytest.raises(ValueError, match="hard_loss_weight"):
        fused_sod_loss(sh, sw, th, tw, mask, target_ids=y, hard_loss_weight=-1.0)
    with pytest.raises(TypeError, match="hard_loss_weight"):
        fused_sod_loss(sh, sw, th, tw, mask, target_ids=y, hard_loss_weight="1")
    # zero needs no targets
    fused_sod_loss(sh, sw, th, tw, mask, hard_loss_weight=0.0, divergence="jsd")
