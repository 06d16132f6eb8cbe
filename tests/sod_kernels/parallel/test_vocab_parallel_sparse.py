"""vocab_parallel_sparse_sod_loss: 2 and 3 gloo ranks on CPU against fused_sparse_sod_loss and the float64
reference, fresh random inputs, uneven shards (the 3-rank shards not in rank order); where CUDA exists, the
same on NCCL ranks, one GPU a rank."""

from __future__ import annotations

import pytest
import torch

from reference.sparse_reference import ref_sparse_sod_loss
from sod_kernels import fused_sparse_sod_loss, fused_topk_logprobs, vocab_parallel_sparse_sod_loss
from tests.sod_kernels.parallel.test_vocab_parallel import RANK_CASES, Ctx, _grads, compare_sod, problem, rel, run_ranks, shard

CASES = [  # options of one call, each in float64 and float32
    {"k": 4},
    {"k": 3, "divergence": "forward_kl", "temperature": 0.7, "bias": True},
    {"k": 5, "step_divergence": "sampled", "reduction": "sum", "bias": True, "coef": 0.5},
    {"k": 2, "step_divergence": "none", "reduction": "none", "temperature": 1.3},
    {"k": 4, "token_weights": True, "divergence": "forward_kl", "single": True},
    {"k": 6, "return_stats": True, "step_divergence": "sampled", "scale": 6.0},
    {"k": "V"},  # every id listed: no tail bucket
]


def teacher_topk(p, k: int, vocab: int):
    """The teacher's top-k ids and log-probs from its (full) head, as an inference server would return them."""
    with torch.no_grad():
        return fused_topk_logprobs(p["th"].double(), p["tw"][:vocab].double(), k)


def check_loss(ctx: Ctx, dtype, seed: int) -> None:
    for i, case in enumerate(CASES):
        case = dict(case)
        p = problem(seed + i, ctx.vocab, dtype, bias=case.pop("bias", False), single=case.pop("single", False),
                    scale=case.pop("scale", 1.5))
        k = case.pop("k")
        ids, logprobs = teacher_topk(p, ctx.vocab if k == "V" else k, ctx.vocab)
        logprobs = logprobs.to(dtype)
        opts = {"step_divergence": case.pop("step_divergence", None),
                "divergence": case.pop("divergence", "reverse_kl"), "reduction": case.pop("reduction", "token_mean"),
                "temperature": case.pop("temperature", 1.0), "coef": case.pop("coef", 1.0)}
        if case.pop("token_weights", False):
            opts["token_weights"] = p["tok_w"].to(dtype)
        return_stats = case.pop("return_stats", False)
        assert not case
        sw, sb = shard(p["sw"], ctx), None if p["sb"] is None else shard(p["sb"], ctx)
        out = vocab_parallel_sparse_sod_loss(p["sh"], sw, ids, logprobs, p["mask"], vocab_start=ctx.start,
                                             target_ids=p["y"], student_bias=sb, return_stats=return_stats, **opts)
        full = fused_sparse_sod_loss(p["sh"], p["sw"], ids, logprobs, p["mask"], target_ids=p["y"],
                                     student_bias=p["sb"], return_stats=return_stats, backend="torch", **opts)
        d64 = lambda x: None if x is None else x.detach().double().requires_grad_(x.requires_grad)  # noqa: E731
        ref_in = {name: d64(p[name]) for name in ("sh", "sw", "sb")}
        ref_opts = dict(opts, step_divergence=opts["step_divergence"] or ("none" if "token_weights" in opts else "kl"))
        ref, _ = ref_sparse_sod_loss(ref_in["sh"], ref_in["sw"], ids, logprobs, p["mask"], target_ids=p["y"],
                                     student_bias=ref_in["sb"], **ref_opts)
        compare_sod(ctx, dtype, f"rank {ctx.rank} case {i} {dtype}", out, full, ref, return_stats, seed + i,
                    mine=[p["sh"], sw, sb], full_in=[p["sh"], p["sw"], p["sb"]],
                    ref_in=[ref_in["sh"], ref_in["sw"], ref_in["sb"]])


def check_validation(ctx: Ctx, seed: int) -> None:
    p = problem(seed, ctx.vocab, torch.float64)
    ids, logprobs = teacher_topk(p, 3, ctx.vocab)
    sw = shard(p["sw"], ctx)
    bad = ids.clone()
    bad[0, 0, 0] = ctx.vocab  # one id past the full vocabulary (every shard is smaller than V)
    with pytest.raises(ValueError, match=r"teacher_topk_ids"):
        vocab_parallel_sparse_sod_loss(p["sh"], sw, bad, logprobs, p["mask"], vocab_start=ctx.start)
    with pytest.raises(ValueError, match=r"temperature|rank\(s\) \[0\] of process_group rejected"):  # every rank raises
        vocab_parallel_sparse_sod_loss(p["sh"], sw, ids, logprobs, p["mask"], vocab_start=ctx.start,
                                       temperature=0.0 if ctx.rank == 0 else 1.0)
    # A rank that sees other tokens is refused on every rank (descriptor checksums), never a hang.
    other = logprobs.clone() if ctx.rank else logprobs - 0.01
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs"):
        vocab_parallel_sparse_sod_loss(p["sh"], sw, ids, other, p["mask"], vocab_start=ctx.start)


def check_triton_backend(ctx: Ctx, seed: int) -> None:
    """The Triton logit-block path on each rank's shard (the interpreter on CPU, the kernels on a GPU): the
    sampled-token signal with the target owned by one rank, forward KL with a bias, and every id listed (an
    empty tail on every rank), against the single-process torch path."""
    for i, (k, opts) in enumerate(((5, {"step_divergence": "sampled", "bias": True}),
                                   (3, {"divergence": "forward_kl", "bias": True, "temperature": 0.8}),
                                   ("V", {}))):
        opts = dict(opts)
        p = problem(seed + 900 + i, ctx.vocab, torch.float32, bias=opts.pop("bias", False), B=1, T=7)
        ids, logprobs = teacher_topk(p, ctx.vocab if k == "V" else k, ctx.vocab)
        logprobs = logprobs.float()
        sw, sb = shard(p["sw"], ctx), None if p["sb"] is None else shard(p["sb"], ctx)
        out = vocab_parallel_sparse_sod_loss(p["sh"], sw, ids, logprobs, p["mask"], vocab_start=ctx.start,
                                             target_ids=p["y"], student_bias=sb, return_stats=True,
                                             backend="triton", **opts)
        full = fused_sparse_sod_loss(p["sh"], p["sw"], ids, logprobs, p["mask"], target_ids=p["y"],
                                     student_bias=p["sb"], return_stats=True, backend="torch", **opts)
        tag = f"rank {ctx.rank} triton case {i}"
        assert rel(out.loss, full.loss) <= 1e-5, (tag, out.loss, full.loss)
        assert rel(out.token_divergence, full.token_divergence) <= 1e-5, tag
        mine = _grads(out.loss, [p["sh"], sw, sb])
        theirs = _grads(full.loss, [p["sh"], p["sw"], p["sb"]])
        assert rel(mine[0], theirs[0]) <= 1e-4, (tag, "hidden", rel(mine[0], theirs[0]))
        for name, a, c in zip(("weight", "bias"), mine[1:], theirs[1:]):
            if c is not None:
                assert rel(a, c[ctx.rows]) <= 1e-4, (tag, name, rel(a, c[ctx.rows]))
    with pytest.raises(TypeError, match="backend='triton' supports student_hidden in float32"):
        vocab_parallel_sparse_sod_loss(p["sh"].double(), sw.double(), ids, logprobs.double(), p["mask"],
                                       vocab_start=ctx.start, backend="triton")


def all_checks(ctx: Ctx, seed: int) -> None:
    for dtype in (torch.float64, torch.float32):
        check_loss(ctx, dtype, seed)
    check_triton_backend(ctx, seed)
    if ctx.world > 1:  # the checks of disagreeing ranks need a second rank
        check_validation(ctx, seed)


@pytest.mark.parametrize("backend, world", RANK_CASES)
def test_vocab_parallel_sparse_matches_single_process(backend, world, tmp_path, monkeypatch):
    run_ranks(all_checks, world, tmp_path, monkeypatch, backend)
