"""Command line of the benchmark suite: ``python -m benchmarks [options]``.

Examples::

    python -m benchmarks --quick                      # CPU smoke run, a few minutes on 2 cores
    python -m benchmarks --device cpu --threads 2     # the committed CPU run (preset "cpu")
    python -m benchmarks --device cuda                # the GPU sweep (preset "gpu", bf16)
    python -m benchmarks --device cpu --sizes 4096:32000:256:384 --methods naive,sod_torch --modes fwd_bwd

Each run writes ``<stamp>-<device>.json`` (every figure), ``.md`` (tables) and ``-time.png`` /
``-memory.png`` (sweeps over N) into ``--out`` (default ``benchmarks/results``; ``runs/benchmarks-quick``
for ``--quick``) and regenerates ``LATEST.md`` there.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
from pathlib import Path

from .floors import MODES
from .inputs import FAMILIES
from .methods import METHODS
from .report import write_latest, write_run
from .runner import (DEFAULT_CPU_MEM_CAP_GIB, Interrupted, install_sigterm_handler, GIB, QUICK_DIR, REPO_ROOT, RESULTS_DIR, RunConfig, parse_sizes,
                     preset_sizes, result_stem, run)

QUICK_TIME_BUDGET_S = 270.0
DEFAULT_REPS = 3                # timed repeats per CPU case (CUDA: do_bench chooses its own count)
QUICK_CASE_BUDGET_S = 5.0
CPU_CASE_BUDGET_S = 15.0        # seconds of timed repeats per CPU case (at least one repeat runs)
SEED_BITS = 30
CODEGEN_TIMEOUT_S = 300


def _choices(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated subset of {','.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="input dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny CPU sizes, few repeats: a smoke run under 5 minutes")
    p.add_argument("--preset", choices=("quick", "cpu", "gpu"), help="size preset (default: by device)")
    p.add_argument("--sizes", help="N:V:Hs:Ht[,N:V:Hs:Ht...] instead of a preset")
    p.add_argument("--methods", type=lambda s: _choices(s, METHODS, "--methods"), default=METHODS,
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--families", type=lambda s: _choices(s, FAMILIES, "--families"), default=FAMILIES,
                   help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--modes", type=lambda s: _choices(s, MODES, "--modes"), default=MODES,
                   help="comma-separated subset of fwd,fwd_bwd")
    p.add_argument("--reps", type=int, help="timed repeats per CPU case (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations per case (default 1)")
    p.add_argument("--case-budget", type=float, help="seconds of timed repeats per case on CPU (default 15)")
    p.add_argument("--time-budget", type=float, help="seconds for the whole sweep; later cases are skipped")
    p.add_argument("--mem-cap-gib", type=float,
                   help=f"CPU memory cap per case in GiB (RLIMIT_AS; default {DEFAULT_CPU_MEM_CAP_GIB})")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads / OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, help="seed of the inputs (default: fresh random)")
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--note", help="free text stored with the run (e.g. 'machine shared with test runs')")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-policy", action="store_true", help="skip the policy-helper benchmarks")
    p.add_argument("--codegen", action="store_true",
                   help="also run python -m benchmarks.codegen (writes codegen.md into the output folder)")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Resolve defaults (preset, dtype, budgets) into a :class:`RunConfig`."""
    cuda = args.device.startswith("cuda")
    if args.quick and cuda:
        raise SystemExit("--quick is the CPU smoke run; use --device cpu (or drop --quick)")
    preset = "quick" if args.quick else (args.preset or ("gpu" if cuda else "cpu"))
    if args.sizes:
        sizes, preset = parse_sizes(args.sizes, args.modes), "custom"
    else:
        sizes = preset_sizes(preset)
    quick = preset == "quick"
    cap = None if cuda else int((args.mem_cap_gib or DEFAULT_CPU_MEM_CAP_GIB) * GIB)
    return RunConfig(
        device=args.device, dtype=args.dtype or ("bfloat16" if cuda else "float32"), sizes=sizes,
        methods=args.methods, families=args.families, modes=args.modes, warmup=args.warmup,
        reps=args.reps or DEFAULT_REPS,
        case_budget_s=args.case_budget or (QUICK_CASE_BUDGET_S if quick else CPU_CASE_BUDGET_S),
        time_budget_s=args.time_budget or (QUICK_TIME_BUDGET_S if quick else None),
        mem_cap_bytes=cap, threads=args.threads,
        seed=args.seed if args.seed is not None else secrets.randbits(SEED_BITS), preset=preset,
        out_dir=args.out or (QUICK_DIR if quick else RESULTS_DIR),
        extra={"note": args.note} if args.note else {})


def run_codegen(out_dir: Path) -> str:
    """Run ``python -m benchmarks.codegen`` without TRITON_INTERPRET; copy its table into ``out_dir``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.codegen"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=CODEGEN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"codegen timed out after {CODEGEN_TIMEOUT_S} s"
    table = REPO_ROOT / "benchmarks" / "results" / "codegen.md"
    if done.returncode != 0:
        return f"codegen failed ({done.returncode}): {done.stderr.strip()[-300:]}"
    if table.exists() and table.resolve().parent != out_dir.resolve():
        (out_dir / "codegen.md").write_text(table.read_text())
    return "codegen ok"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks described by the command line; print where the results went."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    install_sigterm_handler()
    doc = run(config)
    if doc["interrupted"]:
        doc["policy"] = {"note": "policy helpers not measured: the run was interrupted"}
    elif not args.no_policy:
        from .policy_bridge import policy_section

        left = None if config.time_budget_s is None else config.time_budget_s - doc["wall_s"]
        try:
            doc["policy"] = policy_section(config.device, config.preset == "quick", config.threads, left)
        except Interrupted:
            doc["policy"] = {"note": "policy helpers not measured: interrupted (SIGTERM) while they ran"}
    stem = result_stem(doc)
    paths = write_run(doc, config.out_dir, stem, plots=not args.no_plots)
    if args.codegen:
        print(run_codegen(config.out_dir))
    latest = write_latest(config.out_dir, REPO_ROOT)
    for path in [*paths.values(), latest]:
        if path is not None:
            print(f"wrote {path}")
    return 0
