"""Accuracy of the experimental dual-GEMM single pass (``fused_sod_loss(..., impl="dual_gemm")``) against float64,
under the Triton interpreter (CPU): ``python -m benchmarks.dual_gemm_accuracy [--out DIR]``.

For each input family (``benchmarks.inputs``: ``worst_case``, near-uniform softmaxes; ``lm_like``, peaked and
correlated), input dtype (float32, bfloat16) and divergence (reverse / forward KL), one problem is run through the
default single pass and through the dual-GEMM pass with fp16 and with bf16 stored arrays; each is compared with
the float64 reference (``reference.ref_fused_sod_loss``) on the same (input-dtype-rounded) values.  Reported:
relative errors ``|x - ref| / |ref|`` (Frobenius norms, as in the tests) of the loss, ``D`` (per token), and the
gradients ``d(hidden)``, ``d(weight)``, plus the largest per-token relative error of ``D``; then saturated softmaxes
(logits up to 1e5, identity lm_head) in float32 ulps of the largest logit.  The tables are printed as Markdown
and written to ``benchmarks/results/cpu/dual-gemm-accuracy-<commit>.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

SIZES = dict(N=64, V=512, Hs=64, Ht=96)
STEP_TOKENS = 16
RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
VARIANTS = (("default", None), ("dual_gemm", "fp16"), ("dual_gemm", "bf16"))


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


def measure(family: str, dtype: torch.dtype, divergence: str, seed: int = 0) -> list[dict]:
    from reference import ref_fused_sod_loss
    from sod_kernels import fused_sod_loss
    from sod_kernels.dense.dual_gemm import STORE_ENV

    from .inputs import make_inputs

    N, V, Hs, Ht = (SIZES[k] for k in ("N", "V", "Hs", "Ht"))
    x = make_inputs(family, N, V, Hs, Ht, dtype=dtype, device="cpu", seed=seed)
    sh, sw, th, tw = x.student_hidden, x.student_weight, x.teacher_hidden, x.teacher_weight
    ids = (torch.arange(N) // STEP_TOKENS).unsqueeze(0)
    ref_leaves = [sh.detach().double().requires_grad_(), sw.detach().double().requires_grad_()]
    ref_loss, ref = ref_fused_sod_loss(ref_leaves[0].unsqueeze(0), ref_leaves[1], th.double().unsqueeze(0),
                                       tw.double(), step_ids=ids, divergence=divergence)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    ref_D = ref["token_divergence"].detach().reshape(-1)
    rows = []
    for impl, store in VARIANTS:
        if store is not None:
            os.environ[STORE_ENV] = store
        try:
            leaves = [sh.detach().requires_grad_(), sw.detach().requires_grad_()]
            start = time.perf_counter()
            stats = fused_sod_loss(leaves[0].unsqueeze(0), leaves[1], th.unsqueeze(0), tw, step_ids=ids,
                                   divergence=divergence, backend="triton", impl=impl, return_stats=True)
            grads = torch.autograd.grad(stats.loss, leaves)
            seconds = time.perf_counter() - start
        finally:
            os.environ.pop(STORE_ENV, None)
        D = stats.token_divergence.detach().reshape(-1).double()
        rows.append({
            "family": family, "dtype": str(dtype).replace("torch.", ""), "divergence": divergence,
            "impl": impl if store is None else f"{impl} ({store} stored)",
            "loss": _rel(stats.loss.detach(), ref_loss.detach()), "D": _rel(D, ref_D),
            "D_max_token": float(((D - ref_D).abs() / ref_D.abs().clamp(min=1e-30)).max()),
            "d_hidden": _rel(grads[0], ref_grads[0]), "d_weight": _rel(grads[1], ref_grads[1]),
            "seconds": round(seconds, 1),
        })
    return rows


SATURATED = ((3.0, 3.0), (3000.0, 10.0), (3000.0, 3000.0), (3.0, 30000.0))


def saturated(student_std: float, teacher_std: float) -> list[dict]:
    """Reverse KL on logits of the given spreads (identity lm_head, 64 tokens x 64 columns, float32): the loss's
    relative error and the largest error of d(logits) in float32 ulps of the largest logit, per variant."""
    import math

    from sod_kernels import fused_sod_loss
    from sod_kernels.dense.dual_gemm import STORE_ENV

    from reference.sod_reference import ref_saturated_reverse_kl

    z_s, z_t, loss64, grad64 = ref_saturated_reverse_kl(student_std, teacher_std)
    largest = max(z_s.abs().max().item(), z_t.abs().max().item())
    ulp = 2.0 ** (math.frexp(largest)[1] - 24)
    eye = torch.eye(64)
    rows = []
    for impl, store in VARIANTS:
        if store is not None:
            os.environ[STORE_ENV] = store
        try:
            z = z_s.clone().requires_grad_()
            loss = fused_sod_loss(z[None], eye, z_t[None], eye, torch.ones(1, 64, dtype=torch.int64),
                                  step_divergence="none", reduction="sum", backend="triton", impl=impl)
            loss.backward()
        finally:
            os.environ.pop(STORE_ENV, None)
        err = (z.grad.double() - grad64)
        rows.append({"spread": f"{student_std:g} / {teacher_std:g}",
                     "impl": impl if store is None else f"{impl} ({store} stored)",
                     "loss": abs(loss.item() - loss64.item()) / abs(loss64.item()),
                     "ulps": err.abs().max().item() / ulp, "grad": _rel(z.grad, grad64)})
    return rows


def markdown(rows: list[dict], rev: str, sat: list[dict] = ()) -> str:
    import triton

    N, V, Hs, Ht = (SIZES[k] for k in ("N", "V", "Hs", "Ht"))
    lines = [
        f"# Dual-GEMM single pass: accuracy against float64 (commit {rev})",
        "",
        f"Device: CPU, Triton {triton.__version__} interpreter (`TRITON_INTERPRET=1`), torch {torch.__version__}. "
        f"Sizes: N={N} tokens (steps of {STEP_TOKENS}, \"kl\" step weights), V={V}, Hs={Hs}, Ht={Ht}; input families "
        "of `benchmarks/inputs.py`. Produced by `python -m benchmarks.dual_gemm_accuracy`.",
        "",
        "Relative errors `|x - ref| / |ref|` (Frobenius norms) against `reference.ref_fused_sod_loss` in float64 on "
        "the same input values; `D max/token`: the largest per-token relative error of D. The default row is the "
        "default single pass (float32 logit blocks); the dual-GEMM rows store `exp(z_s - tile max)` and the "
        "tile-centred `z_s - z_t` (forward KL: `exp(z_t - tile max)`) in 16 bits for the gradient, the statistics "
        "(loss, D) stay float32.",
        "",
        "| family | input dtype | divergence | impl | loss | D | D max/token | d(hidden) | d(weight) | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['family']} | {r['dtype']} | {r['divergence']} | {r['impl']} | {r['loss']:.1e} | "
                     f"{r['D']:.1e} | {r['D_max_token']:.1e} | {r['d_hidden']:.1e} | {r['d_weight']:.1e} | "
                     f"{r['seconds']} |")
    if sat:
        lines += [
            "",
            "Saturated softmaxes (reverse KL, identity lm_head, 64 tokens x 64 columns, float32 logits of standard "
            "deviation `student / teacher`): the loss's relative error, the largest d(logits) error in float32 ulps "
            "of the largest logit, and the gradient's relative error (norms).",
            "",
            "| logit spread (student / teacher) | impl | loss | max d(logits) error (ulps of max logit) | d(logits) |",
            "|---|---|---|---|---|",
        ]
        for r in sat:
            lines.append(f"| {r['spread']} | {r['impl']} | {r['loss']:.1e} | {r['ulps']:.2g} | {r['grad']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the Markdown result")
    parser.add_argument("--quick", action="store_true", help="reverse KL only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("benchmarks.dual_gemm_accuracy runs under the Triton interpreter: set TRITON_INTERPRET=1")
    rows = []
    divergences = ("reverse_kl",) if args.quick else ("reverse_kl", "forward_kl")
    for family in ("worst_case", "lm_like"):
        for dtype in (torch.float32, torch.bfloat16):
            for divergence in divergences:
                rows += measure(family, dtype, divergence)
                print(f"{family} {dtype} {divergence} done", file=sys.stderr, flush=True)
    sat = [r for spreads in SATURATED for r in saturated(*spreads)]
    rev = commit()
    table = markdown(rows, rev, sat)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"dual-gemm-accuracy-{rev}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
