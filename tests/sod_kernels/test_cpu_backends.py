"""The CPU single pass of fused_sod_loss (memory="fast" on CPU tensors) and its compiled epilogues.

Exactness against reference/ in float64 (both memory modes, every weighting, odd sizes, soft-caps, biases,
padded teacher vocabularies), which path runs when, bitwise reproducibility, the compiled epilogue against
the eager one, and the eager fallback when compilation fails.  The suite runs the epilogues eagerly
(tests/conftest.py); the tests marked ``compiled`` compile them, sharing one shape family per variant.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference import ref_fused_sod_loss
from sod_kernels import fused_sod_loss
from sod_kernels.core import cpu_epilogue
from sod_kernels.dense import cpu_backend
from tests.helpers import dense_cpu_paths, dense_problem, relative_error, step_masks


_problem, _rel, _Paths = dense_problem, relative_error, dense_cpu_paths


def _compare(mask, inputs, y, dtype, *, memory, token_weights=None, chunk_size=None, **options):
    sh, sw, th, tw, sb, tb = inputs
    leaves = [x.detach().requires_grad_() for x in (sh, sw) + ((sb,) if sb is not None else ())]
    kw = dict(target_ids=y, epsilon=1e-4, delta=0.25, coef=0.7, teacher_bias=tb, **options)
    loss = fused_sod_loss(leaves[0], leaves[1], th, tw, mask, student_bias=leaves[2] if sb is not None else None,
                          token_weights=token_weights, memory=memory, backend="torch", chunk_size=chunk_size, **kw)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_loss, _ = ref_fused_sod_loss(ref_leaves[0], ref_leaves[1], th.double(), tw.double(), mask,
                                     student_bias=ref_leaves[2] if sb is not None else None,
                                     token_weights=None if token_weights is None else token_weights.double(),
                                     **{**kw, "teacher_bias": None if tb is None else tb.double()})
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(loss.double(), ref_loss.detach(), rtol=tol, atol=tol)
    if mask.sum() == 0:
        assert loss.item() == 0.0
    grads = torch.autograd.grad(loss.sum(), leaves)
    ref_grads = torch.autograd.grad(ref_loss.sum(), ref_leaves)
    for g_, r_ in zip(grads, ref_grads):
        assert g_.dtype == dtype
        if r_.norm() == 0:
            assert bool((g_ == 0).all())
        else:
            assert _rel(g_, r_) < (1e-9 if dtype == torch.float64 else 1e-4)


@given(mask=step_masks(max_rows=3, max_len=40, max_steps=8), Hs=st.integers(1, 19), Ht=st.integers(1, 23),
       V=st.integers(2, 70), pad=st.integers(0, 5), divergence=st.sampled_from(["reverse_kl", "forward_kl"]),
       weighting=st.sampled_from(["kl", "sampled", "none", "token_weights"]),
       reduction=st.sampled_from(["token_mean", "sum"]), memory=st.sampled_from(["fast", "low"]),
       temperature=st.sampled_from([1.0, 0.6, 1.7]), bias=st.booleans(),
       caps=st.sampled_from([(None, None), (1.5, None), (None, 2.5), (1.5, 2.5)]),
       dtype=st.sampled_from([torch.float32, torch.float64]), chunk=st.sampled_from([None, 1, 5, 16]),
       seed=st.integers(0, 2**31 - 1))
def test_both_memory_modes_match_the_reference(mask, Hs, Ht, V, pad, divergence, weighting, reduction, memory,
                                                temperature, bias, caps, dtype, chunk, seed):
    inputs, y = _problem(*mask.shape, Hs, Ht, V, V + pad, dtype, seed, bias, scale=3.0)
    token_weights = None
    if weighting == "token_weights":
        token_weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2
    _compare(mask, inputs, y, dtype, memory=memory, token_weights=token_weights, divergence=divergence,
             step_divergence="none" if weighting == "token_weights" else weighting, reduction=reduction,
             temperature=temperature, chunk_size=chunk, student_softcap=caps[0], teacher_softcap=caps[1])


# --------------------------------------------------------------------------------------- path selection
def _call(monkeypatch, mask, **options):
    paths = _Paths(monkeypatch)
    (sh, sw, th, tw, _, _), y = _problem(*mask.shape, 8, 6, 40, 40, torch.float32, 0, bias=False)
    h = sh.requires_grad_(options.pop("grad", True))
    out = fused_sod_loss(h, sw, th, tw, mask, target_ids=y, backend="torch", **options)
    if out.requires_grad:
        out.sum().backward()
    return paths.single, paths.two_pass


def test_single_pass_is_the_default_on_cpu(monkeypatch):
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0]])
    for options in ({}, {"step_divergence": "sampled"}, {"step_divergence": "none"}, {"reduction": "sum"},
                    {"token_weights": torch.rand(mask.shape)}, {"chunk_size": 5}):
        assert _call(monkeypatch, mask, **options) == (1, 0), options


def test_two_passes_where_the_single_pass_does_not_apply(monkeypatch):
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0]])
    assert _call(monkeypatch, mask, memory="low") == (0, 1)
    assert _call(monkeypatch, mask, reduction="none") == (0, 1)
    assert _call(monkeypatch, mask, grad=False) == (0, 1)            # forward only: nothing to form in-pass
    assert _call(monkeypatch, mask, chunk_size=4) == (0, 1)          # a step of 5 tokens is longer than a chunk
    assert _call(monkeypatch, mask, chunk_size=4, step_divergence="none") == (1, 0)  # no steps to respect
    assert _call(monkeypatch, mask * 0) == (0, 1)                    # nothing distilled: no pass to fuse


def test_chunks_grow_to_hold_a_step_up_to_the_largest_chunk(monkeypatch):
    mask = torch.ones(1, 100, dtype=torch.int64)
    # 40 columns x 4 bytes x 2 blocks: the default chunk holds 32 rows, the largest 64 or 128.
    monkeypatch.setattr(cpu_backend, "CPU_CHUNK_BYTES", 32 * 40 * 8)
    monkeypatch.setattr(cpu_backend, "CPU_MAX_CHUNK_BYTES", 128 * 40 * 8)
    assert _call(monkeypatch, mask) == (1, 0)                        # one step of 100 rows: grows to 100
    monkeypatch.setattr(cpu_backend, "CPU_MAX_CHUNK_BYTES", 64 * 40 * 8)
    assert _call(monkeypatch, mask) == (0, 1)                        # longer than the largest chunk


def test_blocks_are_chunk_sized_not_tokens_by_vocabulary(monkeypatch):
    """The single pass holds [C, V] blocks of a chunk's rows, never N x V (here N x V dominates)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    N, V, H = 96, 1000, 8
    monkeypatch.setattr(cpu_backend, "CPU_CHUNK_BYTES", 16 * V * 8)  # 16 rows per chunk
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
    ids = (torch.arange(N) // 8)[None]
    with Record():
        fused_sod_loss(sh, sw, torch.randn(1, N, H), torch.randn(V, H), step_ids=ids, backend="torch").backward()
    assert max(sizes) <= 16 * V
    assert max(sizes) >= 16 * V  # the chunk blocks themselves were seen


def test_bitwise_reproducible_and_equal_to_itself_across_weightings():
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1]])
    (sh, sw, th, tw, sb, tb), y = _problem(2, 12, 16, 12, 300, 303, torch.float32, 5)

    def run(**options):
        h, w = sh.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()
        loss = fused_sod_loss(h, w, th, tw, mask, target_ids=y, teacher_bias=tb, chunk_size=6, **options)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    for options in ({}, {"step_divergence": "sampled", "divergence": "forward_kl"}):
        for a, b in zip(run(**options), run(**options)):
            assert torch.equal(a, b)


def test_second_backward_is_refused_and_upstream_gradient_scales():
    mask = torch.ones(2, 9, dtype=torch.int64)
    (sh, sw, th, tw, _, _), _ = _problem(2, 9, 5, 7, 30, 30, torch.float32, 1, bias=False)
    h = sh.requires_grad_()
    loss = fused_sod_loss(h, sw, th, tw, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()
    g1 = h.grad.clone()
    h.grad = None
    (fused_sod_loss(h, sw, th, tw, mask) * -2.5).backward()
    assert torch.allclose(h.grad, -2.5 * g1, rtol=1e-6, atol=1e-8)


def test_16_bit_inputs_compute_in_float32():
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 0]])
    (sh, sw, th, tw, _, _), _ = _problem(1, 8, 16, 24, 50, 53, torch.float64, 2, bias=False)
    bf = [x.to(torch.bfloat16) for x in (sh, sw, th, tw)]
    leaves = [bf[0].requires_grad_(), bf[1].requires_grad_()]
    loss = fused_sod_loss(leaves[0], leaves[1], bf[2], bf[3], mask)
    loss.backward()
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref, _ = ref_fused_sod_loss(ref_leaves[0], ref_leaves[1], bf[2].double(), bf[3].double(), mask)
    ref.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for g_, r_ in zip((leaves[0].grad, leaves[1].grad), (ref_leaves[0].grad, ref_leaves[1].grad)):
        assert g_.dtype == torch.bfloat16 and _rel(g_, r_) < 2e-2


# --------------------------------------------------------------------------------- compiled epilogues
@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "1")
    monkeypatch.setattr(cpu_epilogue, "_broken", [])
    if not cpu_epilogue.compile_enabled():
        pytest.skip("torch.compile is not supported here")


def _eager_and_compiled(monkeypatch, fn):
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "0")
    eager = fn()
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "1")
    return eager, fn(), fn()


# One shape family per variant (the chunks differ in rows: dynamic sizes, compiled once per variant).
COMPILED_CASES = [
    # dtype, divergence, caps, weighting: the default variant (float32 reverse KL) and a float64 forward-KL
    # variant with both soft-caps (the slope path) against the float64 reference.
    (torch.float32, "reverse_kl", (None, None), "kl"),
    (torch.float64, "forward_kl", (1.5, 2.5), "sampled"),
]


@pytest.mark.parametrize("dtype,divergence,caps,weighting", COMPILED_CASES)
def test_compiled_epilogue_matches_eager_and_the_reference(compiled, monkeypatch, dtype, divergence, caps, weighting):
    mask = torch.tensor([[0] + [1] * 20 + [0, 0] + [1] * 13 + [0] * 3 + [1] * 30 + [0],
                         [1] * 9 + [0] + [1] * 40 + [0] * 8 + [1] * 12])
    inputs, y = _problem(2, 70, 24, 40, 333, 340, dtype, 11, scale=3.0)
    options = dict(divergence=divergence, step_divergence=weighting, student_softcap=caps[0],
                   teacher_softcap=caps[1], temperature=0.8, chunk_size=48)

    def run():
        sh, sw, th, tw, sb, tb = inputs
        h, w, b = (x.detach().clone().requires_grad_() for x in (sh, sw, sb))
        loss = fused_sod_loss(h, w, th, tw, mask, target_ids=y, student_bias=b, teacher_bias=tb, **options)
        loss.backward()
        return loss.detach(), h.grad, w.grad, b.grad

    paths = _Paths(monkeypatch)
    eager, first, second = _eager_and_compiled(monkeypatch, run)
    assert paths.single == 3 and paths.two_pass == 0
    for a, b in zip(first, second):            # compiled runs are bitwise reproducible
        assert torch.equal(a, b)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, b in zip(first, eager):             # compiled and eager agree to rounding
        assert _rel(a, b) < tol
    _compare(mask, inputs, y, dtype, memory="fast", **options)  # and the reference (compiled)


def test_compiled_epilogue_is_not_recompiled_per_call_or_chunk(compiled):
    from torch._dynamo.utils import counters

    mask = torch.ones(1, 45, dtype=torch.int64)
    (sh, sw, th, tw, _, _), _ = _problem(1, 45, 24, 40, 333, 333, torch.float32, 3, bias=False)
    h = sh.requires_grad_()
    fused_sod_loss(h, sw, th, tw, mask, step_divergence="none", chunk_size=20).backward()  # warm: 20 + 20 + 5
    before = dict(counters["stats"])
    for V, chunk in ((333, 7), (250, 9), (410, 16)):  # other chunk sizes and vocabularies: same variant
        w = sw[:V] if V <= 333 else torch.cat([sw, sw[:V - 333]])
        fused_sod_loss(h, w.contiguous(), th, tw[:V] if V <= 333 else torch.cat([tw, tw[:V - 333]]), mask,
                       step_divergence="none", chunk_size=chunk).backward()
    assert counters["stats"].get("unique_graphs", 0) == before.get("unique_graphs", 0)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "1")
    monkeypatch.setenv("SOD_KERNELS_CPU_NATIVE", "0")   # the PyTorch epilogues alone (the C++ one: test_cpu_native)
    monkeypatch.setattr(cpu_epilogue, "_broken", [])
    monkeypatch.setattr(cpu_epilogue, "_compiled", {})

    def broken_compile(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    mask = torch.ones(1, 12, dtype=torch.int64)
    (sh, sw, th, tw, _, _), _ = _problem(1, 12, 5, 7, 30, 30, torch.float32, 1, bias=False)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        got = fused_sod_loss(sh, sw.requires_grad_(), th, tw, mask)
    assert not cpu_epilogue.compile_enabled()
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "0")
    assert torch.equal(got.detach(), fused_sod_loss(sh, sw, th, tw, mask).detach())


def test_compiled_logprob_and_policy_epilogues_match_eager(compiled, monkeypatch):
    from sod_kernels import fused_sod_policy_loss, fused_token_logprobs

    g = torch.Generator().manual_seed(7)
    h0 = torch.randn(2, 40, 24, generator=g)
    w0 = torch.randn(333, 24, generator=g) / 3
    y = torch.randint(0, 333, (2, 40), generator=g)
    mask = (torch.rand(2, 40, generator=g) < 0.8).long()
    old = torch.randn(2, 40, generator=g) * 0.3 - 5
    adv = torch.randn(2, 40, generator=g)

    def run():
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        lp, ent = fused_token_logprobs(h, w, y, return_entropy=True, chunk_size=32)
        policy = fused_sod_policy_loss(h, w, y, old, adv, mask, chunk_size=32)
        (lp.sum() + 0.3 * ent.sum() + policy).backward()
        return lp.detach(), ent.detach(), policy.detach(), h.grad, w.grad

    eager, first, second = _eager_and_compiled(monkeypatch, run)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for a, b in zip(first, eager):
        assert _rel(a, b) < 2e-6
