"""The CPU comparison in one command: ``python -m benchmarks.cpu_headline [--quick] [--out DIR]``.

At the size the CPU path is judged on (N = 4096 tokens, V = 32000, Hs = 256, Ht = 384, float32, worst-case
inputs, one trajectory cut into "kl" steps of 256 tokens), forward + backward of:

- ``sod_fast``: ``fused_sod_loss`` with its defaults (``memory="fast"``: the single pass with compiled
  per-chunk epilogues);
- ``sod_low``: the same with ``memory="low"`` (two passes over row x vocabulary tiles, recomputing the logits);
- ``sod_jsd_fast``: the default ``fused_sod_loss`` with ``divergence="jsd", beta=0.5`` (the generalized JSD: one
  more ``exp`` and ``log`` per entry than the KL in the single pass);
- ``sod_fast_eager``: ``memory="fast"`` with ``SOD_KERNELS_CPU_COMPILE=0`` (optional: ``--methods``);
- ``sod_fast_nopool``: ``memory="fast"`` with ``SOD_KERNELS_CPU_POOL=0`` (one multi-threaded product per matrix
  product instead of vocabulary tiles on the pool; optional);
- ``sod_fast_nonative``: ``memory="fast"`` with ``SOD_KERNELS_CPU_NATIVE=0`` (the compiled PyTorch KL statistics
  instead of the C++ kernel; optional);
- ``liger_compiled``: Liger-Kernel's ``LigerFusedLinearJSDLoss(beta=1, compiled=True)`` (the unweighted
  reverse KL: Liger has no step weights; ``liger``: the same uncompiled, optional);
- ``naive``: both ``[N, V]`` logit matrices, ``log_softmax``, the step-weighted KL, autograd;

and the sampled-token log-probabilities at ``N x V x Hs`` (sum of log-probs, forward + backward):
``logprobs_fused`` (``fused_token_logprobs``) against ``logprobs_naive`` (``log_softmax(h @ W.T).gather``),
and the PPO dual-clip policy loss: ``policy_fused`` (``fused_sod_policy_loss``) against ``policy_naive``
(the same log-probs materialized, then the same per-token loss).

Every method runs in one worker process (started with ``MALLOC_MMAP_THRESHOLD_`` fixed so freed blocks go
back to the OS): first the *first call* of each method (compilation included: what a fresh process pays
once), a warm-up call, one call measured for memory (peak RSS during the call minus RSS before it; the
kernel's peak counter reset), then ``--reps`` rounds in which every method runs once (round robin, so a
load change on a shared machine hits all methods alike); times are the medians of the rounds and ratios are
taken between them.  The load average before and after is recorded.  Results go to
``<out>/<date>-<cpu>-<commit>.json`` and ``.md`` (``--contend K``: ``-shared`` appended; default
``benchmarks/results/cpu/``; ``--quick``:
``runs/cpu-headline-quick/``, at N = 512, V = 4096, Hs = 64, Ht = 96).

``--contend K`` measures on a *shared* machine reproducibly: K busy processes (each spins one core in pure
Python) run from before the first call to the end of the worker, and the report says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JUDGED = {"N": 4096, "V": 32000, "Hs": 256, "Ht": 384}
QUICK = {"N": 512, "V": 4096, "Hs": 64, "Ht": 96}
DEFAULT_METHODS = ("sod_fast", "sod_low", "sod_jsd_fast", "liger_compiled", "naive", "logprobs_fused",
                   "logprobs_naive", "policy_fused", "policy_naive")
ALL_METHODS = DEFAULT_METHODS + ("sod_fast_eager", "sod_fast_nopool", "sod_fast_nonative", "liger")
KL_METHODS = ("sod_fast", "sod_low", "sod_fast_eager", "sod_fast_nopool", "sod_fast_nonative", "sod_jsd_fast",
              "liger_compiled", "liger", "naive")
LABELS = {
    "sod_fast": "ours, memory=\"fast\" (default)",
    "sod_low": "ours, memory=\"low\"",
    "sod_fast_eager": "ours, memory=\"fast\", eager epilogue",
    "sod_fast_nopool": "ours, memory=\"fast\", SOD_KERNELS_CPU_POOL=0",
    "sod_fast_nonative": "ours, memory=\"fast\", SOD_KERNELS_CPU_NATIVE=0",
    "sod_jsd_fast": "ours, JSD (beta=0.5), memory=\"fast\"",
    "liger_compiled": "Liger fused linear JSD (beta=1), compiled",
    "liger": "Liger fused linear JSD (beta=1), eager",
    "naive": "naive (materialized logits)",
    "logprobs_fused": "fused_token_logprobs",
    "logprobs_naive": "log_softmax(h @ W.T).gather",
    "policy_fused": "fused_sod_policy_loss",
    "policy_naive": "log_softmax(h @ W.T).gather + PPO dual clip",
}
MMAP_THRESHOLD = "131072"
MIB = 1 << 20


# ------------------------------------------------------------------------------------------- worker side
def _step(name: str, x):
    """One forward + backward of method ``name`` on the inputs ``x`` (benchmarks.inputs.BenchInputs)."""
    import torch

    from benchmarks.methods import make_step
    from sod_kernels import fused_sod_loss, fused_token_logprobs

    default_pool = os.environ.get("SOD_KERNELS_CPU_POOL", "1")
    sh, sw, th, tw, ids, y = (x.student_hidden, x.student_weight, x.teacher_hidden, x.teacher_weight, x.step_ids,
                              x.target_ids)
    if name in ("sod_fast", "sod_low", "sod_fast_eager", "sod_fast_nopool", "sod_fast_nonative", "sod_jsd_fast"):
        memory = "low" if name == "sod_low" else "fast"
        compile_flag = "0" if name == "sod_fast_eager" else os.environ.get("SOD_KERNELS_CPU_COMPILE", "1")
        pool_flag = "0" if name == "sod_fast_nopool" else os.environ.get("SOD_KERNELS_CPU_POOL", "1")
        native_flag = "0" if name == "sod_fast_nonative" else os.environ.get("SOD_KERNELS_CPU_NATIVE", "1")
        divergence = {"divergence": "jsd", "beta": 0.5} if name == "sod_jsd_fast" else {}

        def step():
            os.environ["SOD_KERNELS_CPU_COMPILE"] = compile_flag
            os.environ["SOD_KERNELS_CPU_POOL"] = pool_flag
            os.environ["SOD_KERNELS_CPU_NATIVE"] = native_flag
            loss = fused_sod_loss(sh[None], sw, th[None], tw, step_ids=ids, memory=memory, **divergence)
            loss.backward()
            return loss.detach()
        return step
    if name in ("liger_compiled", "liger", "naive"):
        return make_step(name, x, "fwd_bwd")
    if name == "logprobs_fused":
        def step():
            os.environ["SOD_KERNELS_CPU_POOL"] = default_pool
            lp = fused_token_logprobs(sh, sw, y)
            lp.sum().backward()
            return lp.detach().sum()
        return step
    if name == "logprobs_naive":
        def step():
            lp = torch.log_softmax(sh @ sw.T, dim=-1).gather(1, y[:, None]).squeeze(1)
            lp.sum().backward()
            return lp.detach().sum()
        return step
    if name in ("policy_fused", "policy_naive"):
        from sod_kernels import fused_sod_policy_loss
        from sod_kernels.logprobs.policy_loss import ppo_dual_clip

        gen = torch.Generator().manual_seed(1)
        n, vocab = sh.shape[0], sw.shape[0]
        old = torch.randn(n, generator=gen) * 0.1 - torch.log(torch.tensor(float(vocab)))
        adv = torch.randn(n, generator=gen)
        mask = torch.ones(1, n, dtype=torch.int64)

        def step():
            os.environ["SOD_KERNELS_CPU_POOL"] = default_pool
            if name == "policy_fused":
                loss = fused_sod_policy_loss(sh[None], sw, y[None], old[None], adv[None], mask)
            else:
                lp = torch.log_softmax(sh @ sw.T, dim=-1).gather(1, y[:, None]).squeeze(1)
                loss = ppo_dual_clip(lp, old, adv, 0.2, 0.28, 3.0)[0].mean()
            loss.backward()
            return loss.detach()
        return step
    raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}")


def _worker(args) -> dict:
    import torch

    from benchmarks.inputs import make_inputs
    from benchmarks.measure import cpu_extra_memory, release_free_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    size = QUICK if args.quick else JUDGED
    x = make_inputs("worst_case", size["N"], size["V"], size["Hs"], size["Ht"], seed=args.seed)
    steps = {m: _step(m, x) for m in args.methods}
    out = {"methods": {}, "load_before": os.getloadavg()}
    for m, step in steps.items():          # first call (compilation included), warm-up, memory
        rec = out["methods"][m] = {}
        x.zero_grads()
        release_free_memory()
        t = time.perf_counter()
        rec["loss"] = float(step())
        rec["first_call_s"] = time.perf_counter() - t
        x.zero_grads()
        step()
        extra, _, how = cpu_extra_memory(step, x.zero_grads)
        rec["extra_memory_bytes"], rec["memory_method"] = extra, how
        rec["times_s"] = []
    for _ in range(args.reps):             # round robin
        for m, step in steps.items():
            x.zero_grads()
            t = time.perf_counter()
            step()
            out["methods"][m]["times_s"].append(time.perf_counter() - t)
    for rec in out["methods"].values():
        rec["median_s"] = statistics.median(rec["times_s"])
    out["load_after"] = os.getloadavg()
    out["threads"] = torch.get_num_threads()
    out["torch"] = torch.__version__
    return out


# ------------------------------------------------------------------------------------------- driver side
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _commit() -> str:
    sha = os.environ.get("SOD_GIT_COMMIT")
    if sha:
        return sha
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        # uncommitted changes to what is measured (the library, the reference, the benchmark code; not docs or
        # earlier results) mark the commit "-dirty"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "sod_kernels",
                                "reference", "benchmarks", ":(exclude)benchmarks/results"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("liger-kernel",):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _ratio(a, b):
    return None if (a is None or b is None or b == 0) else a / b


def _contend_note(doc: dict) -> str:
    k = doc.get("contend", 0)
    if not k:
        return " Calm machine: nothing else was started."
    return (f" Shared machine: {k} busy process{'es' if k > 1 else ''} (one core each, pure-Python spin) ran "
            "throughout the measurement.")


def render(doc: dict) -> str:
    """The Markdown report of one run."""
    s, m = doc["size"], doc["methods"]
    lines = ["# CPU: fused_sod_loss and fused_token_logprobs against Liger and naive PyTorch",
             "",
             f"{doc['device']} ({doc['threads']} threads), float32, worst-case inputs; {doc['date']}, commit "
             f"{doc['commit']}, torch {doc['torch']}, liger-kernel {doc['versions'].get('liger-kernel')}; "
             f"load average {doc['load_before'][0]:.2f} before, {doc['load_after'][0]:.2f} after "
             f"({doc['cpus']} CPUs)." + _contend_note(doc),
             "",
             f"Distillation loss, forward + backward: N = {s['N']} tokens, V = {s['V']}, Hs = {s['Hs']}, "
             f"Ht = {s['Ht']}, reverse KL (the JSD row: divergence=\"jsd\", beta=0.5), \"kl\" steps of 256 tokens "
             f"(Liger: the unweighted reverse KL, it has no step weights). Median of {doc['reps']} round-robin "
             "rounds; first call = a fresh process's first call (compilation included).",
             "",
             "| method | time (s) | vs Liger compiled | first call (s) | extra memory (MiB) | % of naive | "
             "% of Liger |",
             "|---|---|---|---|---|---|---|"]
    liger, naive = m.get("liger_compiled", {}), m.get("naive", {})
    for name in KL_METHODS:
        if name not in m:
            continue
        r = m[name]
        vs = _ratio(r["median_s"], liger.get("median_s"))
        pn = _ratio(r["extra_memory_bytes"], naive.get("extra_memory_bytes"))
        pl = _ratio(r["extra_memory_bytes"], liger.get("extra_memory_bytes"))
        lines.append(f"| {LABELS[name]} | {r['median_s']:.2f} | {'-' if vs is None else f'{vs:.2f}x'} | "
                     f"{r['first_call_s']:.1f} | {r['extra_memory_bytes'] / MIB:.0f} | "
                     f"{'-' if pn is None else f'{100 * pn:.1f}%'} | {'-' if pl is None else f'{100 * pl:.0f}%'} |")
    if "logprobs_fused" in m or "logprobs_naive" in m:
        lines += ["", f"Sampled-token log-probs, forward + backward: N = {s['N']}, V = {s['V']}, H = {s['Hs']}.",
                  "", "| method | time (s) | vs naive | first call (s) | extra memory (MiB) |", "|---|---|---|---|---|"]
        base = m.get("logprobs_naive", {}).get("median_s")
        for name in ("logprobs_fused", "logprobs_naive"):
            if name in m:
                r = m[name]
                vs = _ratio(r["median_s"], base)
                lines.append(f"| {LABELS[name]} | {r['median_s']:.2f} | {'-' if vs is None else f'{vs:.2f}x'} | "
                             f"{r['first_call_s']:.1f} | {r['extra_memory_bytes'] / MIB:.0f} |")
    if "policy_fused" in m or "policy_naive" in m:
        lines += ["", f"PPO dual-clip policy loss (token mean), forward + backward: N = {s['N']}, V = {s['V']}, "
                  f"H = {s['Hs']}.", "", "| method | time (s) | vs naive | first call (s) | extra memory (MiB) |",
                  "|---|---|---|---|---|"]
        base = m.get("policy_naive", {}).get("median_s")
        for name in ("policy_fused", "policy_naive"):
            if name in m:
                r = m[name]
                vs = _ratio(r["median_s"], base)
                lines.append(f"| {LABELS[name]} | {r['median_s']:.2f} | {'-' if vs is None else f'{vs:.2f}x'} | "
                             f"{r['first_call_s']:.1f} | {r['extra_memory_bytes'] / MIB:.0f} |")
    lines += ["", f"Command: `{doc['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_headline", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small size (N=512, V=4096, Hs=64, Ht=96) for smoke tests")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list from {ALL_METHODS}")
    p.add_argument("--reps", type=int, default=None, help="round-robin rounds (default 5; 3 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contend", type=int, default=0, metavar="K",
                   help="measure on a shared machine: K busy processes spin one core each during the run")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in ALL_METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    args.reps = args.reps or (3 if args.quick else 5)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "benchmarks.cpu_headline", "--worker", "--methods", ",".join(args.methods),
           "--reps", str(args.reps), "--seed", str(args.seed)] + (["--quick"] if args.quick else []) + \
        (["--threads", str(args.threads)] if args.threads else [])
    if args.contend < 0:
        p.error("--contend must be >= 0")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contend)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    now = datetime.datetime.now(datetime.timezone.utc)
    cpu = _cpu_name()
    commit = _commit()
    shown = ["python -m benchmarks.cpu_headline"] + (["--quick"] if args.quick else []) + \
        ([f"--methods {','.join(args.methods)}"] if tuple(args.methods) != DEFAULT_METHODS else []) + \
        ([f"--contend {args.contend}"] if args.contend else [])
    doc = {"device": cpu, "cpus": os.cpu_count(), "threads": res["threads"], "date": now.strftime("%Y-%m-%d %H:%M UTC"),
           "commit": commit, "torch": res["torch"], "versions": _versions(), "dtype": "float32",
           "family": "worst_case", "size": QUICK if args.quick else JUDGED, "reps": args.reps,
           "load_before": res["load_before"], "load_after": res["load_after"], "methods": res["methods"],
           "command": " ".join(shown),
           "compile_env": os.environ.get("SOD_KERNELS_CPU_COMPILE", "1"), "contend": args.contend}
    out = Path(args.out) if args.out else REPO / ("runs/cpu-headline-quick" if args.quick else "benchmarks/results/cpu")
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")[:40] or "cpu"
    stem = out / (f"{now.strftime('%Y%m%d')}-{slug}-{commit}" + ("-shared" if args.contend else ""))
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    text = render(doc)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem}.md / .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
