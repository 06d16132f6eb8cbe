"""The sparse-teacher loss on CPU: ``python -m benchmarks.sparse_cpu [--quick] [--reps R] [--out DIR]``.

Forward + backward (gradients to the student's hidden states and weight) of ``fused_sparse_sod_loss`` at
N = 4096 tokens, V = 32000, H = 256, k = 64 teacher ids per token, float32, LM-like inputs
(:func:`benchmarks.inputs.make_inputs`), one trajectory cut into ``"kl"`` steps of 256 tokens:

- ``single_pass``: the defaults (``memory="fast"``: the CPU single pass over whole-vocabulary row chunks with
  its compiled tail epilogue, :mod:`sod_kernels.sparse.cpu_backend`);
- ``two_pass``: ``memory="low"`` (two passes over row x vocabulary tiles, the backward recomputing the logits);
- ``naive``: the same loss materialized (``[N, V]`` logits and log-softmax, autograd:
  :func:`benchmarks.sparse.naive_sparse_loss`).

All three run in this process: first each method's *first call* (compilation included), a warm-up call and
one call measured for extra memory (peak RSS during the call minus RSS before it,
:func:`benchmarks.measure.cpu_extra_memory`), then ``--reps`` rounds in which every method runs once (round
robin, so a load change on a shared machine hits all alike); times are the medians of the rounds.  The losses
are recorded to show that the three compute the same number.  Results: ``<out>/sparse_cpu.json`` and ``.md``
(default ``benchmarks/results/cpu/``; ``--quick``: N = 512, V = 4000, H = 64, k = 16, into
``runs/sparse-cpu-quick/``), with the device, sizes, dtype, thread count, load averages and git commit;
``--render FILE.json`` rewrites the ``.md`` of a saved run.  On a shared machine the load may change within
a round: the table also gives the fastest round and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
JUDGED = {"N": 4096, "V": 32000, "H": 256, "k": 64, "step_tokens": 256, "dtype": "float32"}
QUICK = {"N": 512, "V": 4000, "H": 64, "k": 16, "step_tokens": 256, "dtype": "float32"}
METHODS = ("single_pass", "two_pass", "naive")
LABELS = {"single_pass": "fused_sparse_sod_loss, memory=\"fast\" (CPU single pass, default)",
          "two_pass": "fused_sparse_sod_loss, memory=\"low\" (two passes)",
          "naive": "naive (materialized [N, V] logits, autograd)"}
MIB = 1 << 20


def build(size: dict, seed: int = 0):
    """``(inputs, ids, logprobs)``: LM-like student and teacher, the teacher's top-k (outside any timing)."""
    from benchmarks.inputs import make_inputs
    from sod_kernels import fused_topk_logprobs

    dtype = getattr(torch, size["dtype"])
    x = make_inputs("lm_like", size["N"], size["V"], size["H"], size["H"], dtype=dtype, device="cpu", seed=seed)
    with torch.no_grad():
        ids, logprobs = fused_topk_logprobs(x.teacher_hidden, x.teacher_weight, size["k"])
    return x, ids, logprobs


def steps_for(x, ids, logprobs) -> dict:
    """One forward + backward per method, each returning the loss (a float)."""
    from benchmarks.sparse import naive_sparse_loss
    from sod_kernels import fused_sparse_sod_loss

    sh, sw, step_ids = x.student_hidden, x.student_weight, x.step_ids

    def fused(memory):
        def step():
            loss = fused_sparse_sod_loss(sh, sw, ids, logprobs, step_ids=step_ids[0], memory=memory,
                                         check_inputs=False)
            loss.backward()
            return float(loss.detach())
        return step

    def naive():
        loss = naive_sparse_loss(sh, sw, ids, logprobs, step_ids)
        loss.backward()
        return float(loss.detach())

    return {"single_pass": fused("fast"), "two_pass": fused("low"), "naive": naive}


def measure_all(x, steps: dict, reps: int) -> dict:
    """First call, warm-up, extra memory, then ``reps`` interleaved rounds; medians."""
    from benchmarks.measure import cpu_extra_memory, release_free_memory

    out = {"methods": {}, "load_before": os.getloadavg()}
    for name, step in steps.items():
        rec = out["methods"][name] = {"label": LABELS[name]}
        x.zero_grads()
        release_free_memory()
        t = time.perf_counter()
        rec["loss"] = step()
        rec["first_call_s"] = time.perf_counter() - t
        x.zero_grads()
        step()
        extra, _, how = cpu_extra_memory(step, x.zero_grads)
        rec["extra_memory_bytes"], rec["memory_method"] = extra, how
        rec["times_s"] = []
    for _ in range(reps):
        for name, step in steps.items():
            x.zero_grads()
            t = time.perf_counter()
            step()
            out["methods"][name]["times_s"].append(time.perf_counter() - t)
    for rec in out["methods"].values():
        rec["median_s"] = statistics.median(rec["times_s"])
    out["load_after"] = os.getloadavg()
    return out


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "sod_kernels",
                                "benchmarks"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def round_ratios(doc: dict, name: str) -> list[float]:
    """``time(name) / time(single_pass)`` of each round (both ran in the same round: a ratio less exposed to a load
    change on a shared machine than a ratio of medians)."""
    base = doc["methods"]["single_pass"]["times_s"]
    return [t / b for t, b in zip(doc["methods"][name]["times_s"], base)]


def render(doc: dict) -> str:
    """The Markdown table: median and fastest time, ratios to the single pass (of the medians, and the median of
    the per-round ratios), first call, extra memory, loss."""
    s = doc["size"]
    ms = doc["methods"]
    base = ms["single_pass"]["median_s"]
    lines = ["# fused_sparse_sod_loss on CPU: single pass vs two passes vs naive", "",
             f"{doc['device']} ({doc['threads']} threads), torch {doc['torch']}, commit `{doc['commit']}`, "
             f"{doc['date_utc']}", "",
             f"N = {s['N']}, V = {s['V']}, H = {s['H']}, k = {s['k']}, {s['dtype']}, \"kl\" steps of "
             f"{s['step_tokens']} tokens; forward + backward (d hidden, d weight); median of {doc['reps']} "
             f"interleaved rounds; load average {doc['load_before'][0]:.2f} before, {doc['load_after'][0]:.2f} after.",
             "", "| method | median | fastest | vs single pass (medians) | vs single pass (median of per-round ratios) "
             "| first call | extra memory | loss |", "|---|---|---|---|---|---|---|---|"]
    for name, rec in ms.items():
        lines.append(f"| {rec['label']} | {rec['median_s']:.2f} s | {min(rec['times_s']):.2f} s | "
                     f"{rec['median_s'] / base:.2f}x | {statistics.median(round_ratios(doc, name)):.2f}x | "
                     f"{rec['first_call_s']:.2f} s | {rec['extra_memory_bytes'] / MIB:.0f} MiB | {rec['loss']:.6f} |")
    lines += ["", "Times per round (s): " + "; ".join(
        f"{name} " + ", ".join(f"{t:.2f}" for t in rec["times_s"]) for name, rec in ms.items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None, help="rewrite the .md next to this saved .json")
    args = parser.parse_args(argv)
    if args.render:
        text = render(json.loads(args.render.read_text()))
        args.render.with_suffix(".md").write_text(text)
        print(text)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    size = QUICK if args.quick else JUDGED
    out_dir = args.out or (REPO / ("runs/sparse-cpu-quick" if args.quick else "benchmarks/results/cpu"))
    x, ids, logprobs = build(size)
    doc = {"device": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "commit": commit(), "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "size": size, "reps": args.reps,
           "compile": os.environ.get("SOD_KERNELS_CPU_COMPILE", "1")}
    doc.update(measure_all(x, steps_for(x, ids, logprobs), args.reps))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sparse_cpu.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = render(doc)
    (out_dir / "sparse_cpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
