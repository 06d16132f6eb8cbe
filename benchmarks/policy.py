"""Benchmarks of the policy-gradient helpers (GitHub issue 4).

1. Step weights / advantages: :func:`sod_kernels.sod_step_weights`, :func:`sod_kernels.sod_advantages` and
   :func:`sod_kernels.sod_policy_inputs` (vectorised) against the per-token Python loop of
   ``reference/authors_loop.py`` at rollout sizes (B = 64..1024 rows, T = 4k..20k tokens).  The loop is
   slow, so it is timed on ``loop_rows`` rows only and scaled per row to the full batch (its cost is
   linear in the rows); every record says so (``loop_rows_timed``, ``loop_extrapolated``).
2. Sampled-token log-probs: :func:`sod_kernels.fused_token_logprobs` against the materialized
   ``log_softmax(hidden @ W.T).gather(...)``, forward + backward: time (median of repeats after a warm-up)
   and the extra memory of one iteration.  On CPU each case runs in a fresh subprocess and the memory is
   its peak RSS during the iteration minus the RSS before it (``benchmarks.measure.cpu_extra_memory``);
   on CUDA it is ``max_memory_allocated`` minus the allocation before it.

Importable: :func:`bench_step_weights`, :func:`bench_token_logprobs`, :func:`policy_benchmarks` (what
``benchmarks/policy_bridge.py`` calls) return dicts.  CLI: ``python -m benchmarks.policy [--quick]``
writes ``benchmarks/results/policy_<device>_<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import measure
from reference.authors_loop import authors_sod_advantages, authors_step_weights
from sod_kernels import fused_token_logprobs, sod_advantages, sod_policy_inputs, sod_step_weights

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Rollout shapes of a tool-integrated trajectory (tokens): prompt, assistant turns and tool outputs.
PROMPT_TOKENS = (200, 800)
TURN_TOKENS = (50, 400)
TOOL_TOKENS = (20, 300)
MIN_RESPONSE_SHARE = 0.5  # each row's trajectory fills between this share of T and all of it

STEP_SIZES = [(64, 4096), (256, 8192), (1024, 4096), (1024, 20480)]
STEP_SIZES_QUICK = [(64, 4096)]
LOGPROB_SIZES_CPU = [(512, 256, 32000), (2048, 256, 32000), (1024, 256, 151936)]
LOGPROB_SIZES_CPU_QUICK = [(256, 128, 32000)]
LOGPROB_SIZES_CUDA = [(4096, 1024, 151936), (16384, 1024, 151936), (16384, 1024, 32000)]
LOGPROB_SIZES_CUDA_QUICK = [(4096, 1024, 32000)]
LOOP_ROWS = 8
REPS = 5
LOGPROB_REPS_CPU = 3
TIME_BUDGET_S = 30.0
SUBPROCESS_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------------- inputs
def rollout_batch(B: int, T: int, seed: int = 0, device: str = "cpu"):
    """``(mask [B, T] int64, old_logprobs [B, T] fp32, teacher_logprobs [B, T] fp32, rewards [B], group_ids [B])``.

    Each row: a prompt (0s), then alternating assistant turns (1s) and tool outputs (0s) up to a random
    trajectory length, then padding (0s).  Old log-probs in [-3, 0]; the teacher's are the old ones plus
    noise whose scale drifts from step to step, so the step weights vary.
    """
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    mask = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        end = rand(int(MIN_RESPONSE_SHARE * T), T)
        t = min(rand(*PROMPT_TOKENS), end)
        while t < end:
            turn = rand(*TURN_TOKENS)
            mask[b, t:min(t + turn, end)] = 1
            t += turn + rand(*TOOL_TOKENS)
    old = -3.0 * torch.rand(B, T, generator=g)
    drift = torch.cumsum(mask.roll(1, dims=1) < mask, dim=1).float()  # step counter along the row
    teacher = old - torch.rand(B, T, generator=g) * (0.2 + 0.05 * drift)
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    group_ids = torch.arange(B) // 8
    return tuple(x.to(device) for x in (mask, old, teacher, rewards, group_ids))


# -------------------------------------------------------------------------------------- environment
def environment(device: str) -> dict:
    import triton

    from benchmarks.worker import cpu_model_name

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "sod_kernels", "benchmarks/policy.py",
                                     "reference"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_model_name()
    return {"device": device, "device_name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton.__version__, "git_commit": commit,
            "git_dirty_sources": dirty, "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _median_time(fn, device: str, reps: int, budget_s: float) -> dict:
    fn()  # warm-up
    _sync(device)

    def step():
        fn()
        _sync(device)

    return measure.summarize(measure.cpu_times(step, lambda: None, reps, budget_s))


# --------------------------------------------------------------------------------------- step weights
def bench_step_weights(B: int, T: int, *, loop_rows: int = LOOP_ROWS, reps: int = REPS, device: str = "cpu",
                       seed: int = 0) -> dict:
    """Vectorised step weights / advantages vs the per-token loop (timed on ``loop_rows`` rows, scaled).

    Returns a dict with the sizes, number of steps, and per operation the median seconds of the vectorised
    call, the loop's seconds for the whole batch (extrapolated from ``loop_rows`` rows) and the speed-up.
    """
    mask, old, teacher, rewards, groups = rollout_batch(B, T, seed, device)
    grpo = torch.zeros(B, device=device)
    steps = (mask.roll(1, dims=1) < mask).sum(1).float()
    record = {"bench": "step_weights", "B": B, "T": T, "tokens": B * T, "masked_tokens": int(mask.sum()),
              "mean_steps_per_row": steps.mean().item(), "max_steps_per_row": int(steps.max()),
              "dtype": str(old.dtype).replace("torch.", ""), "device": device, "loop_rows_timed": min(loop_rows, B),
              "loop_extrapolated": min(loop_rows, B) < B}
    rows = min(loop_rows, B)
    sub = [x[:rows].cpu() for x in (mask, old, teacher)]
    ops = {
        "sod_step_weights": (lambda: sod_step_weights(old, teacher, mask),
                             lambda: authors_step_weights(sub[1], sub[2], sub[0])),
        "sod_advantages": (lambda: sod_advantages(grpo, old, teacher, mask),
                           lambda: authors_sod_advantages(grpo[:rows].cpu(), sub[1], sub[2], sub[0])),
        "sod_policy_inputs": (lambda: sod_policy_inputs(rewards, groups, old, teacher, mask), None),
    }
    for name, (vectorised, loop) in ops.items():
        vec = _median_time(vectorised, device, reps, TIME_BUDGET_S)
        entry = {"vectorised_median_s": vec["median_s"], "vectorised_reps": vec["reps"]}
        if loop is not None:
            start = time.perf_counter()
            loop()
            per_row = (time.perf_counter() - start) / rows
            entry.update(loop_s_per_row=per_row, loop_total_s=per_row * B,
                         speedup=per_row * B / vec["median_s"])
        record[name] = entry
    return record


# ------------------------------------------------------------------------------------------ log-probs
def _logprob_case(method: str, N: int, H: int, V: int, dtype: str, device: str, reps: int,
                  threads: int | None = None) -> dict:
    """Run one log-prob case in this process: time and extra memory of forward + backward."""
    if threads:
        torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(N + H + V)
    hidden = torch.randn(N, H, generator=g, device=device).to(dt).requires_grad_()
    weight = (torch.randn(V, H, generator=g, device=device) / H ** 0.5).to(dt).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g, device=device)

    if method == "fused":
        def step():
            fused_token_logprobs(hidden, weight, y, check_inputs=False).sum().backward()
    else:
        def step():
            logits = hidden @ weight.T
            torch.log_softmax(logits.float(), dim=-1).gather(-1, y[:, None]).sum().backward()

    def before():
        hidden.grad = None
        weight.grad = None

    record = {"method": method, "N": N, "H": H, "V": V, "dtype": dtype, "device": device,
              "threads": torch.get_num_threads()}
    try:
        if device.startswith("cuda"):
            step()
            extra, first_s, how = measure.cuda_extra_memory(step, before, device)
            times, timer = measure.cuda_times(step, [hidden, weight], first_s)
            summary = measure.summarize(times)
        else:
            before()
            step()  # warm-up
            extra, first_s, how = measure.cpu_extra_memory(step, before)
            summary = measure.summarize(measure.cpu_times(step, before, reps, TIME_BUDGET_S, already=[first_s]))
            timer = "time.perf_counter"
        record.update(median_s=summary["median_s"], reps=summary["reps"], extra_memory_bytes=extra,
                      memory_method=how, timer=timer, oom=False)
    except Exception as exc:  # noqa: BLE001 - an allocation failure is a result, anything else is re-raised
        if not measure.is_oom(exc):
            raise
        record.update(oom=True, error=str(exc)[:200])
    return record


def bench_token_logprobs(N: int, H: int, V: int, *, dtype: str = "float32", device: str = "cpu",
                         reps: int = REPS) -> dict:
    """Fused vs materialized sampled-token log-probs (forward + backward) at one size.

    On CPU each method runs in a fresh subprocess (so its peak RSS is its own); on CUDA in-process.
    Returns ``{"bench": "token_logprobs", "N", "H", "V", "dtype", "fused": {...}, "naive": {...}}`` with
    ``median_s`` and ``extra_memory_bytes`` per method, and the ratios naive / fused.
    """
    out = {"bench": "token_logprobs", "N": N, "H": H, "V": V, "dtype": dtype, "device": device,
           "logits_bytes_fp32": N * V * 4}
    for method in ("fused", "naive"):
        if device.startswith("cuda"):
            out[method] = _logprob_case(method, N, H, V, dtype, device, reps)
            continue
        args = json.dumps({"method": method, "N": N, "H": H, "V": V, "dtype": dtype, "device": device, "reps": reps,
                           "threads": torch.get_num_threads()})
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(measure.MALLOC_MMAP_THRESHOLD_BYTES))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.policy", "--worker", args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"log-prob worker failed ({method}, N={N}, V={V}): {proc.stderr[-1500:]}")
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    fused, naive = out["fused"], out["naive"]
    if not fused.get("oom") and not naive.get("oom"):
        out["speedup"] = naive["median_s"] / fused["median_s"]
        out["memory_ratio"] = naive["extra_memory_bytes"] / max(fused["extra_memory_bytes"], 1)
    return out


# ------------------------------------------------------------------------------------------- reports
def _mib(x) -> str:
    return "OOM" if x is None else f"{x / 2 ** 20:,.1f}"


def markdown(env: dict, step_records: list[dict], logprob_records: list[dict]) -> str:
    lines = [
        "# Policy-gradient helpers: benchmark",
        "",
        f"Device: {env['device_name']} ({env['device']}, {env['threads']} threads); torch {env['torch']}, "
        f"triton {env['triton']}; commit `{env['git_commit'][:12]}`"
        + (" (with uncommitted source changes)" if env.get("git_dirty_sources") else "") + f"; {env['date_utc']}.",
        "",
        "## Step weights and advantages: vectorised vs the per-token loop",
        "",
        "The loop (`reference/authors_loop.py`, plain Python over rows and tokens, inputs converted with "
        "`.tolist()`) is timed on the first `loop rows` rows and scaled linearly to the batch. Vectorised "
        "times are medians of repeated calls after a warm-up. Inputs float32, mask int64; rollouts with a "
        "prompt, alternating assistant turns (50-400 tokens) and tool outputs (20-300 tokens), and padding.",
        "",
        "| B | T | steps/row (mean, max) | op | vectorised (s) | loop, whole batch (s) | loop rows timed | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in step_records:
        for op in ("sod_step_weights", "sod_advantages", "sod_policy_inputs"):
            e = r[op]
            loop = f"{e['loop_total_s']:.2f}" if "loop_total_s" in e else "-"
            speed = f"{e['speedup']:,.0f}x" if "speedup" in e else "-"
            lines.append(f"| {r['B']} | {r['T']} | {r['mean_steps_per_row']:.1f}, {r['max_steps_per_row']} | `{op}` "
                         f"| {e['vectorised_median_s']:.4f} | {loop} | {r['loop_rows_timed']} | {speed} |")
    lines += [
        "",
        "## Sampled-token log-probs: fused vs `log_softmax(hidden @ W.T).gather(...)`",
        "",
        "Forward + backward (gradients to hidden and weight). Time: median of repeats after a warm-up. "
        "Extra memory: peak during one iteration minus what was allocated before it (CPU: peak RSS of a "
        "fresh subprocess per case; CUDA: `max_memory_allocated`). `fused` uses backend `auto` "
        "(chunked PyTorch on CPU, Triton on CUDA).",
        "",
        "| N | H | V | dtype | fused (s) | naive (s) | speed-up | fused extra (MiB) | naive extra (MiB) "
        "| memory ratio | fp32 logits (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in logprob_records:
        f, n = r["fused"], r["naive"]
        ft = "OOM" if f.get("oom") else f"{f['median_s']:.3f}"
        nt = "OOM" if n.get("oom") else f"{n['median_s']:.3f}"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        mr = f"{r['memory_ratio']:.1f}x" if "memory_ratio" in r else "-"
        lines.append(f"| {r['N']} | {r['H']} | {r['V']} | {r['dtype']} | {ft} | {nt} | {sp} "
                     f"| {_mib(f.get('extra_memory_bytes'))} | {_mib(n.get('extra_memory_bytes'))} | {mr} "
                     f"| {_mib(r['logits_bytes_fp32'])} |")
    if env["device"] == "cpu":
        lines += [
            "",
            "Reading the CPU numbers: the fused log-prob path is compute-bound like the naive one and recomputes "
            "the logits in the backward pass (4 logit-sized matrix products instead of 3), so on CPU it trades "
            "some time for memory that stays flat in N (its extra memory is the fp32 d(weight) buffer plus two "
            "chunk blocks); speed is the Triton path's job, on a GPU. The vectorised step helpers do ~50 passes "
            "over `[B, T]`-sized tensors (their per-step buffers have capacity T, so that they need no host "
            "sync on a GPU); on one CPU thread that is only a few times faster than the Python loop. Timings "
            "on a shared machine carry noise of tens of percent between runs.",
        ]
    return "\n".join(lines) + "\n"


def policy_benchmarks(device: str = "cpu", quick: bool = False) -> dict:
    """Run both benchmarks; ``{"environment", "records", "markdown"}`` (what the harness embeds)."""
    cuda = device.startswith("cuda")
    step_sizes = STEP_SIZES_QUICK if quick else STEP_SIZES
    if cuda:
        logprob_sizes = LOGPROB_SIZES_CUDA_QUICK if quick else LOGPROB_SIZES_CUDA
        dtype = "bfloat16"
    else:
        logprob_sizes = LOGPROB_SIZES_CPU_QUICK if quick else LOGPROB_SIZES_CPU
        dtype = "float32"
    reps = 3 if quick else REPS
    logprob_reps = reps if cuda else min(reps, LOGPROB_REPS_CPU)
    env = environment(device)
    steps = [bench_step_weights(B, T, device=device, reps=reps) for B, T in step_sizes]
    logprobs = [bench_token_logprobs(N, H, V, dtype=dtype, device=device, reps=logprob_reps)
                for N, H, V in logprob_sizes]
    return {"environment": env, "records": steps + logprobs, "markdown": markdown(env, steps, logprobs)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks of the SOD policy-gradient helpers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small size per benchmark")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 avoids oversubscribing a shared machine")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one log-prob case, JSON on stdout
    args = parser.parse_args(argv)
    if args.worker:
        case = json.loads(args.worker)
        print(json.dumps(_logprob_case(case["method"], case["N"], case["H"], case["V"], case["dtype"],
                                       case["device"], case["reps"], case.get("threads"))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    result = policy_benchmarks(args.device, args.quick)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    stem = f"policy_{kind}_{datetime.date.today().isoformat()}" + ("_quick" if args.quick else "")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{stem}.json").write_text(json.dumps(
        {"environment": result["environment"], "records": result["records"]}, indent=1) + "\n")
    (args.output_dir / f"{stem}.md").write_text(result["markdown"])
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
