"""The execution contract of every fused function: single pass where the weights allow, bitwise
determinism, no silent double backward, autocast-independence, saturated softmaxes, entropy.

Triton paths run on CUDA where there is a GPU, else under the interpreter (conftest).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import ref_fused_sod_loss
from sod_kernels import (fused_sod_loss, fused_sod_policy_loss, fused_token_logprobs, step_ids_from_mask,
                         step_weights_from_divergence)
from sod_kernels.dense import triton_backend as triton_divergence
from sod_kernels.steps.plan import InPassStepWeights
from tests.conftest import HAS_CUDA
from tests.helpers import step_masks

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["torch", "triton"]


def _device(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


def _problem(B=2, T=13, Hs=12, Ht=9, V=57, pad=2, seed=0, device="cpu", dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(B, T, Hs, generator=g)
    sw = torch.randn(V, Hs, generator=g) * scale / Hs ** 0.5
    th = torch.randn(B, T, Ht, generator=g)
    tw = torch.randn(V + pad, Ht, generator=g) * scale / Ht ** 0.5
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    y = torch.randint(0, V, (B, T), generator=g)
    on = lambda x: x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)  # noqa: E731
    return [on(x) for x in (sh, sw, th, tw, mask, y)]


# ----------------------------------------------------------------------------------------- single pass
@pytest.mark.parametrize("case", ["token_weights", "none", "kl", "sampled"])
def test_single_pass_runs_when_the_weights_are_known_in_pass(case, monkeypatch):
    calls = []
    real = triton_divergence.single_pass_loss
    monkeypatch.setattr(triton_divergence, "single_pass_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    sh, sw, th, tw, mask, y = _problem(device=DEVICE)
    h = sh.requires_grad_()
    kw = {"token_weights": torch.rand(mask.shape, device=DEVICE)} if case == "token_weights" else \
        {"step_divergence": case}
    loss = fused_sod_loss(h, sw, th, tw, mask, target_ids=y, backend="triton", **kw)
    loss.backward()
    assert calls, "the single pass was not used"
    # the same call with reduction="none" (unknown upstream gradient per token) recomputes instead
    calls.clear()
    fused_sod_loss(h, sw, th, tw, mask, target_ids=y, backend="triton", reduction="none", **kw).sum().backward()
    assert not calls


def test_steps_longer_than_a_chunk_fall_back_to_two_passes(monkeypatch):
    calls = []
    real = triton_divergence.single_pass_loss
    monkeypatch.setattr(triton_divergence, "single_pass_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    sh, sw, th, tw, _, y = _problem(device=DEVICE)
    mask = torch.ones(2, 13, dtype=torch.int64, device=DEVICE)  # one 13-token step per row
    h = sh.detach().requires_grad_()
    a = fused_sod_loss(h, sw, th, tw, mask, backend="triton", chunk_size=4)
    a.backward()
    assert not calls
    g4 = h.grad.clone()
    h.grad = None
    b = fused_sod_loss(h, sw, th, tw, mask, backend="triton", chunk_size=13)  # whole steps fit: one pass
    b.backward()
    assert calls
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7) and torch.allclose(g4, h.grad, rtol=1e-4, atol=1e-6)


@settings(max_examples=30)
@given(mask=step_masks(max_rows=4, max_len=40, max_steps=8), rows=st.integers(1, 25), seed=st.integers(0, 10**6))
def test_in_pass_step_weights_equal_the_shared_helper(mask, rows, seed):
    """Chunks cut at step boundaries: each chunk's weights equal step_weights_from_divergence's."""
    B, T = mask.shape
    g = torch.Generator().manual_seed(seed)
    signal = torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.2  # a few negatives: clamped
    ids = step_ids_from_mask(mask)
    row_index = torch.nonzero(ids.reshape(-1) >= 0).squeeze(1)
    plan = InPassStepWeights(ids, row_index, epsilon=1e-4, delta=0.25)
    chunks = plan.chunks(rows, row_index.numel())
    want = step_weights_from_divergence(signal, ids, epsilon=1e-4, delta=0.25).token_weights.reshape(-1)[row_index]
    if chunks is None:  # some step is longer than the chunk
        lengths = torch.bincount(plan.step_of_row)
        assert int(lengths.max()) > rows
        return
    assert all(b - a <= rows for a, b in chunks) and [c for ab in chunks for c in ab][1:-1:2] == \
        [b for _, b in chunks[:-1]]
    flat = signal.reshape(-1)[row_index]
    got = torch.cat([plan.chunk_weights(a, b, flat[a:b]) for a, b in chunks]) if chunks else want[:0]
    for a, _ in chunks:  # every chunk starts at a step start
        assert a in plan.starts
    assert torch.allclose(got, want.double(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ determinism
def _run_twice(fn):
    return fn(), fn()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", ["fast", "low"])
def test_identical_calls_give_bitwise_identical_results(backend, memory):
    dev = _device(backend)
    sh, sw, th, tw, mask, y = _problem(T=40, V=150, device=dev, seed=4)

    def run():
        h, w = sh.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()
        loss = fused_sod_loss(h, w, th, tw, mask, target_ids=y, step_divergence="sampled", backend=backend,
                              memory=memory, chunk_size=9)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    for a, b in zip(*_run_twice(run)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_and_logprobs_are_bitwise_deterministic(backend):
    dev = _device(backend)
    sh, sw, _, _, mask, y = _problem(T=30, V=140, device=dev, seed=6)
    old = torch.randn(mask.shape, device=dev) - 4
    adv = torch.randn(mask.shape, device=dev)

    def run():
        h, w = sh.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()
        loss = fused_sod_policy_loss(h, w, y, old, adv, mask, backend=backend, chunk_size=7)
        lp, ent = fused_token_logprobs(h, w, y, backend=backend, return_entropy=True, chunk_size=7)
        (loss + lp.sum() + ent.sum()).backward()
        return loss.detach(), lp.detach(), ent.detach(), h.grad, w.grad

    for a, b in zip(*_run_twice(run)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- autograd contract
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused_not_silently_zero(backend):
    dev = _device(backend)
    sh, sw, th, tw, mask, y = _problem(device=dev)
    h, w = sh.requires_grad_(), sw.requires_grad_()
    old, adv = torch.randn(mask.shape, device=dev), torch.randn(mask.shape, device=dev)
    losses = {
        "kl": lambda: fused_sod_loss(h, w, th, tw, mask, backend=backend),
        "kl none": lambda: fused_sod_loss(h, w, th, tw, mask, backend=backend, reduction="none").sum(),
        "logprobs": lambda: fused_token_logprobs(h, w, y, backend=backend).sum(),
        "policy": lambda: fused_sod_policy_loss(h, w, y, old, adv, mask, backend=backend),
    }
    for name, make in losses.items():
        with pytest.raises(RuntimeError, match="first-order gradients only"):
            torch.autograd.grad(make(), w, create_graph=True)


def test_single_pass_gradients_are_used_once_with_a_clear_error():
    sh, sw, th, tw, mask, _ = _problem(device=DEVICE)
    h = sh.requires_grad_()
    loss = fused_sod_loss(h, sw, th, tw, mask, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales_the_single_pass(backend):
    dev = _device(backend)
    sh, sw, th, tw, mask, _ = _problem(device=dev)
    h = sh.requires_grad_()
    fused_sod_loss(h, sw, th, tw, mask, backend=backend).backward()
    g1 = h.grad.clone()
    h.grad = None
    (fused_sod_loss(h, sw, th, tw, mask, backend=backend) * -2.5).backward()
    assert torch.allclose(h.grad, -2.5 * g1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_changes_nothing(backend):
    """SPEC 13: inside autocast every function computes exactly as outside, forward and backward."""
    dev = _device(backend)
    kind = "cuda" if dev == "cuda" else "cpu"
    sh, sw, th, tw, mask, y = _problem(device=dev)
    old, adv = torch.randn(mask.shape, device=dev), torch.randn(mask.shape, device=dev)

    def everything():
        h, w = sh.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()
        a = fused_sod_loss(h, w, th, tw, mask, target_ids=y, backend=backend)
        b = fused_sod_loss(h, w, th, tw, mask, target_ids=y, backend=backend, reduction="none").sum()
        lp, ent = fused_token_logprobs(h, w, y, backend=backend, return_entropy=True)
        c = fused_sod_policy_loss(h, w, y, old, adv, mask, backend=backend)
        total = a + b + lp.sum() + ent.sum() + c
        total.backward()
        return [t.detach() for t in (a, b, lp, ent, c)] + [h.grad, w.grad]

    outside = everything()
    with torch.autocast(kind, dtype=torch.bfloat16):
        inside = everything()
    for x, z in zip(outside, inside):
        assert x.dtype == z.dtype
        assert torch.allclose(x, z, rtol=1e-6, atol=1e-7), float((x - z).abs().max())


# ------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_reverse_kl_gradient_is_no_worse_than_full_fp32_logits(backend):
    """Logits of magnitude ~1e4 (one-hot softmaxes) with a slightly perturbed teacher (a near-copy of the
    student): the gradient must not be fp32 cancellation noise (no worse than the materialized fp32
    computation).  A distant teacher is the other case, measured in tests/sod_kernels/dense/test_saturated_gradient.py."""
    dev = _device(backend)
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(4, 16, 16, generator=g) * 1e4
    sw = torch.randn(64, 16, generator=g) / 8
    th = sh + 1e-4 * torch.randn(sh.shape, generator=g)
    mask = torch.ones(4, 16, dtype=torch.int64)
    mask[:, ::2] = 0
    ref_h = sh.double().requires_grad_()
    ref_w = sw.double().requires_grad_()
    ref, _ = ref_fused_sod_loss(ref_h, ref_w, th.double(), sw.double(), mask)
    ref.backward()
    naive_w = sw.clone().requires_grad_()  # the materialized fp32 computation
    naive, _ = ref_fused_sod_loss(sh, naive_w, th, sw, mask)
    naive.backward()
    w = sw.to(dev).requires_grad_()
    loss = fused_sod_loss(sh.to(dev), w, th.to(dev), sw.to(dev), mask.to(dev), backend=backend)
    loss.backward()
    err = float((w.grad.cpu().double() - ref_w.grad).norm())
    naive_err = float((naive_w.grad.double() - ref_w.grad).norm())
    assert err <= 10 * naive_err + 1e-6 * float(ref_w.grad.norm()) + 1e-9, (err, naive_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_and_its_gradient_match_float64(backend, temperature):
    dev = _device(backend)
    sh, sw, _, _, _, y = _problem(T=11, V=90, device=dev, seed=8, scale=4.0)
    h, w = sh.requires_grad_(), sw.requires_grad_()
    b = torch.randn(90, device=dev).requires_grad_()
    lp, ent = fused_token_logprobs(h, w, y, bias=b, temperature=temperature, backend=backend, return_entropy=True,
                                   chunk_size=5)
    up = torch.randn(ent.shape, device=dev)
    (ent * up + 0.5 * lp).sum().backward()
    hd, wd, bd = (x.detach().double().cpu().requires_grad_() for x in (h, w, b))
    logp = torch.log_softmax((hd @ wd.T + bd) / temperature, -1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    ref_lp = logp.gather(-1, y.cpu()[..., None]).squeeze(-1)
    (ref_ent * up.double().cpu() + 0.5 * ref_lp).sum().backward()
    assert torch.allclose(ent.double().cpu(), ref_ent, rtol=1e-5, atol=1e-5)
    for got, want in ((h, hd), (w, wd), (b, bd)):
        rel = float((got.grad.double().cpu() - want.grad).norm() / want.grad.norm())
        assert rel < 1e-4, rel


def test_token_weights_are_validated():
    sh, sw, th, tw, mask, _ = _problem()
    for bad, match in ((torch.rand(2, 12), "token_weights"), (-torch.ones(2, 13), "finite and >= 0"),
                       (torch.full((2, 13), float("nan")), "finite"), (torch.ones(2, 13, dtype=torch.int64),
                                                                       "token_weights")):
        with pytest.raises((ValueError, TypeError), match=match):
            fused_sod_loss(sh, sw, th, tw, mask, token_weights=bad)
    with pytest.raises(ValueError, match="token_weights"):
        fused_sod_loss(sh, sw, th, tw, mask, token_weights=torch.ones(2, 13), step_divergence="kl")
