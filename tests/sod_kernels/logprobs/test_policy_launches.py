"""The one-pass policy loss on the Triton backend: its launch budget, its closed-form PPO dual-clip derivative
and its results.

- launches per row chunk (tensor operations that launch a kernel on a GPU + Triton launches, counted by
  ``benchmarks.launches.LaunchCounter`` with the kernels stubbed) at most ``MAX_LAUNCHES_PER_CHUNK``, and no
  host synchronisation from the first chunk's first kernel to the last chunk's last one;
- the closed-form derivative (:func:`ppo_dual_clip_grad` in PyTorch, ``ppo_dual_clip_terms`` in Triton) equals
  torch autograd of ``reference.ref_ppo_dual_clip_loss`` (and of ``ppo_dual_clip`` without a dual clip),
  bitwise, on random inputs with exact ties at the clip and dual-clip boundaries and ratios at the clamp edges;
- ``fused_sod_policy_loss`` on the Triton backend matches the float64 reference at small odd sizes over
  several chunks, and gives bitwise-identical results for identical inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from benchmarks.launches import LaunchCounter
from reference import ref_ppo_dual_clip_loss, ref_token_logprobs
from sod_kernels import fused_sod_policy_loss, fused_token_logprobs
from sod_kernels.logprobs.kernels import ppo_dual_clip_terms
from sod_kernels.logprobs.policy_loss import ppo_dual_clip, ppo_dual_clip_grad
from tests.conftest import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
MAX_LAUNCHES_PER_CHUNK = 8
CLIP = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)


# ------------------------------------------------------------------------------------------------- launches
class OrderedCounter(LaunchCounter):
    """A LaunchCounter that also records every counted event in order: ``("op" | "kernel" | "sync", name)``."""

    def __init__(self):
        super().__init__(stub=True)
        self.events: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before_ops, before_syncs = sum(self.by_op.values()), sum(self.sync_ops.values())
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = getattr(func, "overloadpacket", func).__name__
        if sum(self.sync_ops.values()) > before_syncs:
            self.events.append(("sync", name))
        if sum(self.by_op.values()) > before_ops:
            self.events.append(("op", name))
        return out

    def _patch_triton(self) -> None:
        super()._patch_triton()
        counter = self
        for i, (cls, attr, original) in enumerate(self._patched):
            wrapped = getattr(cls, attr)

            def run(self_, *args, __wrapped=wrapped, **kwargs):
                if not kwargs.get("warmup"):
                    fn = getattr(self_, "fn", self_)
                    counter.events.append(("kernel", getattr(fn, "__name__", None) or
                                           getattr(getattr(fn, "fn", None), "__name__", "kernel")))
                return __wrapped(self_, *args, **kwargs)

            setattr(cls, attr, run)


def _policy_inputs(n, H, V, *, bias, contiguous, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    y = torch.randint(0, V, (n,), generator=g)
    old = -torch.rand(n, generator=g) * 8
    adv = torch.randn(n, generator=g)
    mask = torch.ones(n, dtype=torch.int64)
    if not contiguous:  # a prompt, a tool output and padding: rows are gathered
        mask[:3] = 0
        mask[n // 2: n // 2 + 2] = 0
        mask[-1] = 0
    return hidden, weight, b, y, old, adv, mask


def _count(chunks, chunk_size, *, bias, contiguous, H=8, V=64):
    """Counts of one forward whose distilled rows make exactly ``chunks`` chunks of ``chunk_size`` rows."""
    n = chunks * chunk_size + (0 if contiguous else 6)  # six rows masked out when not contiguous
    hidden, weight, b, y, old, adv, mask = _policy_inputs(n, H, V, bias=bias, contiguous=contiguous)
    assert int(mask.sum()) == chunks * chunk_size
    with OrderedCounter() as count:
        fused_sod_policy_loss(hidden, weight, y, old, adv, mask, student_bias=b, backend="triton",
                              chunk_size=chunk_size, check_inputs=False)
    return count


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_launches_per_chunk_and_no_sync_inside_the_loop(bias, contiguous):
    chunk, many = 8, 5
    one = _count(1, chunk, bias=bias, contiguous=contiguous)
    five = _count(many, chunk, bias=bias, contiguous=contiguous)
    per_chunk = (five.launches - one.launches) / (many - 1)
    assert per_chunk <= MAX_LAUNCHES_PER_CHUNK, (per_chunk, five.by_op, five.by_kernel)
    assert five.syncs == one.syncs, (five.sync_ops, one.sync_ops)
    assert five.by_kernel["policy_token_kernel"] == many
    # no host synchronisation from the first kernel of the first chunk to the last kernel of the last one
    kernels = [i for i, (kind, _) in enumerate(five.events) if kind == "kernel"]
    inside = five.events[kernels[0]: kernels[-1] + 1]
    assert not [name for kind, name in inside if kind == "sync"], inside
    # ... and no autograd: its backward nodes would show as extra operations in the loop
    assert five.by_op.get("where", 0) == one.by_op.get("where", 0)


MAX_LOGPROB_FORWARD_PER_CHUNK = 3   # product, statistics, logprob_token_kernel
MAX_LOGPROB_BACKWARD_PER_CHUNK = 5  # product, d(logits), d(hidden), the d(weight) fold's copy, d(bias)


def _count_logprobs(chunks, chunk_size, *, bias, contiguous, entropy, H=8, V=64):
    """``(forward counter, backward counter)`` of ``fused_token_logprobs`` over ``chunks`` chunks."""
    n = chunks * chunk_size + (0 if contiguous else 6)
    hidden, weight, b, y, _, _, mask = _policy_inputs(n, H, V, bias=bias, contiguous=contiguous)
    with OrderedCounter() as forward:
        out = fused_token_logprobs(hidden, weight, y, bias=b, backend="triton", chunk_size=chunk_size,
                                   return_entropy=entropy, check_inputs=False)
    lp, ent = out if entropy else (out, None)
    loss = (lp * mask).sum() + (0 if ent is None else (ent * mask).sum())
    with OrderedCounter() as backward:
        loss.backward()
    return forward, backward


@pytest.mark.parametrize("bias,contiguous,entropy", [(False, True, False), (True, True, True)])
def test_token_logprobs_launches_per_chunk(bias, contiguous, entropy):
    """``fused_token_logprobs`` (the two-pass contract: a forward and a recomputing backward) on the same diet."""
    chunk, many = 8, 5
    one = _count_logprobs(1, chunk, bias=bias, contiguous=contiguous, entropy=entropy)
    five = _count_logprobs(many, chunk, bias=bias, contiguous=contiguous, entropy=entropy)
    for k, limit in ((0, MAX_LOGPROB_FORWARD_PER_CHUNK), (1, MAX_LOGPROB_BACKWARD_PER_CHUNK)):
        per_chunk = (five[k].launches - one[k].launches) / (many - 1)
        assert per_chunk <= limit, (k, per_chunk, five[k].by_op, five[k].by_kernel)
        assert five[k].syncs == one[k].syncs, (k, five[k].sync_ops)
        kernels = [i for i, (kind, _) in enumerate(five[k].events) if kind == "kernel"]
        assert not [e for e in five[k].events[kernels[0]: kernels[-1] + 1] if e[0] == "sync"]


# ----------------------------------------------------------------------------------- closed-form derivative
def _exact_log(target: float, dtype, *, also_numpy: bool = False) -> list[float]:
    """Values ``t`` near ``log(target)`` whose ``torch.exp`` in ``dtype`` is exactly ``target`` rounded to
    ``dtype`` (and, with ``also_numpy``, whose NumPy ``exp``, what the Triton interpreter runs, is too)."""
    want = torch.tensor(target, dtype=dtype)
    x = torch.log(want)
    up, down = torch.tensor(math.inf, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)
    for _ in range(40):
        x = torch.nextafter(x, down)
    found = []
    for _ in range(80):
        x = torch.nextafter(x, up)
        if torch.exp(x) == want and (not also_numpy or np.exp(x.numpy()) == want.numpy()):
            found.append(x.item())
    assert found, (target, dtype)
    return found


def _dual_tie(target: float, dtype, *, also_numpy: bool = False) -> tuple[float, float]:
    """``(t, r)`` with ``r = exp(t)`` exactly in ``dtype`` (and in NumPy with ``also_numpy``) and ``r`` near
    ``target``: a dual clip of ``r`` ties ``-A ratio`` with its bound ``-r A`` (in float64 no ``t`` may give
    exactly 3)."""
    x = torch.log(torch.tensor(target, dtype=dtype))
    for _ in range(64):
        r = torch.exp(x)
        if not also_numpy or np.exp(x.numpy()) == r.numpy():
            return x.item(), r.item()
        x = torch.nextafter(x, torch.tensor(math.inf, dtype=dtype))
    raise AssertionError((target, dtype))


def _tie_inputs(dtype, lo=0.8, hi=1.28, dual=3.0, seed=0, n_random=400, *, also_numpy=False):
    """``(logp, old, adv, dual')``: random tokens, then exact ties (ratio at ``lo``, ``hi``, and at ``dual'``,
    the dual clip nearest ``dual`` that a ratio hits exactly, for ``A < 0``), log-ratios at and beyond the
    clamp edges ``+-20``, and zero advantages."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n_random, generator=g, dtype=torch.float64) * 6
    old = logp - torch.empty(n_random, dtype=torch.float64).uniform_(-1.6, 1.6, generator=g)
    adv = torch.randn(n_random, generator=g, dtype=torch.float64)
    adv[::17] = 0.0
    lp, od, ad = [logp], [old], [adv]
    t_dual, dual = _dual_tie(dual, dtype, also_numpy=also_numpy)
    ties = _exact_log(lo, dtype, also_numpy=also_numpy) + _exact_log(hi, dtype, also_numpy=also_numpy) + [t_dual]
    for t in ties:
        for a in (-1.3, -0.25, 0.0, 0.7, 2.0):
            lp.append(torch.tensor([t], dtype=torch.float64))  # old = 0: the log-ratio is exactly t
            od.append(torch.zeros(1, dtype=torch.float64))
            ad.append(torch.tensor([a], dtype=torch.float64))
    for d in (20.0, -20.0, 20.5, -20.5, 27.0, -33.0, 19.75, -19.75):
        for a in (-1.0, 0.5, -4.0):
            lp.append(torch.tensor([-0.5], dtype=torch.float64))  # logp - old is exactly d
            od.append(torch.tensor([-0.5 - d], dtype=torch.float64))
            ad.append(torch.tensor([a], dtype=torch.float64))
    logp, old, adv = (torch.cat(v).to(dtype) for v in (lp, od, ad))
    return logp, old, adv, dual


def _autograd(logp, old, adv, clip_low=0.2, clip_high=0.28, dual_clip=3.0):
    x = logp.clone().requires_grad_()
    if dual_clip is None:
        loss = ppo_dual_clip(x, old, adv, clip_low, clip_high, None)[0]
    else:
        loss = ref_ppo_dual_clip_loss(x, old, adv, torch.ones_like(adv), clip_low, clip_high, dual_clip,
                                      reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [(0.2, 0.28, 3.0), (0.2, 0.28, None), (0.0, 0.0, 1.5)])
def test_closed_form_derivative_equals_autograd(dtype, clip):
    lo, hi = 1.0 - clip[0], 1.0 + clip[1]
    logp, old, adv, dual = _tie_inputs(dtype, lo, hi, 3.0 if clip[2] is None else clip[2])
    clip = clip if clip[2] is None else (clip[0], clip[1], dual)
    d = logp - old
    # the construction really has ties and saturation
    ratio = torch.exp(torch.clamp(d, -20, 20))
    assert (ratio == torch.tensor(lo, dtype=dtype)).any() and (ratio == torch.tensor(hi, dtype=dtype)).any()
    assert (ratio == dual).any() and (d == 20).any() and (d == -20).any() and (d.abs() > 20).any()
    want_loss, want_grad = _autograd(logp, old, adv, *clip)
    loss, grad = ppo_dual_clip_grad(logp, old, adv, *clip)
    assert torch.equal(loss, want_loss)
    assert torch.equal(grad, want_grad), (grad - want_grad).abs().max()
    # the tie tokens took autograd's half-gradients (not just zero or the full -A ratio)
    if clip[2] is not None:
        half = (grad != 0) & (grad.abs() < 0.75 * (adv * ratio).abs())
        assert half.any()


@triton.jit
def terms_kernel(lp_ptr, old_ptr, adv_ptr, loss_ptr, grad_ptr, n, lo, hi, neg_dual, HAS_DUAL: tl.constexpr,
                 BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    loss, grad = ppo_dual_clip_terms(tl.load(lp_ptr + i, mask=ok), tl.load(old_ptr + i, mask=ok),
                                     tl.load(adv_ptr + i, mask=ok), lo, hi, neg_dual, HAS_DUAL)
    tl.store(loss_ptr + i, loss, mask=ok)
    tl.store(grad_ptr + i, grad, mask=ok)


def test_triton_closed_form_matches_autograd():
    """The kernel's ``ppo_dual_clip_terms`` through a tiny test kernel (the interpreter's exp is NumPy's: the
    tie tokens are the ones whose NumPy and torch exponentials agree; elsewhere a 1-ulp ratio difference)."""
    logp, old, adv, dual = _tie_inputs(torch.float32, seed=3, also_numpy=True)
    logp, old, adv = logp.to(DEVICE), old.to(DEVICE), adv.to(DEVICE)
    n = logp.numel()
    for clip in ((0.2, 0.28, dual), (0.2, 0.28, None)):
        loss, grad = torch.empty_like(logp), torch.empty_like(logp)
        terms_kernel[(triton.cdiv(n, 64),)](logp, old, adv, loss, grad, n, 1.0 - clip[0], 1.0 + clip[1],
                                            -1.0 if clip[2] is None else -clip[2], HAS_DUAL=clip[2] is not None,
                                            BLOCK=64)
        want_loss, want_grad = _autograd(logp.cpu(), old.cpu(), adv.cpu(), *clip)
        loss, grad = loss.cpu(), grad.cpu()
        assert torch.equal(grad == 0, want_grad == 0)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=0)
        if not HAS_CUDA:  # bitwise wherever the two exponentials agree (the ties among them by construction)
            log_ratio = torch.clamp(logp.cpu() - old.cpu(), -20, 20)
            same = torch.from_numpy(np.exp(log_ratio.numpy())) == torch.exp(log_ratio)
            assert same[400: 400 + 5 * 4].all()
            assert torch.equal(grad[same], want_grad[same]) and torch.equal(loss[same], want_loss[same])


# --------------------------------------------------------------------------------------- the loss itself
def _problem(n, H, V, seed, *, bias, mask_p=0.7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (n,), generator=g)
    mask = (torch.rand(n, generator=g) < mask_p).to(torch.int64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    with torch.no_grad():
        new = ref_token_logprobs(hidden, weight, y, b, 1.0)
    old = new - torch.empty(n, dtype=torch.float64).uniform_(math.log(0.25), math.log(5.0), generator=g)
    return hidden, weight, b, y, mask, old, adv


def _fused(p, **kw):
    hidden, weight, b, y, mask, old, adv = p
    ins = [t.float().to(DEVICE).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    loss = fused_sod_policy_loss(ins[0], ins[1], y.to(DEVICE), old.float().to(DEVICE), adv.float().to(DEVICE),
                                 mask.to(DEVICE), student_bias=ins[2], backend="triton", **kw)
    loss.backward()
    return loss.detach().cpu(), [None if t is None else t.grad.cpu() for t in ins]


@pytest.mark.parametrize("n,H,V,chunk,bias,kw", [
    (23, 7, 37, 5, True, {}),
    (17, 5, 29, 4, False, dict(reduction="sum", temperature=0.7)),
    (19, 6, 31, 3, True, dict(student_softcap=2.5, clip_low=0.1, clip_high=0.4, dual_clip=1.5)),
])
def test_triton_single_pass_matches_reference(n, H, V, chunk, bias, kw):
    p = _problem(n, H, V, seed=n, bias=bias)
    hidden, weight, b, y, mask, old, adv = p
    loss, grads = _fused(p, chunk_size=chunk, **kw)
    ins = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    temperature, cap = kw.get("temperature", 1.0), kw.get("student_softcap")
    if cap is None:
        logp = ref_token_logprobs(ins[0], ins[1], y, ins[2], temperature)
    else:
        z = ins[0] @ ins[1].T + ins[2]
        logp = torch.log_softmax(cap * torch.tanh(z / cap) / temperature, -1).gather(1, y[:, None]).squeeze(1)
    clip = {k: kw[k] for k in ("clip_low", "clip_high", "dual_clip") if k in kw}
    want = ref_ppo_dual_clip_loss(logp, old, adv, mask, **clip, reduction=kw.get("reduction", "token_mean"))
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * max(abs(want.item()), 1e-3)
    for got, ref in zip(grads, ins):
        if ref is not None:
            err = ((got.double() - ref.grad).norm() / ref.grad.norm().clamp(min=1e-30)).item()
            assert err <= 1e-4, err


def test_triton_single_pass_dual_clip_disabled_matches_two_pass():
    """Without a dual clip (no reference form): the single pass against the two-pass path (reduction="none",
    which recomputes the logits in backward through autograd of ``ppo_dual_clip``)."""
    p = _problem(21, 6, 33, seed=5, bias=False)
    loss, grads = _fused(p, chunk_size=4, dual_clip=None, reduction="sum")
    hidden, weight, b, y, mask, old, adv = p
    ins = [t.float().requires_grad_() for t in (hidden, weight)]
    per = fused_sod_policy_loss(ins[0], ins[1], y, old.float(), adv.float(), mask, dual_clip=None,
                                reduction="none", backend="triton")
    per.sum().backward()
    assert loss.item() == pytest.approx(per.sum().item(), rel=1e-5)
    for got, ref in zip(grads, ins):
        torch.testing.assert_close(got, ref.grad, rtol=1e-4, atol=1e-6)


def test_triton_single_pass_bias_gradient_only():
    """Only the bias needs a gradient: the pass writes d(logits) into a block of its own."""
    p = _problem(13, 5, 23, seed=4, bias=True)
    hidden, weight, b, y, mask, old, adv = p
    bias = b.float().requires_grad_()
    loss = fused_sod_policy_loss(hidden.float(), weight.float(), y, old.float(), adv.float(), mask,
                                 student_bias=bias, backend="triton", chunk_size=4)
    loss.backward()
    ref_bias = b.clone().requires_grad_()
    logp = ref_token_logprobs(hidden, weight, y, ref_bias, 1.0)
    want = ref_ppo_dual_clip_loss(logp, old, adv, mask)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    err = ((bias.grad.double() - ref_bias.grad).norm() / ref_bias.grad.norm()).item()
    assert err <= 1e-4


def test_triton_single_pass_is_deterministic():
    p = _problem(25, 6, 35, seed=9, bias=True)
    first = _fused(p, chunk_size=6)
    second = _fused(p, chunk_size=6)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


def test_triton_single_pass_stats_and_empty_mask():
    p = _problem(15, 5, 27, seed=2, bias=False)
    hidden, weight, b, y, mask, old, adv = p
    h = hidden.float().requires_grad_()
    stats = fused_sod_policy_loss(h, weight.float(), y, old.float(), adv.float(), mask, backend="triton",
                                  chunk_size=4, return_stats=True)
    logp = ref_token_logprobs(hidden, weight, y, None, 1.0)
    torch.testing.assert_close(stats.logprobs.double(), logp * mask, rtol=0, atol=1e-5)
    empty = torch.zeros_like(mask)
    loss = fused_sod_policy_loss(h, weight.float(), y, old.float(), adv.float(), empty, backend="triton",
                                 chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's NumPy max of a NaN row
@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_triton_single_pass_non_finite_inputs_raise(where):
    """The single pass's finiteness check reads its loss (NaN from any token's NaN log-prob)."""
    p = _problem(11, 5, 21, seed=6, bias=False)
    hidden, weight, b, y, mask, old, adv = (t.float() if t is not None and t.is_floating_point() else t for t in p)
    if where == "hidden":
        hidden[int(torch.nonzero(mask)[0]), 2] = float("nan")
    else:
        weight[3, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        fused_sod_policy_loss(hidden.requires_grad_(), weight.requires_grad_(), y, old, adv, mask, backend="triton",
                              chunk_size=4)
