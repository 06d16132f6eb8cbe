"""Vocabulary-parallel losses: 2 and 3 gloo ranks on CPU against the single-process functions and the float64
reference, on fresh random inputs with uneven shards; where CUDA exists, the same checks on NCCL ranks, one GPU
a rank (as many ranks as GPUs, at most 3; NCCL refuses two ranks on one GPU, so a single GPU runs one rank:
the whole head on one shard, every tensor on the GPU, nothing to exchange).

Each spawned group runs many checks (spawning costs seconds): every rank builds the same full problem from a
seed, keeps its own vocabulary rows, and compares its outputs and its shard's gradients with the full
single-process computation it runs itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reference.sod_reference import ref_fused_sod_loss, ref_ppo_dual_clip_loss, ref_token_logprobs
from sod_kernels import (VocabParallelPolicyLoss, VocabParallelSODLoss, VocabParallelSparseSODLoss,
                         VocabParallelTokenLogprobs, fused_sod_loss, fused_sod_policy_loss, fused_token_logprobs)
from sod_kernels.parallel.losses import (vocab_parallel_policy_loss, vocab_parallel_sod_loss,
                                        vocab_parallel_token_logprobs)

ROOT = Path(__file__).resolve().parents[3]
# (vocabulary size, shard sizes by rank, first id by rank); the 3-rank shards are not in rank order.
LAYOUTS = {1: (23, (23,), (0,)), 2: (29, (16, 13), (0, 16)), 3: (31, (7, 14, 10), (24, 0, 14))}
TEACHER_PAD = 3  # extra rows on the shard holding the last ids (a padded teacher vocabulary)
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-4)}  # (loss / values, gradients), relative
# Where a rank's tensors live: the CPU (gloo), or under NCCL the rank's GPU (set by _rank_main).  Inputs are
# placed there explicitly, never through torch's default device, which would hide a CPU tensor made inside
# the library.
RANK_DEVICE = torch.device("cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30)) if b.norm() > 0 else float((a - b).norm())


@dataclass
class Ctx:
    rank: int
    world: int
    vocab: int
    size: int
    start: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.size)

    @property
    def last(self) -> bool:
        return self.start + self.size == self.vocab


def shard(full: torch.Tensor, ctx: Ctx, extra: int = 0) -> torch.Tensor:
    """This rank's rows of a full weight / bias, as a fresh leaf (``extra`` padding rows on the last shard)."""
    stop = ctx.start + ctx.size + (extra if ctx.last else 0)
    return full.detach()[ctx.start:stop].clone().requires_grad_(full.requires_grad)


def same_on_every_rank(x: torch.Tensor, what: str) -> None:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    assert all(torch.equal(p, parts[0]) for p in parts), f"{what} differs across ranks"


def problem(seed: int, vocab: int, dtype, *, B=2, T=9, Hs=6, Ht=5, bias=False, single=False, scale=1.5):
    """Drawn on the CPU from ``seed`` (the same on every rank and device), then moved to ``RANK_DEVICE``."""
    g = torch.Generator().manual_seed(seed)
    lead = (T,) if single else (B, T)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, device="cpu")  # noqa: E731
    p = {"sh": rnd(*lead, Hs) * scale, "sw": rnd(vocab, Hs), "th": rnd(*lead, Ht) * scale,
         "tw": rnd(vocab + TEACHER_PAD, Ht), "sb": rnd(vocab) if bias else None,
         "tb": rnd(vocab + TEACHER_PAD) if bias else None}
    mask = (torch.rand(*lead, generator=g, device="cpu") < 0.65).long()
    mask[..., :3] = 1
    p["mask"] = mask
    p["y"] = torch.randint(0, vocab, lead, generator=g, device="cpu")
    p["tok_w"] = torch.rand(*lead, generator=g, dtype=torch.float64, device="cpu") * 2
    p = {k: (v.to(dtype) if v is not None and v.is_floating_point() and k != "tok_w" else v) for k, v in p.items()}
    p = {k: None if v is None else v.to(RANK_DEVICE) for k, v in p.items()}
    for k in ("sh", "sw", "sb"):
        if p[k] is not None:
            p[k].requires_grad_(True)
    return p


def rand_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform [0.5, 1.5) upstream gradients, the same on every rank (spawned ranks have different global
    random states)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(x.shape, generator=g, dtype=torch.float64, device="cpu") + 0.5).to(x.device, x.dtype)


def _grads(out, inputs):
    inputs = [x for x in inputs if x is not None]
    return torch.autograd.grad(out, inputs, allow_unused=True)


def compare_sod(ctx: Ctx, dtype, tag: str, out, full, ref, return_stats: bool, seed: int, *, mine, full_in,
                ref_in) -> None:
    """A vocabulary-parallel distillation loss ``out`` against the single-process ``full`` and the float64
    ``ref``: the loss (the same on every rank), the statistics, and the gradients of ``mine`` (hidden, this
    rank's weight and bias) against the matching rows of ``full_in`` / ``ref_in``'s gradients."""
    loss, full_loss = (out.loss, full.loss) if return_stats else (out, full)
    tol_v, tol_g = TOL[dtype]
    same_on_every_rank(loss, tag)
    assert rel(loss, full_loss) <= tol_v and rel(loss, ref) <= tol_v, (tag, loss, full_loss, ref)
    if return_stats:
        assert torch.equal(out.num_steps, full.num_steps), tag
        for name in ("token_divergence", "token_weights", "step_divergence", "step_weights"):
            assert rel(getattr(out, name), getattr(full, name)) <= tol_v, (tag, name)
    upstream = rand_like(loss, seed)
    grads = _grads((loss * upstream).sum(), mine)
    theirs = _grads((full_loss * upstream).sum(), full_in)
    oracle = _grads((ref * upstream.double()).sum(), ref_in)
    for name, a, b, c in zip(("hidden", "weight", "bias"), grads, theirs, oracle):
        if name != "hidden":
            b, c = b[ctx.rows], c[ctx.rows]
        assert a.dtype == dtype and rel(a, b) <= tol_g and rel(a, c) <= tol_g, (tag, name, rel(a, b), rel(a, c))
    same_on_every_rank(grads[0], tag + " d(hidden)")


# ------------------------------------------------------------------------------------------- the loss
SOD_CASES = [  # options of one call (each checked in float64 and float32)
    {},
    {"divergence": "forward_kl", "temperature": 0.7, "bias": True},
    {"step_divergence": "sampled", "reduction": "sum", "bias": True, "coef": 0.5},
    {"step_divergence": "none", "reduction": "none", "temperature": 1.3},
    {"token_weights": True, "divergence": "forward_kl", "single": True},
    {"return_stats": True, "step_divergence": "sampled", "divergence": "reverse_kl", "scale": 6.0},
]


def check_sod_loss(ctx: Ctx, dtype, seed: int) -> None:
    for i, case in enumerate(SOD_CASES):
        case = dict(case)
        p = problem(seed + i, ctx.vocab, dtype, bias=case.pop("bias", False), single=case.pop("single", False),
                    scale=case.pop("scale", 1.5))
        opts = {"step_divergence": case.pop("step_divergence", None), "divergence": case.pop("divergence", "reverse_kl"),
                "reduction": case.pop("reduction", "token_mean"), "temperature": case.pop("temperature", 1.0),
                "coef": case.pop("coef", 1.0)}
        if case.pop("token_weights", False):
            opts["token_weights"] = p["tok_w"].to(dtype)
        return_stats = case.pop("return_stats", False)
        assert not case
        sw, sb = shard(p["sw"], ctx), None if p["sb"] is None else shard(p["sb"], ctx)
        tw, tb = shard(p["tw"], ctx, TEACHER_PAD), None if p["tb"] is None else shard(p["tb"], ctx, TEACHER_PAD)
        out = vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], vocab_start=ctx.start, target_ids=p["y"],
                                      student_bias=sb, teacher_bias=tb, return_stats=return_stats, **opts)
        full = fused_sod_loss(p["sh"], p["sw"], p["th"], p["tw"], p["mask"], target_ids=p["y"], student_bias=p["sb"],
                              teacher_bias=p["tb"], return_stats=return_stats, backend="torch", **opts)
        d64 = lambda x: None if x is None else x.detach().double().requires_grad_(x.requires_grad)  # noqa: E731
        ref_in = {k: d64(p[k]) for k in ("sh", "sw", "th", "tw", "sb", "tb")}
        ref_opts = dict(opts, step_divergence=opts["step_divergence"] or ("none" if "token_weights" in opts else "kl"))
        ref, ref_stats = ref_fused_sod_loss(ref_in["sh"], ref_in["sw"], ref_in["th"], ref_in["tw"], p["mask"],
                                            target_ids=p["y"], student_bias=ref_in["sb"], teacher_bias=ref_in["tb"],
                                            **ref_opts)
        tag = f"rank {ctx.rank} case {i} {dtype}"
        compare_sod(ctx, dtype, tag, out, full, ref, return_stats, seed + i, mine=[p["sh"], sw, sb],
                    full_in=[p["sh"], p["sw"], p["sb"]], ref_in=[ref_in["sh"], ref_in["sw"], ref_in["sb"]])
        if return_stats:
            assert rel(out.token_divergence, ref_stats["token_divergence"].clamp(min=0)) <= TOL[dtype][0], tag


# ------------------------------------------------------------------------------------- log-probs, policy
def check_token_logprobs(ctx: Ctx, dtype, seed: int) -> None:
    for i, (bias, temperature, entropy) in enumerate(((False, 1.0, False), (True, 0.8, True))):
        p = problem(seed + 100 + i, ctx.vocab, dtype, bias=bias)
        w, b = shard(p["sw"], ctx), None if p["sb"] is None else shard(p["sb"], ctx)
        out = vocab_parallel_token_logprobs(p["sh"], w, p["y"], vocab_start=ctx.start, bias=b, temperature=temperature,
                                            return_entropy=entropy)
        full = fused_token_logprobs(p["sh"], p["sw"], p["y"], bias=p["sb"], temperature=temperature,
                                    return_entropy=entropy, backend="torch")
        out, full = (out, full) if entropy else ((out,), (full,))
        ref = ref_token_logprobs(p["sh"].double(), p["sw"].double(), p["y"],
                                 None if p["sb"] is None else p["sb"].double(), temperature)
        tag = f"rank {ctx.rank} logprobs {i} {dtype}"
        tol_v, tol_g = TOL[dtype]
        assert rel(out[0], full[0]) <= tol_v and rel(out[0], ref) <= tol_v, tag
        if entropy:
            assert rel(out[1], full[1]) <= tol_v, tag
        ups = [rand_like(o, seed + 100 + i + k) * (1 - 2 * k) for k, o in enumerate(out)]
        mine = _grads(sum((o * u).sum() for o, u in zip(out, ups)), [p["sh"], w, b])
        theirs = _grads(sum((o * u).sum() for o, u in zip(full, ups)), [p["sh"], p["sw"], p["sb"]])
        for name, a, c in zip(("hidden", "weight", "bias"), mine, theirs):
            c = c if name == "hidden" else c[ctx.rows]
            assert rel(a, c) <= tol_g, (tag, name, rel(a, c))


def check_policy_loss(ctx: Ctx, dtype, seed: int) -> None:
    p = problem(seed + 200, ctx.vocab, dtype, bias=True)
    g = torch.Generator().manual_seed(seed + 201)
    y = p["y"].masked_fill(p["mask"] == 0, -100)  # padding ids outside the mask are never read
    with torch.no_grad():
        true = fused_token_logprobs(p["sh"], p["sw"], p["y"], bias=p["sb"], backend="torch")
    noise = lambda: torch.randn(true.shape, generator=g, dtype=torch.float64, device="cpu").to(true)  # noqa: E731
    old = (true + 0.3 * noise()).detach()
    adv = noise()
    w, b = shard(p["sw"], ctx), shard(p["sb"], ctx)
    out = vocab_parallel_policy_loss(p["sh"], w, y, old, adv, p["mask"], vocab_start=ctx.start, student_bias=b,
                                     return_stats=True, temperature=0.9)
    full = fused_sod_policy_loss(p["sh"], p["sw"], y, old, adv, p["mask"], student_bias=p["sb"], return_stats=True,
                                 temperature=0.9, backend="torch")
    ref = ref_ppo_dual_clip_loss(ref_token_logprobs(p["sh"].double(), p["sw"].double(), p["y"], p["sb"].double(), 0.9),
                                 old.double(), adv.double(), p["mask"], reduction="none")
    tag = f"rank {ctx.rank} policy {dtype}"
    tol_v, tol_g = TOL[dtype]
    # The token mean adds terms of both signs: judge it against the mean size of the terms.
    scale = float(ref.abs().sum() / p["mask"].sum())
    for target in (full.loss, ref.sum() / p["mask"].sum()):
        assert abs(float(out.loss) - float(target)) <= tol_v * scale, (tag, out.loss, target)
    for name in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "mean_ratio", "approx_kl", "logprobs"):
        assert rel(getattr(out, name), getattr(full, name)) <= tol_v, (tag, name)
    mine = _grads(out.loss, [p["sh"], w, b])
    theirs = _grads(full.loss, [p["sh"], p["sw"], p["sb"]])
    for name, a, c in zip(("hidden", "weight", "bias"), mine, theirs):
        c = c if name == "hidden" else c[ctx.rows]
        assert rel(a, c) <= tol_g, (tag, name, rel(a, c))


def check_all_masked(ctx: Ctx, seed: int) -> None:
    p = problem(seed + 300, ctx.vocab, torch.float32, bias=True)
    mask = torch.zeros_like(p["mask"])
    sw, sb, tw = shard(p["sw"], ctx), shard(p["sb"], ctx), shard(p["tw"], ctx, TEACHER_PAD)
    for kind in ("kl", "sampled"):
        loss = vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, mask, vocab_start=ctx.start, target_ids=p["y"],
                                       student_bias=sb, step_divergence=kind)
        assert loss.item() == 0.0
        grads = _grads(loss, [p["sh"], sw, sb])
        assert all(gr is not None and not gr.any() for gr in grads)
    pol = vocab_parallel_policy_loss(p["sh"], sw, p["y"], torch.zeros(mask.shape, device=mask.device),
                                     torch.ones(mask.shape, device=mask.device), mask,
                                     vocab_start=ctx.start, student_bias=sb)
    assert pol.item() == 0.0
    assert all(gr is not None and not gr.any() for gr in _grads(pol, [p["sh"], sw, sb]))


def check_unreduced_hidden_grad(ctx: Ctx, seed: int) -> None:
    """reduce_hidden_grad=False: each rank's d(hidden) is its share; the shares sum to the full gradient."""
    p = problem(seed + 400, ctx.vocab, torch.float64)
    sw, tw = shard(p["sw"], ctx), shard(p["tw"], ctx, TEACHER_PAD)
    loss = vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], vocab_start=ctx.start,
                                   reduce_hidden_grad=False)
    (share,) = _grads(loss, [p["sh"]])
    (full,) = _grads(fused_sod_loss(p["sh"], p["sw"], p["th"], p["tw"], p["mask"], backend="torch"), [p["sh"]])
    assert rel(share, full) > 1e-3  # a share alone is not the gradient
    total = share.clone()
    dist.all_reduce(total)
    assert rel(total, full) <= 1e-10


def check_deterministic_and_contract(ctx: Ctx, seed: int) -> None:
    p = problem(seed + 500, ctx.vocab, torch.float32, bias=True)
    sw, sb, tw = shard(p["sw"], ctx), shard(p["sb"], ctx), shard(p["tw"], ctx, TEACHER_PAD)
    runs = []
    for _ in range(2):
        loss = vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], vocab_start=ctx.start, student_bias=sb,
                                       target_ids=p["y"], step_divergence="sampled")
        runs.append((loss.detach(),) + _grads(loss, [p["sh"], sw, sb]))
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "repeated calls differ"
    with torch.autocast(p["sh"].device.type, dtype=torch.bfloat16):
        auto = vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], vocab_start=ctx.start, student_bias=sb,
                                       target_ids=p["y"], step_divergence="sampled")
    assert torch.equal(auto.detach(), runs[0][0]) and auto.dtype == torch.float32
    loss = vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], vocab_start=ctx.start)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(loss, [p["sh"]], create_graph=True)


def check_bfloat16(ctx: Ctx, seed: int) -> None:
    """bfloat16 inputs (float32 statistics): within 2e-2 of the float64 reference on the bf16 values."""
    p = problem(seed + 550, ctx.vocab, torch.bfloat16, bias=True)
    sw, sb, tw = shard(p["sw"], ctx), shard(p["sb"], ctx), shard(p["tw"], ctx, TEACHER_PAD)
    loss = vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], vocab_start=ctx.start, student_bias=sb)
    ref_in = {k: p[k].detach().double().requires_grad_(k in ("sh", "sw", "sb")) for k in ("sh", "sw", "th", "tw", "sb")}
    ref, _ = ref_fused_sod_loss(ref_in["sh"], ref_in["sw"], ref_in["th"], ref_in["tw"], p["mask"],
                                student_bias=ref_in["sb"])
    assert loss.dtype == torch.float32 and rel(loss, ref) <= 1e-2
    mine, oracle = _grads(loss, [p["sh"], sw, sb]), _grads(ref, [ref_in["sh"], ref_in["sw"], ref_in["sb"]])
    assert all(g.dtype == torch.bfloat16 for g in mine)
    assert rel(mine[0], oracle[0]) <= 2e-2
    assert rel(mine[1], oracle[1][ctx.rows]) <= 2e-2 and rel(mine[2], oracle[2][ctx.rows]) <= 2e-2


# ------------------------------------------------------------------------------------------ validation
def _raises(match: str, fn) -> None:
    with pytest.raises(ValueError, match=match):
        fn()


def check_validation(ctx: Ctx, seed: int) -> None:
    p = problem(seed + 600, ctx.vocab, torch.float32)
    sw, tw = shard(p["sw"], ctx), shard(p["tw"], ctx, TEACHER_PAD)

    def call(**kw):
        args = {"vocab_start": ctx.start, "target_ids": p["y"]}
        args.update(kw)
        sw_, tw_ = args.pop("sw", sw), args.pop("tw", tw)
        mask = args.pop("mask", p["mask"])
        return vocab_parallel_sod_loss(p["sh"], sw_, p["th"], tw_, mask, **args)

    _raises("tile", lambda: call(vocab_start=0))                                   # overlapping shards
    _raises("tile", lambda: call(vocab_start=ctx.start + (ctx.rank == 0)))        # a gap (and an overlap)
    _raises("vocab_start must be given on every rank", lambda: call(vocab_start=ctx.start if ctx.rank else None))
    _raises("same temperature", lambda: call(temperature=1.0 + 0.5 * ctx.rank))  # ranks disagree
    _raises("same distilled tokens", lambda: call(mask=p["mask"] if ctx.rank else torch.zeros_like(p["mask"])))
    bad = p["y"].clone()
    bad[0, 0] = ctx.vocab                                                         # outside the full vocabulary
    _raises(r"target_ids must lie in \[0, %d\)" % ctx.vocab, lambda: call(target_ids=bad))
    # A teacher shard that does not hold the student shard's ids.
    _raises("teacher_weight on rank", lambda: call(tw=tw[:-1] if not ctx.last else tw[: ctx.size - 1]))
    # One rank's own input error: that rank raises it, the others name it.
    if ctx.rank == 1:
        _raises("response_mask must contain only 0 and 1", lambda: call(mask=p["mask"] * 2))
    else:
        _raises(r"rank\(s\) \[1\]", lambda: call())
    with pytest.raises(ValueError, match="vocab_start must be an int"):
        call(vocab_start=-1)  # every rank rejects it alike
    # After every failure the group still works.
    loss = call()
    full = fused_sod_loss(p["sh"], p["sw"], p["th"], p["tw"], p["mask"], target_ids=p["y"], backend="torch")
    assert rel(loss, full) <= 1e-5


def check_groups(ctx: Ctx, seed: int) -> None:
    """A sub-group of ranks 0 and 1 (rank 2 is not a member) and singleton groups (one rank, the full head)."""
    pair = dist.new_group([0, 1])
    singles = [dist.new_group([r]) for r in range(ctx.world)]
    p = problem(seed + 700, 23, torch.float64, bias=True)
    if ctx.rank < 2:
        sub = Ctx(ctx.rank, 2, 23, (12, 11)[ctx.rank], (0, 12)[ctx.rank])
        sw, sb, tw = shard(p["sw"], sub), shard(p["sb"], sub), shard(p["tw"], sub, TEACHER_PAD)
        loss = vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], process_group=pair, student_bias=sb)
        full = fused_sod_loss(p["sh"], p["sw"], p["th"], p["tw"], p["mask"], student_bias=p["sb"], backend="torch")
        assert rel(loss, full) <= 1e-10
        mine, theirs = _grads(loss, [p["sh"], sw]), _grads(full, [p["sh"], p["sw"]])
        assert rel(mine[0], theirs[0]) <= 1e-10 and rel(mine[1], theirs[1][sub.rows]) <= 1e-10
    else:
        with pytest.raises(ValueError, match="not a member of process_group"):
            vocab_parallel_sod_loss(p["sh"], p["sw"], p["th"], p["tw"], p["mask"], process_group=pair)
    lp = vocab_parallel_token_logprobs(p["sh"], p["sw"], p["y"], process_group=singles[ctx.rank], bias=p["sb"])
    full_lp = fused_token_logprobs(p["sh"], p["sw"], p["y"], bias=p["sb"], backend="torch")
    assert rel(lp, full_lp) <= 1e-12
    with pytest.raises(TypeError, match="process_group must be"):
        vocab_parallel_token_logprobs(p["sh"], p["sw"], p["y"], process_group="world")
    dist.barrier()


def check_triton_backend(ctx: Ctx, seed: int) -> None:
    """The Triton statistics / gradient kernels on each rank's shard (the interpreter on CPU)."""
    p = problem(seed + 800, ctx.vocab, torch.float32, bias=True, B=1, T=7)
    sw, sb = shard(p["sw"], ctx), shard(p["sb"], ctx)
    tw, tb = shard(p["tw"], ctx, TEACHER_PAD), shard(p["tb"], ctx, TEACHER_PAD)
    loss = vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], vocab_start=ctx.start, target_ids=p["y"],
                                   student_bias=sb, teacher_bias=tb, step_divergence="sampled", backend="triton")
    full = fused_sod_loss(p["sh"], p["sw"], p["th"], p["tw"], p["mask"], target_ids=p["y"], student_bias=p["sb"],
                          teacher_bias=p["tb"], step_divergence="sampled", backend="torch")
    assert rel(loss, full) <= 1e-5
    mine, theirs = _grads(loss, [p["sh"], sw, sb]), _grads(full, [p["sh"], p["sw"], p["sb"]])
    assert rel(mine[0], theirs[0]) <= 1e-4
    assert rel(mine[1], theirs[1][ctx.rows]) <= 1e-4 and rel(mine[2], theirs[2][ctx.rows]) <= 1e-4
    lp, ent = vocab_parallel_token_logprobs(p["sh"], sw, p["y"], vocab_start=ctx.start, bias=sb, backend="triton",
                                            return_entropy=True)
    flp, fent = fused_token_logprobs(p["sh"], p["sw"], p["y"], bias=p["sb"], return_entropy=True, backend="torch")
    assert rel(lp, flp) <= 1e-5 and rel(ent, fent) <= 1e-5
    mine = _grads((lp + 0.5 * ent).sum(), [p["sh"], sw, sb])
    theirs = _grads((flp + 0.5 * fent).sum(), [p["sh"], p["sw"], p["sb"]])
    assert rel(mine[0], theirs[0]) <= 1e-4
    assert rel(mine[1], theirs[1][ctx.rows]) <= 1e-4 and rel(mine[2], theirs[2][ctx.rows]) <= 1e-4


def _check_pair(ctx: Ctx, tag: str, out, full, mine, full_in, tol_v: float, tol_g: float) -> None:
    """A vocabulary-parallel output against the single-process one: values, then the gradients of an upstream
    weighting (hidden whole, weight and bias this rank's rows)."""
    out, full = (out, full) if isinstance(out, tuple) else ((out,), (full,))
    for o, f in zip(out, full):
        assert rel(o, f) <= tol_v, (tag, rel(o, f))
    ups = [rand_like(o, 7 + k) for k, o in enumerate(out)]
    a = _grads(sum((o * u).sum() for o, u in zip(out, ups)), mine)
    b = _grads(sum((f * u).sum() for f, u in zip(full, ups)), full_in)
    for name, x, y in zip(("hidden", "weight", "bias"), a, b):
        y = y if name == "hidden" else y[ctx.rows]
        assert rel(x, y) <= tol_g, (tag, name, rel(x, y))


def check_softcaps(ctx: Ctx, seed: int) -> None:
    """Logit soft-capping in every vocabulary-parallel form, on both backends, against the single-process form
    (itself checked against the float64 reference); the caps bite (raw logits well beyond them)."""
    from sod_kernels import fused_sparse_sod_loss, fused_topk_logprobs, vocab_parallel_sparse_sod_loss

    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        tol_v, tol_g = TOL[dtype]
        p = problem(seed + 900, ctx.vocab, dtype, bias=True, scale=6.0)
        sw, sb = shard(p["sw"], ctx), shard(p["sb"], ctx)
        tw, tb = shard(p["tw"], ctx, TEACHER_PAD), shard(p["tb"], ctx, TEACHER_PAD)
        mine, full_in = [p["sh"], sw, sb], [p["sh"], p["sw"], p["sb"]]
        tag = f"rank {ctx.rank} softcap {backend}"
        caps = dict(student_softcap=2.0, teacher_softcap=3.0)
        kw = dict(target_ids=p["y"], step_divergence="sampled", temperature=0.9)
        out = vocab_parallel_sod_loss(p["sh"], sw, p["th"], tw, p["mask"], vocab_start=ctx.start, student_bias=sb,
                                      teacher_bias=tb, backend=backend, **caps, **kw)
        full = fused_sod_loss(p["sh"], p["sw"], p["th"], p["tw"], p["mask"], student_bias=p["sb"],
                              teacher_bias=p["tb"], backend="torch", **caps, **kw)
        plain = fused_sod_loss(p["sh"], p["sw"], p["th"], p["tw"], p["mask"], student_bias=p["sb"],
                               teacher_bias=p["tb"], backend="torch", **kw)
        assert rel(plain, full) > 1e-2, tag  # the caps change the loss
        _check_pair(ctx, tag + " sod", out, full, mine, full_in, tol_v, tol_g)
        out = vocab_parallel_token_logprobs(p["sh"], sw, p["y"], vocab_start=ctx.start, bias=sb, backend=backend,
                                            return_entropy=True, temperature=0.9, softcap=2.0)
        full = fused_token_logprobs(p["sh"], p["sw"], p["y"], bias=p["sb"], return_entropy=True, backend="torch",
                                    temperature=0.9, softcap=2.0)
        _check_pair(ctx, tag + " logprobs", out, full, mine, full_in, tol_v, tol_g)
        with torch.no_grad():
            old = full[0].detach() + 0.2
        # Mostly positive advantages (both signs present): a sum of terms of both signs that nearly cancels
        # would judge float32 rounding against a small total.
        adv = rand_like(old, seed) - 0.75
        out = vocab_parallel_policy_loss(p["sh"], sw, p["y"], old, adv, p["mask"], vocab_start=ctx.start,
                                         student_bias=sb, backend=backend, reduction="sum", student_softcap=2.0)
        full = fused_sod_policy_loss(p["sh"], p["sw"], p["y"], old, adv, p["mask"], student_bias=p["sb"],
                                     backend="torch", reduction="sum", student_softcap=2.0)
        _check_pair(ctx, tag + " policy", out, full, mine, full_in, tol_v, tol_g)
        with torch.no_grad():
            ids, lp = fused_topk_logprobs(p["th"].double(), p["tw"][:ctx.vocab].double(), 4)
        out = vocab_parallel_sparse_sod_loss(p["sh"], sw, ids, lp.to(dtype), p["mask"], vocab_start=ctx.start,
                                             student_bias=sb, backend=backend, student_softcap=2.0, **kw)
        full = fused_sparse_sod_loss(p["sh"], p["sw"], ids, lp.to(dtype), p["mask"], student_bias=p["sb"],
                                     backend="torch", student_softcap=2.0, **kw)
        _check_pair(ctx, tag + " sparse", out, full, mine, full_in, tol_v, tol_g)


def test_vocab_parallel_softcaps(tmp_path, monkeypatch):
    run_ranks(check_softcaps, 2, tmp_path, monkeypatch)


# ------------------------------------------------------------------------------------------ module forms
def _flat(out) -> list:
    """An output's tensors: a tensor, a tuple of them, or a stats dataclass (its tensor fields, in order)."""
    if dataclasses.is_dataclass(out):
        out = tuple(getattr(out, f.name) for f in dataclasses.fields(out))
    return [x for x in (out if isinstance(out, tuple) else (out,)) if isinstance(x, torch.Tensor)]


def check_module_forms(ctx: Ctx, seed: int) -> None:
    """Each vocabulary-parallel module (options, ``process_group`` and ``vocab_start`` in the constructor) gives
    exactly its function's outputs and shard gradients, on the same ranks and inputs."""
    from sod_kernels import fused_topk_logprobs, vocab_parallel_sparse_sod_loss

    p = problem(seed + 1000, ctx.vocab, torch.float64, bias=True, scale=4.0)
    sw, sb = shard(p["sw"], ctx), shard(p["sb"], ctx)
    tw, tb = shard(p["tw"], ctx, TEACHER_PAD), shard(p["tb"], ctx, TEACHER_PAD)
    with torch.no_grad():
        ids, lp = fused_topk_logprobs(p["th"], p["tw"][:ctx.vocab], 3)
        old = fused_token_logprobs(p["sh"], p["sw"], p["y"], bias=p["sb"], backend="torch") + 0.2
    adv = rand_like(old, seed) - 1.0
    place = dict(process_group=dist.group.WORLD, vocab_start=ctx.start)
    sod = dict(divergence="forward_kl", step_divergence="sampled", temperature=0.8, coef=1.3, return_stats=True,
               student_softcap=2.5, backend="torch")
    sparse = dict(step_divergence="sampled", reduction="none", temperature=1.2, student_softcap=2.0,
                  backend="torch")
    policy = dict(clip_low=0.1, dual_clip=2.5, reduction="sum", return_stats=True, student_softcap=3.0,
                  backend="torch")
    logprobs = dict(temperature=0.9, return_entropy=True, softcap=2.0, backend="torch")
    cases = [
        (VocabParallelSODLoss(**place, **sod), vocab_parallel_sod_loss, (p["sh"], sw, p["th"], tw, p["mask"]),
         dict(target_ids=p["y"], student_bias=sb, teacher_bias=tb), sod),
        (VocabParallelSparseSODLoss(**place, **sparse), vocab_parallel_sparse_sod_loss,
         (p["sh"], sw, ids, lp, p["mask"]), dict(target_ids=p["y"], student_bias=sb), sparse),
        (VocabParallelPolicyLoss(**place, **policy), vocab_parallel_policy_loss,
         (p["sh"], sw, p["y"], old, adv, p["mask"]), dict(student_bias=sb), policy),
        (VocabParallelTokenLogprobs(**place, **logprobs), vocab_parallel_token_logprobs, (p["sh"], sw, p["y"]),
         dict(bias=sb), logprobs),
    ]
    for module, fn, args, kwargs, options in cases:
        tag = f"rank {ctx.rank} {type(module).__name__}"
        got, want = _flat(module(*args, **kwargs)), _flat(fn(*args, **kwargs, **place, **options))
        assert len(got) == len(want) > 0, tag
        assert all(torch.equal(g, w) for g, w in zip(got, want)), tag
        got, want = [g for g in got if g.requires_grad], [w for w in want if w.requires_grad]
        ups = [rand_like(w, seed + k) for k, w in enumerate(want)]
        mine = _grads(sum((g * u).sum() for g, u in zip(got, ups)), [p["sh"], sw, sb])
        theirs = _grads(sum((w * u).sum() for w, u in zip(want, ups)), [p["sh"], sw, sb])
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs)), tag + " gradients"
        assert f"vocab_start={ctx.start}" in repr(module), tag


def test_vocab_parallel_module_forms(tmp_path, monkeypatch):
    run_ranks(check_module_forms, 2, tmp_path, monkeypatch)


MODULE_FORMS = (VocabParallelSODLoss, VocabParallelSparseSODLoss, VocabParallelPolicyLoss, VocabParallelTokenLogprobs)


@pytest.mark.parametrize("cls", MODULE_FORMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("option,value,error,match", [
    ("process_group", "world", TypeError, "process_group must be a torch.distributed.ProcessGroup"),
    ("vocab_start", -1, ValueError, "vocab_start must be an int >= 0"),
    ("vocab_start", 2.0, ValueError, "vocab_start must be an int"),
    ("reduce_hidden_grad", 1, TypeError, "reduce_hidden_grad must be a bool"),
    ("backend", "cuda", ValueError, "backend must be one of"),
    ("chunk_size", 0, ValueError, "chunk_size"),
    ("temperature", 0.0, ValueError, "temperature must be a finite number > 0"),
])
def test_module_forms_check_their_options(cls, option, value, error, match):
    """Built in a process without torch.distributed initialized: the options are checked at construction."""
    assert not dist.is_initialized()
    with pytest.raises(error, match=match):
        cls(**{option: value})


@pytest.mark.parametrize("cls,option,value,match", [
    (VocabParallelSODLoss, "divergence", "js", "divergence must be one of"),
    (VocabParallelSODLoss, "teacher_softcap", -2.0, "teacher_softcap"),
    (VocabParallelSparseSODLoss, "step_divergence", "max", "step_divergence must be one of"),
    (VocabParallelSparseSODLoss, "student_softcap", 0.0, "student_softcap"),
    (VocabParallelPolicyLoss, "clip_low", 1.0, "clip_low must be < 1"),
    (VocabParallelPolicyLoss, "dual_clip", 0.5, "dual_clip must be > 1"),
    (VocabParallelPolicyLoss, "reduction", "mean", "reduction must be one of"),
    (VocabParallelTokenLogprobs, "softcap", float("inf"), "softcap"),
])
def test_module_forms_check_their_own_options(cls, option, value, match):
    with pytest.raises(ValueError, match=match):
        cls(**{option: value})


@pytest.mark.parametrize("cls", MODULE_FORMS, ids=lambda c: c.__name__)
def test_module_forms_take_options_only(cls):
    """Explicit keyword options (no ``**kwargs``); per-batch tensors are not options."""
    for fn in (cls.__init__, cls.forward):
        kinds = {q.kind for q in inspect.signature(fn).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds, fn
    for name in ("target_ids", "student_bias", "bias", "response_mask", "step_ids"):
        with pytest.raises(TypeError):
            cls(**{name: torch.zeros(1)})
    module = cls(vocab_start=5)
    assert module.options["vocab_start"] == 5 and module.options["process_group"] is None


# ------------------------------------------------------------------------------------------- running
def _rank_main(rank: int, world: int, init_file: str, seed: int, checks, backend: str) -> None:
    global RANK_DEVICE
    torch.set_num_threads(1)
    options = {}
    if backend == "nccl":  # one GPU a rank; the checks' inputs live on it
        RANK_DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(RANK_DEVICE)
        options["device_id"] = RANK_DEVICE
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), **options)
    try:
        vocab, sizes, starts = LAYOUTS[world]
        checks(Ctx(rank, world, vocab, sizes[rank], starts[rank]), seed)
    finally:
        dist.destroy_process_group()
    leave_rank()


def leave_rank() -> None:
    """End a rank whose checks passed at once: gloo's threads can outlive ``destroy_process_group`` and abort the
    process during interpreter shutdown (SIGABRT, "terminate called without an active exception") after
    checks that passed, as ``python -m trainer`` documents for its ranks, which leave the same way."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(checks, world: int, tmp_path, monkeypatch, backend: str = "gloo") -> None:
    """``checks(ctx, seed)`` on ``world`` spawned ranks (the shards of ``LAYOUTS[world]``): gloo on CPU, or
    ``backend='nccl'`` with rank r on GPU r; fresh inputs from a random seed that a failure reports."""
    seed = random.randrange(1 << 30)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # the ranks talk over the loopback interface
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    try:
        mp.spawn(_rank_main, args=(world, str(tmp_path / "store"), seed, checks, backend), nprocs=world, join=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the seed
        raise AssertionError(f"vocabulary-parallel check failed ({backend}, {world} ranks, seed {seed}): "
                             f"{exc}") from exc


def nccl_world() -> int:
    """Ranks of the NCCL tests: one a GPU (NCCL refuses two ranks on one GPU), at most 3; 0 without CUDA."""
    return min(torch.cuda.device_count(), 3) if torch.cuda.is_available() else 0


# (backend, ranks) of the spawned-group tests: gloo on CPU, and NCCL where CUDA exists.
RANK_CASES = [("gloo", 2), ("gloo", 3),
              pytest.param("nccl", nccl_world(), marks=pytest.mark.skipif(nccl_world() == 0,
                                                                          reason="NCCL needs a CUDA GPU"))]


def all_checks(ctx: Ctx, seed: int) -> None:
    for dtype in (torch.float64, torch.float32):
        check_sod_loss(ctx, dtype, seed)
        check_token_logprobs(ctx, dtype, seed)
        check_policy_loss(ctx, dtype, seed)
    check_all_masked(ctx, seed)
    if ctx.world > 1:  # one rank: its share is the whole gradient, and no shard can overlap another
        check_unreduced_hidden_grad(ctx, seed)
        check_validation(ctx, seed)
    if ctx.world <= 2:
        check_deterministic_and_contract(ctx, seed)
        check_bfloat16(ctx, seed)
        check_triton_backend(ctx, seed)
    else:
        check_groups(ctx, seed)


@pytest.mark.parametrize("backend, world", RANK_CASES)
def test_vocab_parallel_matches_single_process(backend, world, tmp_path, monkeypatch):
    run_ranks(all_checks, world, tmp_path, monkeypatch, backend)


def test_needs_an_initialized_process_group():
    assert not dist.is_initialized()  # the ranks live in spawned processes; this one never joins a group
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_token_logprobs(h, w, torch.zeros(3, dtype=torch.long))


def test_torchrun_example(tmp_path):
    """examples/vocab_parallel_torchrun.py under torchrun with 2 CPU ranks: the sharded loss equals the
    single-process loss, falls, and the replicated hidden states stay identical on every rank."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(ROOT / "examples" / "vocab_parallel_torchrun.py")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    losses = [float(x) for x in re.findall(r"step \d: loss ([\d.]+)", run.stdout)]
    (single,) = re.findall(r"single-process, full heads: ([\d.]+)", run.stdout)
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0], run.stdout
    assert abs(losses[0] - float(single)) <= 1e-5 * float(single), run.stdout
    assert "2 ranks, shards of [501, 500] rows; hidden states identical on every rank: True" in run.stdout
