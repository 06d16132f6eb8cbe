"""fused_sod_policy_loss against reference.ref_ppo_dual_clip_loss(ref_token_logprobs(...)) (SPEC section 7)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import ref_ppo_dual_clip_loss, ref_token_logprobs
from sod_kernels import PolicyLossStats, fused_sod_policy_loss
from tests.conftest import HAS_CUDA
from tests.helpers import random_mask

# The Triton backend runs on CUDA tensors where there is a GPU, else under the interpreter on CPU tensors.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

FP32_LOSS_RTOL = 1e-5
FP32_GRAD_RTOL = 1e-4
BF16_GRAD_RTOL = 2e-2
TRITON_EXAMPLES = 8


def rel_err(got, want) -> float:
    want = want.double().cpu()
    return ((got.double().cpu() - want).norm() / want.norm().clamp(min=1e-30)).item()


def device_of(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def make_problem(B, T, H, V, seed, *, mask=None, dtype=torch.float64, bias=False, ratios=None, advantages=None,
                 temperature=1.0):
    """Inputs whose old log-probs are chosen so that the new/old ratio of each token is ``ratios``
    (default: log-uniform in [0.25, 5], which visits every clip branch)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype).double()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype).double()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).double() if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    mask = random_mask(B, T, 0.7, generator=g) if mask is None else mask
    if ratios is None:
        ratios = torch.exp(torch.empty(B, T, dtype=torch.float64).uniform_(math.log(0.25), math.log(5.0), generator=g))
    if advantages is None:
        advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    with torch.no_grad():
        new = ref_token_logprobs(hidden, weight, y, b, temperature)
    old = new - torch.log(ratios)
    return dict(hidden=hidden, weight=weight, bias=b, y=y, mask=mask, old=old, adv=advantages)


def reference(p, temperature=1.0, **clip):
    ins = [t.clone().requires_grad_() if t is not None else None for t in (p["hidden"], p["weight"], p["bias"])]
    logp = ref_token_logprobs(ins[0], ins[1], p["y"], ins[2], temperature)
    loss = ref_ppo_dual_clip_loss(logp, p["old"], p["adv"], p["mask"], **clip)
    loss.backward()
    return loss.detach(), ins


def ours(p, dtype, backend, temperature=1.0, **kwargs):
    dev = device_of(backend)
    ins = [t.to(dtype).to(dev).requires_grad_() if t is not None else None
           for t in (p["hidden"], p["weight"], p["bias"])]
    out = fused_sod_policy_loss(ins[0], ins[1], p["y"].to(dev), p["old"].float().to(dev), p["adv"].float().to(dev),
                                p["mask"].to(dev), student_bias=ins[2], temperature=temperature, backend=backend,
                                **kwargs)
    loss = out.loss if isinstance(out, PolicyLossStats) else out
    loss.sum().backward()
    return out, ins


def compare(p, dtype, backend, temperature=1.0, **clip):
    want, ref_ins = reference(p, temperature, **clip)
    got, ins = ours(p, dtype, backend, temperature, **clip)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # old log-probs and advantages enter as float32 (as trainers store them): compare against the
    # float64 reference within what that rounding allows.  The loss is a mean of terms of both signs, so the
    # scale of the rounding is the mean magnitude of the terms, not the (possibly cancelled) mean itself.
    with torch.no_grad():
        terms = ref_ppo_dual_clip_loss(ref_token_logprobs(p["hidden"], p["weight"], p["y"], p["bias"], temperature),
                                       p["old"], p["adv"], p["mask"], reduction="none", **clip)
    scale = float(terms.abs().sum()) / max(int((p["mask"] != 0).sum()), 1)
    assert abs(got.item() - want.item()) <= FP32_LOSS_RTOL * max(abs(want.item()), scale, 1e-3)
    tol = BF16_GRAD_RTOL if dtype == torch.bfloat16 else FP32_GRAD_RTOL
    for name, mine, theirs in zip(("hidden", "weight", "bias"), ins, ref_ins):
        if mine is not None:
            assert mine.grad.dtype == dtype
            if theirs.grad.norm() > 0:
                assert rel_err(mine.grad, theirs.grad) < tol, name
            else:
                assert mine.grad.norm() == 0, name


@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 24), st.integers(2, 120),
       st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), st.booleans(), st.sampled_from([1.0, 0.8]),
       st.integers(0, 2 ** 30))
def test_torch_backend_matches_reference(B, T, H, V, dtype, bias, temperature, seed):
    p = make_problem(B, T, H, V, seed, dtype=dtype, bias=bias, temperature=temperature)
    compare(p, dtype, "torch", temperature)


@settings(max_examples=TRITON_EXAMPLES)
@given(st.integers(1, 2), st.integers(1, 20), st.integers(1, 40), st.integers(2, 300),
       st.sampled_from([torch.float32, torch.bfloat16]), st.booleans(), st.integers(0, 2 ** 30))
def test_triton_backend_matches_reference(B, T, H, V, dtype, bias, seed):
    p = make_problem(B, T, H, V, seed, dtype=dtype, bias=bias)
    compare(p, dtype, "triton")


@given(st.floats(0.0, 0.5), st.floats(0.0, 0.5), st.sampled_from([1.5, 3.0, 10.0]), st.integers(0, 2 ** 30))
def test_clip_parameters_match_reference(clip_low, clip_high, dual_clip, seed):
    p = make_problem(2, 9, 8, 30, seed)
    compare(p, torch.float64, "torch", clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)


# One token per branch (clip_low = 0.2, clip_high = 0.28, dual_clip = 3), and two unclipped tokens:
#                       unclipped+  high clip  low clip  dual clip  unclipped-  unclipped- (ratio 2.5 < 3)
BRANCH_ADVANTAGES = [1.5, 0.7, -0.9, -1.2, -0.4, -2.0]
BRANCH_RATIOS = [1.1, 1.6, 0.5, 4.0, 0.9, 2.5]
BRANCH_LOSSES = [-1.5 * 1.1, -0.7 * 1.28, 0.9 * 0.8, 3.0 * 1.2, 0.4 * 0.9, 2.0 * 2.5]
CLIPPED = [False, True, True, True, False, False]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_each_clip_branch_forced(backend):
    T = len(BRANCH_ADVANTAGES)
    p = make_problem(1, T, 16, 50, seed=7, dtype=torch.float32, ratios=torch.tensor([BRANCH_RATIOS], dtype=torch.float64),
                     advantages=torch.tensor([BRANCH_ADVANTAGES], dtype=torch.float64),
                     mask=torch.ones(1, T, dtype=torch.int64))
    dev = device_of(backend)
    hidden = p["hidden"].float().to(dev).requires_grad_()
    stats = fused_sod_policy_loss(hidden, p["weight"].float().to(dev), p["y"].to(dev), p["old"].float().to(dev),
                                  p["adv"].float().to(dev), p["mask"].to(dev), reduction="none", return_stats=True,
                                  backend=backend)
    assert torch.allclose(stats.loss[0].double().cpu(), torch.tensor(BRANCH_LOSSES, dtype=torch.float64), rtol=1e-5)
    stats.loss.sum().backward()
    # A clipped token's loss is constant in logp_new: its hidden state gets exactly zero gradient.
    row_grad = hidden.grad[0].abs().sum(-1).cpu()
    for t, clipped in enumerate(CLIPPED):
        assert (row_grad[t] == 0) if clipped else (row_grad[t] > 0), t
    assert stats.clip_frac_high.item() == pytest.approx(1 / T)
    assert stats.clip_frac_low.item() == pytest.approx(1 / T)
    assert stats.clip_frac_dual.item() == pytest.approx(1 / T)
    ratios = torch.tensor(BRANCH_RATIOS, dtype=torch.float64)
    assert stats.mean_ratio.item() == pytest.approx(ratios.mean().item(), rel=1e-5)
    assert stats.approx_kl.item() == pytest.approx(((ratios - 1) - ratios.log()).mean().item(), rel=1e-4)
    assert torch.allclose(stats.logprobs.double().cpu(), p["old"] + ratios.log(), atol=1e-5)


def test_dual_clip_disabled():
    T = len(BRANCH_ADVANTAGES)
    p = make_problem(1, T, 8, 20, seed=1, ratios=torch.tensor([BRANCH_RATIOS], dtype=torch.float64),
                     advantages=torch.tensor([BRANCH_ADVANTAGES], dtype=torch.float64),
                     mask=torch.ones(1, T, dtype=torch.int64))
    stats = fused_sod_policy_loss(p["hidden"], p["weight"], p["y"], p["old"], p["adv"], p["mask"], dual_clip=None,
                                  reduction="none", return_stats=True)
    assert stats.loss[0, 3].item() == pytest.approx(1.2 * 4.0)  # -A * ratio, unbounded
    assert stats.clip_frac_dual.item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_tokens_do_not_count(backend):
    p = make_problem(2, 11, 12, 40, seed=3, dtype=torch.float32)
    p["mask"] = torch.ones(2, 11, dtype=torch.int64)
    p["mask"][0, :4] = 0
    p["mask"][1, 7:] = 0
    base, _ = ours(p, torch.float32, backend)
    # Garbage (even NaN) in masked-out positions changes nothing; the normalizer is the masked count.
    noisy = dict(p, old=p["old"].clone(), adv=p["adv"].clone(), y=p["y"].clone())
    off = p["mask"] == 0
    noisy["old"][off] = float("nan")
    noisy["adv"][off] = 1e6
    noisy["y"][off] = -100  # padding ids outside the vocabulary are never read
    again, _ = ours(noisy, torch.float32, backend)
    assert again.item() == pytest.approx(base.item(), rel=1e-6)
    per_token, _ = ours(p, torch.float32, backend, reduction="none")
    per_token = per_token.cpu()
    assert bool((per_token[off] == 0).all())
    assert base.item() == pytest.approx(per_token.sum().item() / int(p["mask"].sum()), rel=1e-6)
    total, _ = ours(p, torch.float32, backend, reduction="sum")
    assert total.item() == pytest.approx(per_token.sum().item(), rel=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_mask_gives_exact_zero_and_zero_gradients(backend):
    p = make_problem(2, 5, 8, 30, seed=2, dtype=torch.float32, bias=True, mask=torch.zeros(2, 5, dtype=torch.int64))
    stats, ins = ours(p, torch.float32, backend, return_stats=True)
    assert stats.loss.item() == 0.0 and not math.isnan(stats.loss.item())
    for t in ins:
        assert t.grad is not None and bool((t.grad == 0).all())
    for value in (stats.clip_frac_low, stats.clip_frac_high, stats.clip_frac_dual, stats.mean_ratio, stats.approx_kl):
        assert value.item() == 0.0


def test_single_sequence_input():
    p = make_problem(1, 13, 10, 33, seed=4)
    want, ref_ins = reference(p)
    hidden = p["hidden"][0].clone().requires_grad_()
    got = fused_sod_policy_loss(hidden, p["weight"], p["y"][0], p["old"][0], p["adv"][0], p["mask"][0])
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    assert torch.allclose(hidden.grad, ref_ins[0].grad[0], rtol=1e-9, atol=1e-12)


def test_gradients_reach_only_the_student():
    p = make_problem(2, 6, 8, 20, seed=9)
    old = p["old"].clone().requires_grad_()
    adv = p["adv"].clone().requires_grad_()
    hidden = p["hidden"].clone().requires_grad_()
    fused_sod_policy_loss(hidden, p["weight"], p["y"], old, adv, p["mask"]).backward()
    assert old.grad is None and adv.grad is None and hidden.grad is not None


def test_errors_name_the_argument():
    B, T, H, V = 2, 4, 8, 10
    base = dict(student_hidden=torch.randn(B, T, H), student_weight=torch.randn(V, H),
                target_ids=torch.randint(0, V, (B, T)), old_logprobs=torch.randn(B, T), advantages=torch.randn(B, T),
                response_mask=torch.ones(B, T, dtype=torch.int64))
    cases = [
        (dict(student_hidden=torch.randn(B, T, H + 1)), ValueError, "student_hidden"),
        (dict(student_weight=torch.randn(V, H).double()), TypeError, "student_weight"),
        (dict(target_ids=torch.full((B, T), V)), ValueError, "target_ids"),
        (dict(target_ids=torch.full((B, T), -1)), ValueError, "target_ids"),
        (dict(old_logprobs=torch.randn(B, T + 1)), ValueError, "old_logprobs"),
        (dict(old_logprobs=torch.zeros(B, T, dtype=torch.int64)), TypeError, "old_logprobs"),
        (dict(advantages=torch.randn(B)), ValueError, "advantages"),
        (dict(response_mask=torch.full((B, T), 2)), ValueError, "response_mask"),
        (dict(response_mask=torch.ones(B, T + 1)), ValueError, "response_mask"),
        (dict(clip_low=-0.1), ValueError, "clip_low"),
        (dict(clip_low=1.0), ValueError, "clip_low"),
        (dict(clip_high=float("nan")), ValueError, "clip_high"),
        (dict(dual_clip=1.0), ValueError, "dual_clip"),
        (dict(temperature=0), ValueError, "temperature"),
        (dict(reduction="mean"), ValueError, "reduction"),
        (dict(backend="cpu"), ValueError, "backend"),
        (dict(student_bias=torch.randn(V + 1)), ValueError, "student_bias"),
    ]
    for change, error, name in cases:
        with pytest.raises(error, match=name):
            fused_sod_policy_loss(**dict(base, **change))


def test_non_finite_hidden_states_raise():
    p = make_problem(1, 4, 8, 20, seed=5)
    p["hidden"][0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        fused_sod_policy_loss(p["hidden"], p["weight"], p["y"], p["old"], p["adv"], torch.ones(1, 4))
