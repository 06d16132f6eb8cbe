"""The sparse-teacher single pass on the Triton backend (``fused_sparse_sod_loss``, memory="fast"): its launch
budget, its results against the float64 reference and its reproducibility.

- launches per row chunk (tensor operations that launch a kernel on a GPU + Triton launches, counted by
  ``benchmarks.launches.LaunchCounter`` with the kernels stubbed) at most ``MAX_LAUNCHES_PER_CHUNK`` for every
  weighting ("kl" and "sampled" step weights, "none", ``token_weights``), divergence (reverse / forward KL,
  JSD), with and without the hard-label term and a bias, and no host synchronisation from the first chunk's
  first kernel to the last chunk's last one;
- the fused row math (float32, in ``sparse_rows_kernel``) against ``reference.ref_sparse_sod_loss`` in
  float64 at small odd sizes over several chunks: bias, soft-cap, temperature, k < V and k = V, sampled tokens
  among the ids or not (the hard term's one-hot column in the id part or in the tail kernel), JSD;
- bitwise-identical results for identical inputs.
"""

from __future__ import annotations

import pytest
import torch

from reference import ref_sparse_sod_loss
from sod_kernels import fused_sparse_sod_loss
from sod_kernels.sparse import triton_backend as sparse_triton
from tests.sod_kernels.logprobs.test_policy_launches import OrderedCounter

MAX_LAUNCHES_PER_CHUNK = 8
STEP = 4          # rows per step in the launch-count problems (two steps per chunk)


# ------------------------------------------------------------------------------------------------- launches
def _count(chunks: int, *, weighting: str, divergence: str, hard: float, bias: bool, contiguous: bool,
           H: int = 8, V: int = 64, k: int = 5):
    """Counts of one forward whose distilled rows make exactly ``chunks`` chunks of ``2 STEP`` rows."""
    chunk = 2 * STEP
    n_active = chunks * chunk
    n = n_active + (0 if contiguous else 3)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)[:, :k]
    y = torch.randint(0, V, (n,), generator=g)
    step_ids = torch.arange(n_active) // STEP
    if not contiguous:  # a prompt row, a tool output and padding: rows are gathered
        step_ids = torch.cat([torch.tensor([-1]), step_ids[: n_active // 2], torch.tensor([-1]),
                              step_ids[n_active // 2:], torch.tensor([-1])])
    kw = dict(step_ids=step_ids, target_ids=y, divergence=divergence, hard_loss_weight=hard, student_bias=b,
              backend="triton", chunk_size=chunk, check_inputs=False)
    if weighting == "token_weights":
        kw["token_weights"] = torch.rand(n, generator=g)
    else:
        kw["step_divergence"] = weighting
    with OrderedCounter() as count:
        fused_sparse_sod_loss(hidden, weight, ids, lp, **kw)
    return count


CASES = [
    ("kl", "reverse_kl", 0.0, False, True),
    ("kl", "forward_kl", 0.5, True, False),
    ("kl", "jsd", 0.0, True, True),
    ("sampled", "reverse_kl", 0.3, False, False),
    ("sampled", "jsd", 0.3, True, True),
    ("none", "reverse_kl", 0.0, True, True),
    ("none", "forward_kl", 0.4, False, False),
    ("token_weights", "reverse_kl", 0.0, False, True),
    ("token_weights", "jsd", 0.7, True, False),
]


@pytest.mark.parametrize("weighting,divergence,hard,bias,contiguous", CASES)
def test_launches_per_chunk_and_no_sync_inside_the_loop(weighting, divergence, hard, bias, contiguous):
    many = 5
    kw = dict(weighting=weighting, divergence=divergence, hard=hard, bias=bias, contiguous=contiguous)
    one, five = _count(1, **kw), _count(many, **kw)
    per_chunk = (five.launches - one.launches) / (many - 1)
    assert per_chunk <= MAX_LAUNCHES_PER_CHUNK, (per_chunk, five.by_op, five.by_kernel)
    assert five.syncs == one.syncs, (five.sync_ops, one.sync_ops)
    assert five.by_kernel["sparse_rows_kernel"] == many           # the fused pass ran, once per chunk
    steps = weighting in ("kl", "sampled")
    assert five.by_kernel.get("sparse_step_weights_kernel", 0) == (many if steps else 0)
    # no host synchronisation from the first kernel of the first chunk to the last kernel of the last one
    kernels = [i for i, (kind, _) in enumerate(five.events) if kind == "kernel"]
    inside = five.events[kernels[0]: kernels[-1] + 1]
    assert not [name for kind, name in inside if kind == "sync"], inside


# --------------------------------------------------------------------------------------- against float64
def _problem(B, T, H, V, k, seed, *, bias, listed):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    sw = torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H ** 0.5
    sb = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    logp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)
    ids = torch.rand(B, T, V, generator=g).argsort(-1)[..., :k]
    a = logp.gather(-1, ids).float()
    if listed == "all":
        y = ids[..., k // 2]
    else:
        y = torch.randint(0, V, (B, T), generator=g)
        if listed == "none":  # a token outside the ids (k < V)
            inside = (ids == y[..., None]).any(-1)
            outside = torch.rand(B, T, V, generator=g).masked_fill(torch.zeros(B, T, V, dtype=torch.bool)
                                                                   .scatter(-1, ids, True), -1).argmax(-1)
            y = torch.where(inside, outside, y)
        else:
            y = torch.where(torch.rand(B, T, generator=g) < 0.5, ids[..., 0], y)
    step_ids = torch.full((B, T), -1)
    for b_, bounds in enumerate(([1, 4, 6, 9], [0, 2, 7, 8, 11])):
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            step_ids[b_ % B, lo:min(hi, T)] = s
    return sh, sw, sb, ids, a, y, step_ids


def _fused(p, *, weighting, chunk, reduction="token_mean", **kw):
    sh, sw, sb, ids, a, y, step_ids = p
    leaves = [x.float().requires_grad_() for x in (sh, sw) + (() if sb is None else (sb,))]
    extra = {}
    if weighting == "token_weights":
        extra["token_weights"] = torch.rand(step_ids.shape, generator=torch.Generator().manual_seed(7))
    else:
        extra["step_divergence"] = weighting
    stats = fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, step_ids=step_ids, target_ids=y,
                                  student_bias=None if sb is None else leaves[2], backend="triton", chunk_size=chunk,
                                  reduction=reduction, coef=0.7, epsilon=1e-4, delta=0.25, return_stats=True,
                                  **extra, **kw)
    stats.loss.backward()
    return stats, [x.grad for x in leaves], extra


EXACT_CASES = [
    # (B, T, H, V, k, chunk, weighting, options, listed)
    (2, 9, 5, 23, 6, 5, "kl", dict(), "mixed"),
    (2, 11, 7, 29, 7, 7, "kl", dict(divergence="forward_kl", hard_loss_weight=0.5), "all"),
    (2, 11, 6, 31, 5, 6, "sampled", dict(divergence="jsd", beta=0.3, hard_loss_weight=0.4), "none"),
    (2, 9, 5, 19, 19, 5, "kl", dict(divergence="jsd", student_softcap=2.5, temperature=0.7), "all"),
    (2, 9, 5, 17, 17, 5, "none", dict(hard_loss_weight=0.3, temperature=1.6), "mixed"),
    (2, 11, 3, 37, 4, 3, "token_weights", dict(divergence="forward_kl", student_softcap=3.0), "none"),
    (1, 9, 6, 27, 9, 4, "none", dict(divergence="jsd", hard_loss_weight=1.0, student_softcap=1.5), "none"),
    (2, 9, 4, 21, 3, 5, "sampled", dict(temperature=0.6, hard_loss_weight=0.2), "all"),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,T,H,V,k,chunk,weighting,options,listed", EXACT_CASES)
def test_fused_single_pass_matches_the_float64_reference(B, T, H, V, k, chunk, weighting, options, listed, bias,
                                                         monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the torch row math ran instead of the fused kernels")
    monkeypatch.setattr(sparse_triton, "_single_pass_torch_rows", refuse)
    p = _problem(B, T, H, V, k, seed=B * T + V + k, bias=bias, listed=listed)
    stats, grads, extra = _fused(p, weighting=weighting, chunk=chunk, **options)
    sh, sw, sb, ids, a, y, step_ids = p
    ref_leaves = [x.clone().requires_grad_() for x in (sh, sw) + (() if sb is None else (sb,))]
    tw = extra.get("token_weights")
    want, ref = ref_sparse_sod_loss(ref_leaves[0], ref_leaves[1], ids, a, step_ids=step_ids, target_ids=y,
                                    student_bias=None if sb is None else ref_leaves[2], coef=0.7, epsilon=1e-4,
                                    delta=0.25, token_weights=None if tw is None else tw.double(),
                                    step_divergence="none" if weighting == "token_weights" else weighting, **options)
    want.backward()
    assert abs(stats.loss.item() - want.item()) <= 1e-5 * abs(want.item()), (stats.loss.item(), want.item())
    got_D = stats.token_divergence.double()
    assert torch.allclose(got_D, ref["token_divergence"].detach().clamp(min=0), rtol=1e-4, atol=2e-6)
    for got, leaf in zip(grads, ref_leaves):
        err = ((got.double() - leaf.grad).norm() / leaf.grad.norm()).item()
        assert err <= 1e-4, err


def test_bfloat16_inputs_and_only_a_bias_gradient():
    p = _problem(2, 9, 5, 23, 6, seed=3, bias=True, listed="mixed")
    sh, sw, sb, ids, a, y, step_ids = p
    bias = sb.float().requires_grad_()
    loss = fused_sparse_sod_loss(sh.float(), sw.float(), ids, a, step_ids=step_ids, target_ids=y, student_bias=bias,
                                 backend="triton", chunk_size=5, hard_loss_weight=0.3)
    loss.backward()
    ref_bias = sb.clone().requires_grad_()
    want, _ = ref_sparse_sod_loss(sh, sw, ids, a, step_ids=step_ids, target_ids=y, student_bias=ref_bias,
                                  hard_loss_weight=0.3)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert ((bias.grad.double() - ref_bias.grad).norm() / ref_bias.grad.norm()).item() <= 1e-4
    leaves = [x.to(torch.bfloat16).requires_grad_() for x in (sh, sw, sb)]
    loss16 = fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, step_ids=step_ids, target_ids=y,
                                   student_bias=leaves[2], backend="triton", chunk_size=5, divergence="jsd")
    loss16.backward()
    ref16 = [x.detach().double().requires_grad_() for x in leaves]
    want16, _ = ref_sparse_sod_loss(ref16[0], ref16[1], ids, a, step_ids=step_ids, student_bias=ref16[2],
                                    divergence="jsd")
    want16.backward()
    assert abs(loss16.item() - want16.item()) <= 1e-4 * abs(want16.item())
    for got, ref in zip(leaves, ref16):
        assert ((got.grad.double() - ref.grad).norm() / ref.grad.norm()).item() <= 2e-2


def test_unknown_weight_functions_keep_the_torch_row_math():
    """A weight callable that is not one of ``single_pass_plan``'s runs the torch row math, chunk by chunk."""
    p = _problem(2, 9, 5, 23, 6, seed=5, bias=False, listed="mixed")
    sh, sw, _, ids, a, y, step_ids = p
    rows = torch.nonzero(step_ids.reshape(-1) >= 0).squeeze(1)
    problem = sparse_triton.SparseProblem.build(sh.float().reshape(-1, 5), sw.float(), None, rows,
                                                ids.reshape(-1, 6)[rows], a.reshape(-1, 6)[rows], None,
                                                "reverse_kl", 1.0)
    n = rows.numel()
    chunks = [(0, 4), (4, n)]
    assert sparse_triton._weight_source(lambda a_, b_, D, s: torch.ones_like(D), n) is None
    kw = dict(coef=1.0, normalizer=float(n), need_hidden=True, need_weight=False, need_bias=False)
    twice = sparse_triton.single_pass_loss(problem, chunks, lambda a_, b_, D, s: 2 * torch.ones_like(D), **kw)
    from sod_kernels.steps.finish import single_pass_plan
    _, ones = single_pass_plan(step_ids, rows, None, "none", 1e-4, 0.2, 4, 23, 4)
    assert sparse_triton._weight_source(ones, n)[0] == "ones"
    once = sparse_triton.single_pass_loss(problem, chunks, ones, **kw)
    assert torch.allclose(twice.loss, 2 * once.loss, rtol=1e-6)
    assert torch.allclose(twice.D, once.D, rtol=1e-5, atol=2e-6)
    assert torch.allclose(twice.grads[0], 2 * once.grads[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("weighting,options", [("kl", dict(divergence="jsd", hard_loss_weight=0.3,
                                                            student_softcap=2.0)),
                                                ("sampled", dict(divergence="forward_kl")),
                                                ("token_weights", dict(hard_loss_weight=0.5))])
def test_bitwise_reproducible(weighting, options):
    p = _problem(2, 11, 6, 29, 7, seed=11, bias=True, listed="mixed")
    first, g1, _ = _fused(p, weighting=weighting, chunk=6, **options)
    second, g2, _ = _fused(p, weighting=weighting, chunk=6, **options)
    assert torch.equal(first.loss, second.loss)
    assert torch.equal(first.token_divergence, second.token_divergence)
    for a_, b_ in zip(g1, g2):
        assert torch.equal(a_, b_)
