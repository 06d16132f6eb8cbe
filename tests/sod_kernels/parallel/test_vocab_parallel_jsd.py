"""The generalized JSD (``divergence="jsd"``, ``beta``) and the hard-label term (``hard_loss_weight``) of the
vocabulary-parallel losses, dense and sparse teacher, on 2 gloo ranks (uneven shards, a padded teacher shard,
masked tokens) against the float64 reference with the full heads: the loss and each rank's student gradients
(hidden, its weight and bias rows), on the torch backend in float64 / float32 and on the Triton backend (the
interpreter on CPU) in float32.  One spawned group runs every check (spawning costs seconds)."""

from __future__ import annotations

import pytest
import torch

from reference.sod_reference import ref_fused_sod_loss
from reference.sparse_reference import ref_sparse_sod_loss
from sod_kernels import fused_topk_logprobs
from sod_kernels.parallel.losses import vocab_parallel_sod_loss
from sod_kernels.parallel.sparse import vocab_parallel_sparse_sod_loss
from tests.sod_kernels.parallel.test_vocab_parallel import (TEACHER_PAD, TOL, Ctx, _grads, problem, rand_like, rel,
                                                            run_ranks, same_on_every_rank, shard)

DENSE_CASES = [  # options of one call; "bias", "single", "scale", "hard" (lambda) and "caps" shape the problem
    {"divergence": "jsd", "beta": 0.3, "temperature": 0.7, "bias": True},
    {"divergence": "jsd", "beta": 0.8, "caps": True, "scale": 6.0, "hard": 0.6, "step_divergence": "sampled",
     "return_stats": True, "reduction": "sum"},
    {"divergence": "jsd", "beta": 0.5, "single": True, "hard": 0.3, "coef": 0.5, "temperature": 1.3},
    {"divergence": "jsd", "beta": 0.3, "coef": 0.0, "hard": 1.0, "bias": True},   # the hard term alone
    {"divergence": "reverse_kl", "hard": 1.0, "temperature": 1.3, "bias": True, "reduction": "none"},
    {"divergence": "forward_kl", "hard": 0.4, "caps": True, "token_weights": True},
]
SPARSE_CASES = [  # as DENSE_CASES, plus k (the teacher's top-k; "V": every id listed, no tail)
    {"k": 4, "divergence": "jsd", "beta": 0.3, "temperature": 0.8, "bias": True},
    {"k": "V", "divergence": "jsd", "beta": 0.8, "hard": 0.5, "step_divergence": "sampled", "caps": True},
    {"k": 5, "divergence": "jsd", "beta": 0.5, "hard": 0.7, "single": True, "scale": 6.0, "return_stats": True},
    {"k": 3, "divergence": "reverse_kl", "hard": 0.7, "bias": True, "reduction": "sum"},
    {"k": 2, "divergence": "forward_kl", "hard": 0.4, "step_divergence": "none", "reduction": "none",
     "caps": True},
]


def _d64(x):
    return None if x is None else x.detach().double().requires_grad_(x.requires_grad)


def _split(case: dict, p: dict, dtype):
    """``(options of the call, return_stats, hard)`` from a case (the problem's keys already removed)."""
    case = dict(case)
    hard = case.pop("hard", 0.0)
    opts = {"divergence": case.pop("divergence"), "beta": case.pop("beta", 0.5), "hard_loss_weight": hard,
            "step_divergence": case.pop("step_divergence", None), "reduction": case.pop("reduction", "token_mean"),
            "temperature": case.pop("temperature", 1.0), "coef": case.pop("coef", 1.0)}
    if case.pop("token_weights", False):
        opts["token_weights"] = p["tok_w"].to(dtype)
    return_stats = case.pop("return_stats", False)
    assert not case, case
    return opts, return_stats


def _problem(case: dict, ctx: Ctx, dtype, seed: int, **kw):
    case = dict(case)
    p = problem(seed, ctx.vocab, dtype, bias=case.pop("bias", False), single=case.pop("single", False),
                scale=case.pop("scale", 1.5), **kw)
    return p, case


def _ref_options(opts: dict) -> dict:
    return dict(opts, step_divergence=opts["step_divergence"] or ("none" if "token_weights" in opts else "kl"))


def compare_to_reference(ctx: Ctx, tag: str, out, ref, seed: int, mine, ref_in, tol_v: float, tol_g: float,
                         ref_stats=None) -> None:
    """The loss (the same on every rank) and the gradients of ``mine`` (hidden, this rank's weight and bias
    rows) against the float64 reference's."""
    loss = out.loss if ref_stats is not None else out
    same_on_every_rank(loss, tag)
    assert rel(loss, ref) <= tol_v, (tag, loss, ref)
    if ref_stats is not None:
        assert rel(out.token_divergence, ref_stats["token_divergence"].clamp(min=0)) <= tol_v, tag
        assert rel(out.token_weights, ref_stats["token_weights"]) <= tol_v, tag
    upstream = rand_like(loss, seed)
    grads = _grads((loss * upstream).sum(), mine)
    oracle = _grads((ref * upstream.double()).sum(), ref_in)
    for name, a, c in zip(("hidden", "weight", "bias"), grads, oracle):
        c = c if name == "hidden" else c[ctx.rows]
        assert a.dtype == mine[0].dtype and rel(a, c) <= tol_g, (tag, name, rel(a, c))
    same_on_every_rank(grads[0], tag + " d(hidden)")


# ------------------------------------------------------------------------------------------ dense teacher
def dense_call(ctx: Ctx, p: dict, case: dict, dtype, backend: str = "torch", chunk_size: int | None = None):
    """``(out, ref, ref_stats, mine, ref_in)`` of one dense case on this rank's shards (padded teacher shard)."""
    case = dict(case)
    caps = dict(student_softcap=2.0, teacher_softcap=3.0) if case.pop("caps", False) else {}
    opts, return_stats = _split(case, p, dtype)
    sw, sb = shard(p["sw"], ctx), None if p["sb"] is None else shard(p["sb"], ctx)
    tw, tb = shard(p["tw"], ctx, TEACHER_PAD), None if p["tb"] is None else shard(p["tb"], ctx, TEACHER_PAD)
    out = vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], vocab_start=ctx.start, target_ids=p["y"],
                                  student_bias=sb, teacher_bias=tb, return_stats=return_stats, backend=backend,
                                  chunk_size=chunk_size, **caps, **opts)
    ref_in = {k: _d64(p[k]) for k in ("sh", "sw", "th", "tw", "sb", "tb")}
    ref, stats = ref_fused_sod_loss(ref_in["sh"], ref_in["sw"], ref_in["th"], ref_in["tw"], p["mask"],
                                    target_ids=p["y"], student_bias=ref_in["sb"], teacher_bias=ref_in["tb"],
                                    **caps, **_ref_options(opts))
    return out, ref, stats if return_stats else None, [p["sh"], sw, sb], [ref_in["sh"], ref_in["sw"], ref_in["sb"]]


def check_dense(ctx: Ctx, dtype, seed: int) -> None:
    tol_v, tol_g = TOL[dtype]
    for i, case in enumerate(DENSE_CASES):
        p, case = _problem(case, ctx, dtype, seed + i)
        out, ref, stats, mine, ref_in = dense_call(ctx, p, case, dtype)
        compare_to_reference(ctx, f"rank {ctx.rank} dense {i} {dtype}", out, ref, seed + i, mine, ref_in, tol_v,
                             tol_g, stats)


# ----------------------------------------------------------------------------------------- sparse teacher
def sparse_call(ctx: Ctx, p: dict, case: dict, dtype, backend: str = "torch", chunk_size: int | None = None):
    case = dict(case)
    k = case.pop("k")
    caps = dict(student_softcap=2.0) if case.pop("caps", False) else {}
    opts, return_stats = _split(case, p, dtype)
    with torch.no_grad():
        ids, logprobs = fused_topk_logprobs(p["th"].double(), p["tw"][:ctx.vocab].double(),
                                            ctx.vocab if k == "V" else k)
    logprobs = logprobs.to(dtype)
    sw, sb = shard(p["sw"], ctx), None if p["sb"] is None else shard(p["sb"], ctx)
    out = vocab_parallel_sparse_sod_loss(p["sh"], sw, ids, logprobs, p["mask"], vocab_start=ctx.start,
                                         target_ids=p["y"], student_bias=sb, return_stats=return_stats,
                                         backend=backend, chunk_size=chunk_size, **caps, **opts)
    ref_in = {k: _d64(p[k]) for k in ("sh", "sw", "sb")}
    ref, stats = ref_sparse_sod_loss(ref_in["sh"], ref_in["sw"], ids, logprobs, p["mask"], target_ids=p["y"],
                                     student_bias=ref_in["sb"], **caps, **_ref_options(opts))
    return out, ref, stats if return_stats else None, [p["sh"], sw, sb], [ref_in["sh"], ref_in["sw"], ref_in["sb"]]


def check_sparse(ctx: Ctx, dtype, seed: int) -> None:
    tol_v, tol_g = TOL[dtype]
    for i, case in enumerate(SPARSE_CASES):
        p, case = _problem(case, ctx, dtype, seed + 50 + i)
        out, ref, stats, mine, ref_in = sparse_call(ctx, p, case, dtype)
        compare_to_reference(ctx, f"rank {ctx.rank} sparse {i} {dtype}", out, ref, seed + 50 + i, mine, ref_in,
                             tol_v, tol_g, stats)


def check_tiles(ctx: Ctx, seed: int) -> None:
    """Many row chunks (``chunk_size=3``) and vocabulary tiles (8 columns: the shards span 2 tiles, the last one
    partial) in every sweep of the JSD and the hard term, float64, dense and sparse."""
    from sod_kernels.core import tiles

    saved = tiles.VOCAB_TILE
    tiles.VOCAB_TILE = 8
    try:
        for i, (call, case) in enumerate(((dense_call, {"divergence": "jsd", "beta": 0.3, "hard": 0.5, "bias": True,
                                                        "caps": True, "temperature": 0.8}),
                                          (dense_call, {"divergence": "reverse_kl", "hard": 0.5, "bias": True}),
                                          (sparse_call, {"k": 4, "divergence": "jsd", "beta": 0.8, "hard": 0.5,
                                                         "bias": True, "caps": True}))):
            p, case = _problem(case, ctx, torch.float64, seed + 150 + i)
            out, ref, stats, mine, ref_in = call(ctx, p, case, torch.float64, chunk_size=3)
            compare_to_reference(ctx, f"rank {ctx.rank} tiles {i}", out, ref, seed + 150 + i, mine, ref_in,
                                 *TOL[torch.float64], stats)
    finally:
        tiles.VOCAB_TILE = saved


# -------------------------------------------------------------------------------------- identities, misc
def _loss_and_grads(fn, mine):
    out = fn()
    return (out.detach(),) + _grads(out, mine)


def check_identities(ctx: Ctx, seed: int) -> None:
    """``beta`` 0 / 1 are exactly the forward / reverse KL (bitwise: the front maps them), dense and sparse,
    with the hard term; ``hard_loss_weight=0`` is the loss without it; repeated calls are bitwise identical."""
    p = problem(seed + 100, ctx.vocab, torch.float32, bias=True)
    sw, sb = shard(p["sw"], ctx), shard(p["sb"], ctx)
    tw, tb = shard(p["tw"], ctx, TEACHER_PAD), shard(p["tb"], ctx, TEACHER_PAD)
    with torch.no_grad():
        ids, logprobs = fused_topk_logprobs(p["th"], p["tw"][:ctx.vocab], 4)
    mine = [p["sh"], sw, sb]
    common = dict(vocab_start=ctx.start, target_ids=p["y"], student_bias=sb, temperature=0.9, hard_loss_weight=0.5)

    def dense(**kw):
        return lambda: vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], teacher_bias=tb,
                                               **dict(common, **kw))

    def sparse(**kw):
        return lambda: vocab_parallel_sparse_sod_loss(p["sh"], sw, ids, logprobs, p["mask"], **dict(common, **kw))

    for call in (dense, sparse):
        for beta, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
            a = _loss_and_grads(call(divergence="jsd", beta=beta), mine)
            b = _loss_and_grads(call(divergence=kl), mine)
            assert all(torch.equal(x, y) for x, y in zip(a, b)), (call.__name__, beta)
        runs = [_loss_and_grads(call(divergence="jsd", beta=0.4), mine) for _ in range(2)]
        assert all(torch.equal(x, y) for x, y in zip(*runs)), call.__name__ + " repeated calls differ"
        without = _loss_and_grads(call(divergence="jsd", beta=0.4, hard_loss_weight=0.0), mine)
        assert float(without[0]) < float(runs[0][0])  # the hard term adds a positive loss


def check_all_masked(ctx: Ctx, seed: int) -> None:
    p = problem(seed + 200, ctx.vocab, torch.float32, bias=True)
    mask = torch.zeros_like(p["mask"])
    sw, sb, tw = shard(p["sw"], ctx), shard(p["sb"], ctx), shard(p["tw"], ctx, TEACHER_PAD)
    with torch.no_grad():
        ids, logprobs = fused_topk_logprobs(p["th"], p["tw"][:ctx.vocab], 3)
    kw = dict(vocab_start=ctx.start, target_ids=p["y"], student_bias=sb, divergence="jsd", beta=0.3,
              hard_loss_weight=1.0)
    for loss in (vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, mask, **kw),
                 vocab_parallel_sparse_sod_loss(p["sh"], sw, ids, logprobs, mask, **kw)):
        assert loss.item() == 0.0
        assert all(g is not None and not g.any() for g in _grads(loss, [p["sh"], sw, sb]))


def check_bfloat16(ctx: Ctx, seed: int) -> None:
    """bfloat16 inputs, JSD and the hard term: within 2e-2 of the float64 reference on the bf16 values."""
    p = problem(seed + 250, ctx.vocab, torch.bfloat16, bias=True)
    out, ref, _, mine, ref_in = dense_call(ctx, p, {"divergence": "jsd", "beta": 0.6, "hard": 0.5},
                                           torch.bfloat16)
    assert out.dtype == torch.float32 and rel(out, ref) <= 1e-2
    grads, oracle = _grads(out, mine), _grads(ref, ref_in)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    assert rel(grads[0], oracle[0]) <= 2e-2
    assert rel(grads[1], oracle[1][ctx.rows]) <= 2e-2 and rel(grads[2], oracle[2][ctx.rows]) <= 2e-2


def check_validation(ctx: Ctx, seed: int) -> None:
    """Bad options raise on every rank alike (never a hang), and the group still works afterwards."""
    p = problem(seed + 300, ctx.vocab, torch.float32)
    sw, tw = shard(p["sw"], ctx), shard(p["tw"], ctx, TEACHER_PAD)
    with torch.no_grad():
        ids, logprobs = fused_topk_logprobs(p["th"], p["tw"][:ctx.vocab], 3)
    calls = (lambda **kw: vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], vocab_start=ctx.start, **kw),
             lambda **kw: vocab_parallel_sparse_sod_loss(p["sh"], sw, ids, logprobs, p["mask"],
                                                         vocab_start=ctx.start, **kw))
    for call in calls:
        with pytest.raises(ValueError, match="same beta"):
            call(divergence="jsd", beta=0.3 + 0.2 * ctx.rank, target_ids=p["y"])
        with pytest.raises(ValueError, match="same hard_loss_weight"):
            call(hard_loss_weight=0.5 * ctx.rank, target_ids=p["y"])
        with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]"):
            call(divergence="jsd", beta=1.5)
        with pytest.raises(ValueError, match="hard_loss_weight > 0 needs target_ids"):
            call(hard_loss_weight=0.5)
        with pytest.raises(ValueError, match="hard_loss_weight"):
            call(hard_loss_weight=-1.0, target_ids=p["y"])
        if ctx.rank == 1:  # one rank's own error; the other names it
            with pytest.raises(ValueError, match=r"beta must be"):
                call(divergence="jsd", beta=-0.1)
        else:
            with pytest.raises(ValueError, match=r"rank\(s\) \[1\]"):
                call(divergence="jsd", beta=0.5)
        assert torch.isfinite(call(divergence="jsd", beta=0.5, target_ids=p["y"], hard_loss_weight=0.2))


# ---------------------------------------------------------------------------------------------- Triton
TRITON_DENSE = [{"divergence": "jsd", "beta": 0.4, "hard": 0.5, "bias": True, "caps": True, "temperature": 0.8},
                {"divergence": "reverse_kl", "hard": 0.7, "bias": True, "step_divergence": "sampled"}]
TRITON_SPARSE = [{"k": 4, "divergence": "jsd", "beta": 0.7, "hard": 0.5, "bias": True, "caps": True},
                 {"k": "V", "divergence": "forward_kl", "hard": 0.3, "temperature": 0.8}]


def check_triton_backend(ctx: Ctx, seed: int) -> None:
    """``backend="triton"`` (the interpreter on CPU; tiny problems), float32, against the float64 reference."""
    tol_v, tol_g = TOL[torch.float32]
    for kind, cases, call in (("dense", TRITON_DENSE, dense_call), ("sparse", TRITON_SPARSE, sparse_call)):
        for i, case in enumerate(cases):
            p, case = _problem(case, ctx, torch.float32, seed + 400 + i, B=1, T=6)
            out, ref, stats, mine, ref_in = call(ctx, p, case, torch.float32, backend="triton")
            compare_to_reference(ctx, f"rank {ctx.rank} triton {kind} {i}", out, ref, seed + 400 + i, mine, ref_in,
                                 tol_v, tol_g, stats)


def all_checks(ctx: Ctx, seed: int) -> None:
    for dtype in (torch.float64, torch.float32):
        check_dense(ctx, dtype, seed)
        check_sparse(ctx, dtype, seed)
    check_tiles(ctx, seed)
    check_identities(ctx, seed)
    check_all_masked(ctx, seed)
    check_bfloat16(ctx, seed)
    check_validation(ctx, seed)
    check_triton_backend(ctx, seed)


def test_vocab_parallel_jsd_and_hard_label(tmp_path, monkeypatch):
    run_ranks(all_checks, 2, tmp_path, monkeypatch)
