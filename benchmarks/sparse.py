"""Benchmark of the sparse-teacher loss (``fused_sparse_sod_loss``): cost, memory, and error against k.

1. Cost: forward + backward of ``fused_sparse_sod_loss`` (gradients to the student's hidden states and
   weight) against a naive materialized implementation of the same loss (``[N, V]`` float32 logits,
   ``log_softmax``, a masked log-sum-exp for the tail, autograd), for ``k`` in ``K_VALUES``, on LM-like
   inputs (``benchmarks.inputs.make_inputs(family="lm_like")``; the teacher's top-k come from
   ``fused_topk_logprobs`` on the teacher model, outside the timing).  CPU: N = 4096, V = 32000, H = 256,
   float32; every case runs in a fresh subprocess and its extra memory is the peak RSS during one
   iteration minus the RSS before it (``benchmarks.measure.cpu_extra_memory``).  GPU mode (``--gpu``):
   N = 16384, Hs = 1024, V = 151936, bf16, in-process, ``max_memory_allocated``; it also times the dense
   ``fused_sod_loss`` against the teacher model itself (Ht = 2560) for scale.
2. Approximation error: the token-mean sparse KL and its student gradient against the dense (full
   vocabulary) KL of the same student and teacher, for ``k`` from 1 to ``ERROR_K_MAX`` (reverse and
   forward KL), on LM-like inputs (mean student entropy about 2 nats).  Plotted against ``k``.

CLI: ``python -m benchmarks.sparse [--gpu] [--quick] [--threads 1]`` writes
``benchmarks/results/sparse_<cpu|gpu>_<date>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import measure
from benchmarks.inputs import make_inputs
from sod_kernels import fused_sod_loss, fused_sparse_sod_loss, fused_topk_logprobs, step_weights_from_divergence
from sod_kernels.sparse.rows import TAIL_FLOOR, teacher_tail_floor

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
K_VALUES = (8, 32, 128)
CPU_SIZE = {"N": 4096, "V": 32000, "Hs": 256, "Ht": 256, "dtype": "float32"}
GPU_SIZE = {"N": 16384, "V": 151936, "Hs": 1024, "Ht": 2560, "dtype": "bfloat16"}
QUICK_SIZE = {"N": 512, "V": 4000, "Hs": 64, "Ht": 64, "dtype": "float32"}
ERROR_SIZE = {"N": 1024, "V": 32000, "Hs": 256, "Ht": 256}
ERROR_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_ERROR_SIZE = {"N": 128, "V": 4000, "Hs": 64, "Ht": 64}
MEMORY_LIMIT = 0.05       # the fused loss's extra memory must stay within 5% of the naive one's
REPS, QUICK_REPS = 3, 2
TIME_BUDGET_S = 60.0
SUBPROCESS_TIMEOUT_S = 1800


# ------------------------------------------------------------------------------------------- inputs
def build_case(size: dict, k: int, device: str, seed: int = 0):
    """LM-like student and teacher; the teacher's top-k ids / log-probs; every token distilled in steps."""
    dtype = getattr(torch, size["dtype"])
    inputs = make_inputs("lm_like", size["N"], size["V"], size["Hs"], size["Ht"], dtype=dtype, device=device,
                         seed=seed)
    with torch.no_grad():
        ids, logprobs = fused_topk_logprobs(inputs.teacher_hidden, inputs.teacher_weight, k)
    return inputs, ids, logprobs


def naive_sparse_loss(hidden, weight, ids, logprobs, step_ids, divergence: str = "reverse_kl"):
    """The same loss materialized: ``[N, V]`` float32 logits and log-softmax, autograd for the gradient."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    logq = logp.gather(1, ids)
    listed = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, ids, True)
    logQ = torch.logsumexp(logp.masked_fill(listed, float("-inf")), dim=-1)
    a = logprobs.float()
    P = (1 - a.exp().sum(-1)).clamp(0, 1)
    floor = teacher_tail_floor(ids.shape[1], logprobs.dtype)
    logPf, logQf = P.clamp(min=floor).log(), logQ.clamp(min=math.log(TAIL_FLOOR))
    if divergence == "reverse_kl":
        D = (logq.exp() * (logq - a)).sum(-1) + logQ.exp() * (logQf - logPf)
    else:
        D = (a.exp() * (a - logq)).sum(-1) + P * (logPf - logQf)
    weights = step_weights_from_divergence(D.detach()[None], step_ids).token_weights[0]
    return (weights * D).sum() / D.shape[0]


# ----------------------------------------------------------------------------------------- one case
def run_case(method: str, size: dict, k: int, device: str, reps: int, threads: int | None = None) -> dict:
    """Time and extra memory of one method's forward + backward, in this process."""
    if threads:
        torch.set_num_threads(threads)
    inputs, ids, logprobs = build_case(size, k, device)
    sh, sw = inputs.student_hidden, inputs.student_weight
    steps = inputs.step_ids

    if method == "fused":
        def step():
            fused_sparse_sod_loss(sh, sw, ids, logprobs, step_ids=steps[0], check_inputs=False).backward()
    elif method == "naive":
        def step():
            naive_sparse_loss(sh, sw, ids, logprobs, steps).backward()
    elif method == "dense":
        th, tw = inputs.teacher_hidden, inputs.teacher_weight

        def step():
            fused_sod_loss(sh, sw, th, tw, step_ids=steps[0], check_inputs=False).backward()
    else:
        raise ValueError(f"unknown method {method!r}")

    record = {"method": method, "k": k, **size, "device": device, "threads": torch.get_num_threads(),
              "teacher_mass_in_topk": float(logprobs.double().exp().sum(-1).mean())}
    try:
        if device.startswith("cuda"):
            step()
            extra, first_s, how = measure.cuda_extra_memory(step, inputs.zero_grads, device)
            times, timer = measure.cuda_times(step, [sh, sw], first_s)
        else:
            inputs.zero_grads()
            step()  # warm-up
            extra, first_s, how = measure.cpu_extra_memory(step, inputs.zero_grads)
            times = measure.cpu_times(step, inputs.zero_grads, reps, TIME_BUDGET_S, already=[first_s])
            timer = "time.perf_counter"
        summary = measure.summarize(times)
        record.update(median_s=summary["median_s"], min_s=summary["min_s"], reps=summary["reps"],
                      extra_memory_bytes=extra, memory_method=how, timer=timer, oom=False)
    except Exception as exc:  # noqa: BLE001 - an allocation failure is a result, anything else is re-raised
        if not measure.is_oom(exc):
            raise
        record.update(oom=True, error=str(exc)[:200])
    return record


def bench_cost(size: dict, ks, methods, device: str, reps: int, threads: int | None) -> list[dict]:
    """Every (k, method) case; on CPU each in a fresh subprocess so that its peak RSS is its own."""
    records = []
    for k in ks:
        for method in methods:
            if device.startswith("cuda"):
                records.append(run_case(method, size, k, device, reps))
                torch.cuda.empty_cache()
                continue
            args = json.dumps({"method": method, "size": size, "k": k, "device": device, "reps": reps,
                               "threads": threads})
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(measure.MALLOC_MMAP_THRESHOLD_BYTES))
            env.pop("TRITON_INTERPRET", None)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.sparse", "--worker", args], cwd=REPO_ROOT,
                                  env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
            if proc.returncode != 0:
                raise RuntimeError(f"sparse worker failed ({method}, k={k}): {proc.stderr[-1500:]}")
            records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return records


# ------------------------------------------------------------------------------------ error against k
def error_vs_k(size: dict, ks, device: str = "cpu", seed: int = 1) -> list[dict]:
    """Sparse vs dense KL (token means) and their student gradients for every k, both directions."""
    inputs = make_inputs("lm_like", size["N"], size["V"], size["Hs"], size["Ht"], device=device, seed=seed)
    sh, sw, th, tw = (x.detach() for x in (inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden,
                                           inputs.teacher_weight))
    steps = inputs.step_ids
    with torch.no_grad():
        ids_all, lp_all = fused_topk_logprobs(th, tw, max(ks))
    out = []
    for divergence in ("reverse_kl", "forward_kl"):
        h = sh.clone().requires_grad_()
        dense = fused_sod_loss(h[None], sw, th[None], tw, step_ids=steps, divergence=divergence,
                               step_divergence="none", return_stats=True)
        dense.loss.backward()
        g_dense = h.grad.double()
        kl_dense = float(dense.token_divergence.double().mean())
        for k in ks:
            h = sh.clone().requires_grad_()
            sparse = fused_sparse_sod_loss(h[None], sw, ids_all[None, :, :k], lp_all[None, :, :k], step_ids=steps,
                                           divergence=divergence, step_divergence="none", return_stats=True)
            sparse.loss.backward()
            g = h.grad.double()
            kl_sparse = float(sparse.token_divergence.double().mean())
            out.append({"divergence": divergence, "k": k, **size,
                        "teacher_mass_in_topk": float(lp_all[:, :k].double().exp().sum(-1).mean()),
                        "kl_dense": kl_dense, "kl_sparse": kl_sparse,
                        "kl_relative_error": (kl_dense - kl_sparse) / kl_dense,
                        "grad_relative_error": float((g - g_dense).norm() / g_dense.norm()),
                        "grad_cosine": float((g * g_dense).sum() / (g.norm() * g_dense.norm()))})
    return out


# ------------------------------------------------------------------------------------------ reports
def environment(device: str) -> dict:
    import triton

    from benchmarks.worker import cpu_model_name

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "sod_kernels", "benchmarks/sparse.py"],
                                    cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_model_name()
    return {"device": device, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": triton.__version__, "git_commit": commit, "git_dirty_sources": dirty,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def memory_verdicts(cost: list[dict]) -> list[dict]:
    """Per k: the fused / naive extra-memory ratio and whether it is within ``MEMORY_LIMIT``."""
    out = []
    for k in sorted({r["k"] for r in cost}):
        by = {r["method"]: r for r in cost if r["k"] == k}
        fused, naive = by.get("fused"), by.get("naive")
        if not fused or not naive or fused.get("oom"):
            continue
        if naive.get("oom"):
            out.append({"k": k, "ratio": None, "within_limit": True, "note": "naive ran out of memory"})
            continue
        ratio = fused["extra_memory_bytes"] / max(naive["extra_memory_bytes"], 1)
        out.append({"k": k, "ratio": ratio, "within_limit": ratio <= MEMORY_LIMIT,
                    "speedup": naive["median_s"] / fused["median_s"]})
    return out


def _mib(record: dict) -> str:
    return "OOM" if record.get("oom") else f"{record['extra_memory_bytes'] / 2 ** 20:,.1f}"


def _sec(record: dict) -> str:
    return "OOM" if record.get("oom") else f"{record['median_s']:.3f}"


def markdown(env: dict, size: dict, cost: list[dict], verdicts: list[dict], errors: list[dict], plot: str | None):
    lines = ["# Sparse teacher (top-k log-probs): benchmark", "",
             f"Device: {env['device_name']} ({env['device']}, {env['threads']} threads); torch {env['torch']}, "
             f"triton {env['triton']}; commit `{env['git_commit'][:12]}`"
             f"{' (uncommitted changes)' if env['git_dirty_sources'] else ''}; {env['date_utc']}.", "",
             "## Cost: fused vs materialized", "",
             f"N = {size['N']} tokens (all distilled, steps of 256 tokens), V = {size['V']}, H = {size['Hs']}, "
             f"{size['dtype']}; LM-like inputs; forward + backward (gradients to the student's hidden states and "
             "weight). Time: median of repeats after a warm-up. Extra memory: peak during one iteration minus "
             "what was allocated before it (CPU: peak RSS of a fresh subprocess per case; CUDA: "
             "`max_memory_allocated`). `naive` materializes the `[N, V]` float32 logits and log-softmax and "
             "differentiates with autograd; `dense` is `fused_sod_loss` against the teacher model itself.", "",
             "| k | teacher mass in top-k | method | time (s) | extra memory (MiB) |", "|---|---|---|---|---|"]
    for r in cost:
        lines.append(f"| {r['k']} | {r['teacher_mass_in_topk']:.4f} | {r['method']} | {_sec(r)} | {_mib(r)} |")
    lines += ["", f"Memory of the fused loss relative to the naive one (limit {MEMORY_LIMIT:.0%}):", ""]
    for v in verdicts:
        if v["ratio"] is None:
            lines.append(f"- k = {v['k']}: {v['note']}")
        else:
            lines.append(f"- k = {v['k']}: {v['ratio']:.1%} ({'within' if v['within_limit'] else 'ABOVE'} the "
                         f"limit); fused is {v['speedup']:.2f}x the naive speed")
    if errors:
        e0 = errors[0]
        lines += ["", "## Approximation error against k", "",
                  f"LM-like inputs, N = {e0['N']}, V = {e0['V']}, H = {e0['Hs']} (student mean entropy about 2 "
                  "nats); unweighted token mean (`step_divergence=\"none\"`). `relative error` = (dense KL - sparse "
                  "KL) / dense KL (never negative: coarse-graining cannot increase a KL); gradients with respect to "
                  "the student's hidden states.", ""]
        if plot:
            lines += [f"![error against k]({plot})", ""]
        lines += ["| divergence | k | teacher mass in top-k | dense KL | sparse KL | relative error | gradient "
                  "relative error | gradient cosine |", "|---|---|---|---|---|---|---|---|"]
        for r in errors:
            lines.append(f"| {r['divergence']} | {r['k']} | {r['teacher_mass_in_topk']:.4f} | {r['kl_dense']:.4f} "
                         f"| {r['kl_sparse']:.4f} | {r['kl_relative_error']:.3g} | {r['grad_relative_error']:.3g} "
                         f"| {r['grad_cosine']:.4f} |")
    return "\n".join(lines) + "\n"


def plot_errors(errors: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for divergence, style in (("reverse_kl", "o-"), ("forward_kl", "s--")):
        rows = [r for r in errors if r["divergence"] == divergence]
        ks = [r["k"] for r in rows]
        left.plot(ks, [max(r["kl_relative_error"], 1e-12) for r in rows], style, label=f"{divergence}: KL")
        left.plot(ks, [r["grad_relative_error"] for r in rows], style, alpha=0.5, label=f"{divergence}: gradient")
        right.plot(ks, [1 - r["teacher_mass_in_topk"] for r in rows], style, label="teacher tail mass")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("k (teacher ids per token)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("relative error vs the dense KL")
    left.set_title("sparse-teacher KL: error against k")
    left.legend(fontsize=8)
    right.set_ylabel("1 - teacher mass in top-k")
    right.set_title("teacher mass outside the top-k")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Sparse-teacher loss: cost against a materialized version, "
                                                 "and error against the dense KL as a function of k")
    parser.add_argument("--gpu", action="store_true", help="GPU mode: N=16384, Hs=1024, V=151936, bf16, on cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-error", action="store_true", help="skip the error-against-k study")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one cost case, JSON on stdout
    args = parser.parse_args(argv)
    if args.worker:
        case = json.loads(args.worker)
        print(json.dumps(run_case(case["method"], case["size"], case["k"], case["device"], case["reps"],
                                  case.get("threads"))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    size = QUICK_SIZE if args.quick else (GPU_SIZE if args.gpu else CPU_SIZE)
    methods = ("fused", "naive", "dense") if args.gpu else ("fused", "naive")
    env = environment(device)
    cost = bench_cost(size, K_VALUES, methods, device, QUICK_REPS if args.quick else REPS, args.threads)
    verdicts = memory_verdicts(cost)
    errors = [] if args.skip_error else error_vs_k(QUICK_ERROR_SIZE if args.quick else ERROR_SIZE,
                                                    ERROR_KS[:6] if args.quick else ERROR_KS, device)
    stem = f"sparse_{'gpu' if args.gpu else 'cpu'}_{datetime.date.today().isoformat()}" + \
        ("_quick" if args.quick else "")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    plot = None
    if errors:
        plot = f"{stem}.png"
        plot_errors(errors, args.output_dir / plot)
    text = markdown(env, size, cost, verdicts, errors, plot)
    (args.output_dir / f"{stem}.json").write_text(json.dumps(
        {"environment": env, "size": size, "cost": cost, "memory": verdicts, "error_vs_k": errors}, indent=1) + "\n")
    (args.output_dir / f"{stem}.md").write_text(text)
    print(text)
    return 0 if all(v["within_limit"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
