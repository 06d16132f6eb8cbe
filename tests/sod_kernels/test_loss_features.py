"""Every single-process loss has every feature: logit soft-capping (student, and teacher where there is one),
``memory="fast"|"low"`` on both backends, and an ``nn.Module`` form with an explicit keyword signature.

Each is checked against the float64 reference on small odd sizes with masked tokens, on the torch backend and
on the Triton backend (under the interpreter on CPU).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from reference.sod_reference import (ref_fused_sod_loss, ref_logits, ref_ppo_dual_clip_loss, ref_step_ids_from_mask,
                                     ref_token_logprobs)
from reference.sparse_reference import ref_sparse_sod_loss, ref_topk_logprobs
from sod_kernels import (FusedTokenLogprobs, SODLoss, SODPolicyLoss, SparseSODLoss, VocabParallelSODLoss,
                         VocabParallelSparseSODLoss, fused_sod_loss,
                         fused_sod_policy_loss, fused_sparse_sod_loss, fused_token_logprobs, fused_topk_logprobs)

B, T, HS, HT, V, K = 2, 7, 6, 5, 37, 5
BACKENDS = ["torch", "triton"]
MEMORY = ["fast", "low"]


def _tol(backend: str) -> dict:
    return dict(rtol=1e-9, atol=1e-11) if backend == "torch" else dict(rtol=2e-4, atol=2e-6)


def _dtype(backend: str) -> torch.dtype:
    return torch.float64 if backend == "torch" else torch.float32


def _inputs(seed: int, scale: float = 8.0) -> dict:
    """float64 inputs whose raw logits reach several caps (so a cap of 2 bites)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    mask = torch.zeros(B, T, dtype=torch.int64)
    mask[0, 1:3] = 1
    mask[0, 4:7] = 1
    mask[1, 0:2] = 1
    mask[1, 5] = 1
    return {"sh": rnd(B, T, HS) * scale / math.sqrt(HS), "sw": rnd(V, HS), "sb": rnd(V),
            "th": rnd(B, T, HT) * scale / math.sqrt(HT), "tw": rnd(V + 3, HT), "tb": rnd(V + 3),
            "mask": mask, "y": torch.randint(0, V, (B, T), generator=g)}


def _leaves(x: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    return [x[k].to(dtype).detach().clone().requires_grad_() for k in ("sh", "sw", "sb")]


def _check(got_loss, got_leaves, want_loss, want_leaves, backend):
    torch.testing.assert_close(got_loss.double(), want_loss.detach(), **_tol(backend))
    upstream = torch.rand(want_loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (got_loss.double() * upstream).sum().backward()
    (want_loss * upstream).sum().backward()
    for g, w in zip(got_leaves, want_leaves):
        tol = _tol(backend)
        torch.testing.assert_close(g.grad.double(), w.grad, rtol=tol["rtol"],
                                   atol=tol["atol"] * max(w.grad.abs().max().item(), 1.0))


def _topk(x: dict, k: int = K):
    """The teacher's top-k log-probs (float64 reference), distinct ids per position."""
    return ref_topk_logprobs(x["th"], x["tw"][:V], k, x["tb"][:V], 1.0)


# ------------------------------------------------------------------------------------------ sparse teacher
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("divergence,step_divergence,reduction", [("reverse_kl", "kl", "token_mean"),
                                                                   ("forward_kl", "sampled", "sum"),
                                                                   ("reverse_kl", "sampled", "none")])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_sparse_softcap_and_memory_match_the_reference(backend, memory, divergence, step_divergence, reduction,
                                                       softcap):
    x = _inputs(11)
    ids, a = _topk(x)
    options = dict(target_ids=x["y"], divergence=divergence, step_divergence=step_divergence, temperature=0.9,
                   coef=1.1, reduction=reduction)
    got = _leaves(x, _dtype(backend))
    loss = fused_sparse_sod_loss(got[0], got[1], ids, a.to(_dtype(backend)), x["mask"], student_bias=got[2],
                                 backend=backend, memory=memory, student_softcap=softcap, **options)
    want = _leaves(x, torch.float64)
    ref, _ = ref_sparse_sod_loss(want[0], want[1], ids, a.to(_dtype(backend)), x["mask"], student_bias=want[2],
                                 student_softcap=softcap, **options)
    if softcap is not None:
        uncapped, _ = ref_sparse_sod_loss(want[0], want[1], ids, a, x["mask"], student_bias=want[2], **options)
        assert (uncapped - ref).abs().max() > 0.05 * ref.abs().max()  # the cap changes the loss
    _check(loss, got, ref, want, backend)


# ------------------------------------------------------------------------------ memory modes, other losses
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_dense_memory_modes_match_the_reference(backend, memory, reduction):
    x = _inputs(12)
    options = dict(target_ids=x["y"], step_divergence="sampled", temperature=1.1, coef=0.9, reduction=reduction,
                   student_softcap=2.5, teacher_softcap=3.0)
    got = _leaves(x, _dtype(backend))
    loss = fused_sod_loss(got[0], got[1], x["th"].to(_dtype(backend)), x["tw"].to(_dtype(backend)), x["mask"],
                          student_bias=got[2], teacher_bias=x["tb"].to(_dtype(backend)), backend=backend,
                          memory=memory, **options)
    want = _leaves(x, torch.float64)
    ref, _ = ref_fused_sod_loss(want[0], want[1], x["th"].to(_dtype(backend)).double(),
                                x["tw"].to(_dtype(backend)).double(), x["mask"], student_bias=want[2],
                                teacher_bias=x["tb"].to(_dtype(backend)).double(), **options)
    _check(loss, got, ref, want, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", MEMORY)
def test_token_logprobs_memory_modes_match_the_reference(backend, memory):
    x = _inputs(13)
    got = _leaves(x, _dtype(backend))
    logp, entropy = fused_token_logprobs(got[0], got[1], x["y"], bias=got[2], temperature=0.8, backend=backend,
                                         memory=memory, softcap=2.0, return_entropy=True)
    want = _leaves(x, torch.float64)
    ref = ref_token_logprobs(want[0], want[1], x["y"], want[2], 0.8, softcap=2.0)
    torch.testing.assert_close(logp.double(), ref.detach(), **_tol(backend))
    _check(logp + 0.3 * entropy, got, ref + 0.3 * _ref_entropy(want, 0.8, 2.0), want, backend)


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_topk_logprobs_softcap_and_memory_match_the_reference(memory, softcap):
    """The teacher-side producer (no backend choice, no gradient): float32 top-k against float64 (a saturating
    cap makes near-ties that rounding may swap, so: the reference's values, and its log-probs at the ids)."""
    x = _inputs(16)
    th, tw, tb = (x[k].float() for k in ("th", "tw", "tb"))
    ids, lp = fused_topk_logprobs(th, tw[:V], K, bias=tb[:V], temperature=0.8, softcap=softcap, memory=memory)
    ref_ids, ref_lp = ref_topk_logprobs(th.double(), tw[:V].double(), K, tb[:V].double(), 0.8, softcap=softcap)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=2e-5)
    logp = torch.log_softmax(ref_logits(th.double(), tw[:V].double(), tb[:V].double(), 0.8, softcap=softcap), -1)
    torch.testing.assert_close(lp.double(), logp.gather(-1, ids), rtol=0, atol=2e-5)
    if softcap is not None:
        _, uncapped = ref_topk_logprobs(th.double(), tw[:V].double(), K, tb[:V].double(), 0.8)
        assert (uncapped - ref_lp).abs().max() > 0.05  # the cap changes the result


def _ref_entropy(leaves, temperature, softcap):
    logp = torch.log_softmax(ref_logits(leaves[0], leaves[1], leaves[2], temperature, softcap=softcap), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_policy_loss_memory_modes_match_the_reference(backend, memory, reduction):
    x = _inputs(14)
    g = torch.Generator().manual_seed(4)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2.0
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    got = _leaves(x, _dtype(backend))
    loss = fused_sod_policy_loss(got[0], got[1], x["y"], old.to(_dtype(backend)), adv.to(_dtype(backend)),
                                 x["mask"], student_bias=got[2], temperature=0.9, reduction=reduction,
                                 backend=backend, memory=memory, student_softcap=2.0)
    want = _leaves(x, torch.float64)
    logp = ref_token_logprobs(want[0], want[1], x["y"], want[2], 0.9, softcap=2.0)
    ref = ref_ppo_dual_clip_loss(logp, old.to(_dtype(backend)).double(), adv.to(_dtype(backend)).double(),
                                 x["mask"], reduction=reduction)
    _check(loss, got, ref, want, backend)


# ----------------------------------------------------------------------------------------- module forms
def _no_opaque_options(cls) -> None:
    for fn in (cls.__init__, cls.forward):
        kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds, fn


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_forms_equal_their_functions(backend):
    x = _inputs(15)
    dt = _dtype(backend)
    sh, sw, sb, th, tw, tb = (x[k].to(dt) for k in ("sh", "sw", "sb", "th", "tw", "tb"))
    ids, a = _topk(x)
    steps = ref_step_ids_from_mask(x["mask"])
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(5), dtype=dt)
    old, adv = torch.full((B, T), -3.0, dtype=dt), torch.linspace(-1, 1, B * T, dtype=dt).view(B, T)
    common = dict(backend=backend, memory="low", temperature=0.7)
    cases = [
        (SODLoss(divergence="forward_kl", coef=2.0, student_softcap=3.0, **common),
         (sh, sw, th, tw), dict(step_ids=steps, token_weights=weights, student_bias=sb, teacher_bias=tb),
         lambda *a, **k: fused_sod_loss(*a, divergence="forward_kl", coef=2.0, student_softcap=3.0, **common, **k)),
        (SODLoss(divergence="jsd", beta=0.3, hard_loss_weight=0.5, **common),
         (sh, sw, th, tw), dict(step_ids=steps, target_ids=x["y"]),
         lambda *a, **k: fused_sod_loss(*a, divergence="jsd", beta=0.3, hard_loss_weight=0.5, **common, **k)),
        (SparseSODLoss(step_divergence="sampled", student_softcap=2.0, **common),
         (sh, sw, ids, a.to(dt), x["mask"]), dict(target_ids=x["y"], student_bias=sb),
         lambda *a, **k: fused_sparse_sod_loss(*a, step_divergence="sampled", student_softcap=2.0, **common, **k)),
        (SparseSODLoss(divergence="jsd", beta=0.6, hard_loss_weight=0.25, **common),
         (sh, sw, ids, a.to(dt), x["mask"]), dict(target_ids=x["y"]),
         lambda *a, **k: fused_sparse_sod_loss(*a, divergence="jsd", beta=0.6, hard_loss_weight=0.25, **common,
                                               **k)),
        (SODPolicyLoss(clip_low=0.1, reduction="sum", **common),
         (sh, sw, x["y"], old, adv, x["mask"]), dict(student_bias=sb),
         lambda *a, **k: fused_sod_policy_loss(*a, clip_low=0.1, reduction="sum", **common, **k)),
        (FusedTokenLogprobs(return_entropy=True, softcap=2.0, **common),
         (sh, sw, x["y"]), dict(bias=sb),
         lambda *a, **k: fused_token_logprobs(*a, return_entropy=True, softcap=2.0, **common, **k)),
    ]
    for module, args, kwargs, fn in cases:
        _no_opaque_options(type(module))
        got, want = module(*args, **kwargs), fn(*args, **kwargs)
        for g_, w_ in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(g_, w_), type(module).__name__
        assert "memory='low'" in repr(module)


def test_module_constructors_take_options_only():
    for cls in (SODLoss, SparseSODLoss, SODPolicyLoss, FusedTokenLogprobs):
        for name in ("step_ids", "target_ids", "token_weights", "student_bias", "bias", "response_mask"):
            with pytest.raises(TypeError):
                cls(**{name: torch.zeros(1)})


@pytest.mark.parametrize("cls, option, value", [
    (SODLoss, "divergence", "jsdx"), (SODLoss, "epsilon", 0.0), (SODLoss, "memory", "medium"),
    (SODLoss, "teacher_softcap", -1.0), (SparseSODLoss, "reduction", "mean"), (SparseSODLoss, "chunk_size", 0),
    (SparseSODLoss, "student_softcap", float("nan")), (SODPolicyLoss, "clip_low", 1.5),
    (SODPolicyLoss, "backend", "cuda"), (FusedTokenLogprobs, "temperature", 0.0), (FusedTokenLogprobs, "softcap", 0.0),
    (SODLoss, "beta", 1.5), (SODLoss, "beta", "half"), (SODLoss, "hard_loss_weight", -0.1),
    (SparseSODLoss, "beta", float("nan")), (SparseSODLoss, "hard_loss_weight", float("inf")),
    (VocabParallelSODLoss, "beta", -0.5), (VocabParallelSparseSODLoss, "hard_loss_weight", -1),
])
def test_module_constructors_check_their_options(cls, option, value):
    """A bad option is refused when the module is built (naming it), not at its first forward."""
    with pytest.raises((ValueError, TypeError), match=option):
        cls(**{option: value})
