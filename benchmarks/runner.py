"""Plan a benchmark run, run its cases in worker processes, and collect one result document.

A run = a device, a dtype, a list of sizes (each with the modes to measure), methods and input families.
Cases are grouped into worker processes: on CPU one process per (method, size) so every memory figure
comes from a fresh process; on CUDA one process per method (all sizes), since starting CUDA and
compiling per size would eat the GPU's short time slot.  A global time budget is enforced by design:
CUDA method groups get a fair share of what is left, no case starts after the deadline (it is recorded
as ``skipped``), and a worker that overruns its share by more than a grace period is killed (its
remaining cases are recorded as ``timeout``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import measure
from .floors import MODES, byte_floor, flop_floor, flop_recompute
from .inputs import FAMILIES, STEP_TOKENS
from .methods import METHOD_INFO, METHODS, NAIVE_FOOTPRINT_COPIES, method_unavailable_reason

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
QUICK_DIR = REPO_ROOT / "runs" / "benchmarks-quick"
GIB = 1 << 30
WORKER_GRACE_S = {"cpu": 300.0, "cuda": 45.0}   # a worker may overrun its deadline by this much
CPU_MATMUL_TARGET_FLOPS = 5e10                    # size of the CPU reference matmul (about 1 s on 2 cores)
CPU_MATMUL_MAX_ROWS = 2048
CPU_MATMUL_MIN_ROWS = 64
DEFAULT_CPU_MEM_CAP_GIB = 8.0


class Interrupted(Exception):
    """Raised by the SIGTERM handler: the run stops starting cases and writes what it has."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def install_sigterm_handler() -> None:
    """Turn SIGTERM (e.g. from ``timeout``) into :class:`Interrupted`, so partial results are written."""
    signal.signal(signal.SIGTERM, _raise_interrupted)


@dataclass(frozen=True)
class Size:
    """One problem size: ``N`` tokens, vocabulary ``V``, widths ``Hs``/``Ht``, the modes to run, tags."""

    tokens: int
    vocab: int
    student_width: int
    teacher_width: int
    modes: tuple[str, ...] = MODES
    tags: tuple[str, ...] = ()
    reps: int | None = None   # timed CPU repeats at this size (None: the run's setting)

    def key(self) -> dict:
        """The size fields as a dict (as stored in every case)."""
        return {"tokens": self.tokens, "vocab": self.vocab, "student_width": self.student_width,
                "teacher_width": self.teacher_width}

    def label(self) -> str:
        """``N=.. V=.. Hs=.. Ht=..``."""
        return f"N={self.tokens} V={self.vocab} Hs={self.student_width} Ht={self.teacher_width}"


JUDGED = Size(4096, 32000, 256, 384, MODES, ("judged",))
HEADLINE_WIDTHS = (1024, 2560)
HEADLINE_VOCAB = 151936
VOCABS = (32000, 128256, HEADLINE_VOCAB)
GPU_TOKENS = (1024, 4096, 16384, 65536)   # 1k..64k in factors of 4: the 9-minute GPU slot allows no more
# CUDA runs one worker per method, most important first: if the time budget runs out, the tail suffers.
GPU_METHOD_PRIORITY = ("sod_triton", "liger_compiled", "naive", "sod_torch", "naive_compiled", "liger")
GPU_HEADLINE_TOKENS = 16384
CPU_SWEEP_REPS = 2        # timed repeats at the CPU sweep sizes (the judged size uses the run's setting)


def preset_sizes(preset: str) -> list[Size]:
    """Sizes of a named preset, in priority order (the most important first)."""
    hs, ht = HEADLINE_WIDTHS
    if preset == "quick":
        return [Size(256, 8192, 64, 96, MODES, ("N sweep",)), Size(512, 8192, 64, 96, MODES, ("N sweep",))]
    if preset == "cpu":
        sweep = ("fwd_bwd",)
        return [JUDGED,
                Size(1024, 32000, 256, 384, sweep, ("N sweep",), CPU_SWEEP_REPS),
                Size(2048, 32000, 256, 384, sweep, ("N sweep",), CPU_SWEEP_REPS),
                Size(512, 32000, 256, 384, sweep, ("N sweep", "V sweep"), CPU_SWEEP_REPS),
                Size(512, HEADLINE_VOCAB, 256, 384, sweep, ("V sweep",), CPU_SWEEP_REPS),
                Size(64, HEADLINE_VOCAB, hs, ht, sweep, ("headline widths",), CPU_SWEEP_REPS)]
    if preset == "gpu":
        sizes = [Size(GPU_HEADLINE_TOKENS, HEADLINE_VOCAB, hs, ht, MODES, ("headline", "N sweep"))]
        sizes += [Size(n, HEADLINE_VOCAB, hs, ht, ("fwd_bwd",), ("N sweep",)) for n in GPU_TOKENS
                  if n != GPU_HEADLINE_TOKENS]
        sizes += [Size(GPU_HEADLINE_TOKENS, v, hs, ht, ("fwd_bwd",), ("V sweep",)) for v in VOCABS
                  if v != HEADLINE_VOCAB]
        return sizes
    raise ValueError(f"unknown preset {preset!r}; expected quick, cpu or gpu")


def parse_sizes(text: str, modes: tuple[str, ...]) -> list[Size]:
    """``"N:V:Hs:Ht,N:V:Hs:Ht"`` -> sizes (each with ``modes``)."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"a size is N:V:Hs:Ht with positive integers, got {item!r}")
        sizes.append(Size(*(int(p) for p in parts), modes=modes, tags=("custom",)))
    return sizes


@dataclass
class RunConfig:
    """Everything a run needs; stored in the result document."""

    device: str
    dtype: str
    sizes: list[Size]
    methods: tuple[str, ...] = METHODS
    families: tuple[str, ...] = FAMILIES
    modes: tuple[str, ...] = MODES
    warmup: int = 1
    reps: int = 5
    case_budget_s: float = 20.0
    time_budget_s: float | None = None
    mem_cap_bytes: int | None = None
    threads: int | None = None
    seed: int = 0
    preset: str = "custom"
    out_dir: Path = RESULTS_DIR
    drift_check: bool = True
    group_by: str | None = None  # "method_size" (CPU default) or "method" (CUDA default): cases per worker
    extra: dict = field(default_factory=dict)

    def device_kind(self) -> str:
        """``"cuda"`` or ``"cpu"``."""
        return "cuda" if self.device.startswith("cuda") else "cpu"


def plan_cases(config: RunConfig) -> list[list[dict]]:
    """Cases grouped into worker processes, in priority order (see the module docstring)."""
    def cases_for(method: str, size: Size) -> list[dict]:
        extra = {} if size.reps is None else {"reps": size.reps}
        return [{"method": method, "family": family, "mode": mode, **size.key(), **extra}
                for family in config.families for mode in size.modes if mode in config.modes]

    group_by = config.group_by or ("method" if config.device_kind() == "cuda" else "method_size")
    if group_by not in ("method", "method_size"):
        raise ValueError(f"group_by must be 'method' or 'method_size', got {group_by!r}")
    if group_by == "method":
        methods = sorted(config.methods, key=lambda m: GPU_METHOD_PRIORITY.index(m))
        groups = [[c for size in config.sizes for c in cases_for(m, size)] for m in methods]
    else:
        groups = [cases_for(m, size) for size in config.sizes for m in config.methods]
    return [g for g in groups if g]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "liger-kernel", "numpy", "matplotlib"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_digest() -> str:
    """SHA-256 (first 16 hex digits) of the package and benchmark sources: identifies code without git."""
    digest = hashlib.sha256()
    for path in sorted([*REPO_ROOT.glob("sod_kernels/*.py"), *REPO_ROOT.glob("benchmarks/*.py")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def code_identity() -> dict[str, str | bool | None]:
    """Git commit (or ``SOD_GIT_COMMIT`` where the tree has no .git), dirty flag, source digest."""
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "sod_kernels", "benchmarks"))
    else:
        commit = os.environ.get("SOD_GIT_COMMIT") or "unknown (no git; set SOD_GIT_COMMIT)"
    return {"commit": commit, "dirty": dirty, "source_digest": source_digest()}


def worker_env(config: RunConfig) -> dict[str, str]:
    """Environment of a worker: allocator returns big blocks to the OS; thread count; no interpreter on GPU."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(measure.MALLOC_MMAP_THRESHOLD_BYTES)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if config.threads:
        env["OMP_NUM_THREADS"] = str(config.threads)
    if config.device_kind() == "cuda":
        env.pop("TRITON_INTERPRET", None)
    return env


def run_worker(job: dict, config: RunConfig, timeout_s: float, log=None) -> tuple[list[dict], str | None]:
    """Run one worker process; returns its JSON lines and an error note (non-zero exit, timeout) or None."""
    with tempfile.TemporaryDirectory(prefix="sod-bench-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.jsonl"
        job_path.write_text(json.dumps(job))
        note = None
        try:
            done = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(job_path), str(out_path)],
                                  cwd=REPO_ROOT, env=worker_env(config), capture_output=True, text=True,
                                  timeout=max(timeout_s, 1.0))
            if done.returncode != 0:
                note = f"worker exited with {done.returncode}: {done.stderr.strip()[-600:]}"
        except subprocess.TimeoutExpired:
            note = f"worker killed after {timeout_s:.0f} s (time budget)"
        lines = out_path.read_text().splitlines() if out_path.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    if note and log:
        log(note)
    return records, note


def calibration_shapes(config: RunConfig) -> list[tuple[list[int], str]]:
    """Reference matmul shapes: one square bf16 product on CUDA; per (Ht, V) an fp32 product on CPU."""
    if config.device_kind() == "cuda":
        n = measure.GPU_MATMUL_SIZE
        return [([n, n, n], "bfloat16")]
    shapes = []
    for size in config.sizes:
        k, n = size.teacher_width, size.vocab
        rows = int(CPU_MATMUL_TARGET_FLOPS // (2 * k * n))
        rows = max(CPU_MATMUL_MIN_ROWS, min(CPU_MATMUL_MAX_ROWS, rows))
        if ([rows, k, n], "float32") not in shapes:
            shapes.append(([rows, k, n], "float32"))
    return shapes


def calibrate(config: RunConfig) -> dict:
    """Device name and matrix-product rates, measured in a worker like the cases."""
    job = {"kind": "calibrate", "device": config.device, "dtype": config.dtype, "threads": config.threads,
           "seed": config.seed, "matmul_shapes": calibration_shapes(config)}
    records, note = run_worker(job, config, timeout_s=600)
    found = [r["calibration"] for r in records if "calibration" in r]
    return found[0] if found else {"device_name": "unknown", "matmul": [], "error": note}


def matmul_ceiling(calibrations: list[dict], size: dict, device_kind: str) -> float | None:
    """The highest rate measured in this run for the size's reference product (TFLOP/s)."""
    rates = []
    for cal in calibrations:
        for rate in cal.get("matmul", []):
            m, k, n = rate["shape"]
            if device_kind == "cuda" or (k == size["teacher_width"] and n == size["vocab"]):
                rates.append(rate["tflops"])
    return max(rates) if rates else None


def add_floors(record: dict, element_size: int, ceiling: float | None) -> dict:
    """Attach the FLOP/byte floors, achieved TFLOP/s and its share of the matmul rate to a record."""
    args = (record["mode"], record["tokens"], record["vocab"], record["student_width"], record["teacher_width"])
    flops = flop_floor(*args)
    record["flop_floor"] = flops
    record["flop_recompute"] = flop_recompute(*args)
    record["byte_floor"] = byte_floor(*args, element_size)
    record["matmul_tflops"] = ceiling
    record["time_floor_s"] = flops / (ceiling * 1e12) if ceiling else None
    median = record.get("median_s")
    record["achieved_tflops"] = flops / median / 1e12 if median else None
    record["share_of_matmul"] = (record["achieved_tflops"] / ceiling
                                 if record["achieved_tflops"] is not None and ceiling else None)
    return record


ELEMENT_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


def fallback_device_name(kind: str) -> str:
    """Device name when no worker reported one (the run was interrupted before its first case)."""
    if kind == "cpu":
        from .worker import cpu_model_name

        return cpu_model_name()
    return "unknown CUDA device"


def missing_record(case: dict, config: RunConfig, status: str, message: str) -> dict:
    """The record of a case that produced no figures (unavailable method, timeout, crashed worker)."""
    info = METHOD_INFO[case["method"]]
    planned = {k: v for k, v in case.items() if k != "reps"}
    return {**planned, "dtype": config.dtype, "device": config.device, "loss_kind": info.loss_kind,
            "compiled": info.compiled, "status": status, "message": message}


def run(config: RunConfig, log=print) -> dict:
    """Execute the run; returns the result document (not yet written)."""
    started = time.time()
    deadline = started + config.time_budget_s if config.time_budget_s else None
    load_before = os.getloadavg()
    calibrations: list[dict] = []
    interrupted = False
    results: list[dict] = []
    kind = config.device_kind()
    groups = []
    for group in plan_cases(config):
        reason = method_unavailable_reason(group[0]["method"], config.device)
        if reason is None:
            groups.append(group)
        else:  # no process needed to say so
            results.extend(missing_record(case, config, "unavailable", reason) for case in group)
    for index, group in enumerate(groups):
        now = time.time()
        if deadline is not None and now > deadline:  # no process needed to say so
            results.extend(missing_record(case, config, "skipped", "suite time budget exhausted before this case "
                                          "started") for case in group)
            continue
        group_deadline = deadline
        if deadline is not None and kind == "cuda":
            group_deadline = now + max(deadline - now, 0.0) / (len(groups) - index)
        job = {"kind": "cases", "device": config.device, "dtype": config.dtype, "threads": config.threads,
               "seed": config.seed, "cases": group, "warmup": config.warmup, "reps": config.reps,
               "case_budget_s": config.case_budget_s, "mem_cap_bytes": config.mem_cap_bytes,
               "deadline": group_deadline}
        if not calibrations:  # the first worker measures the matrix-product rate before its cases
            job["matmul_shapes"] = calibration_shapes(config)
        first = group[0]
        log(f"[{index + 1}/{len(groups)}] {first['method']}: {len(group)} case(s) from "
            f"N={first['tokens']} V={first['vocab']} Hs={first['student_width']} Ht={first['teacher_width']}")
        timeout = (group_deadline - now if group_deadline else 24 * 3600.0) + WORKER_GRACE_S[kind]
        try:
            records, note = run_worker(job, config, timeout, log)
        except Interrupted as exc:
            interrupted = True
            log(f"interrupted ({exc}): the remaining cases are recorded as skipped")
            for rest in groups[index:]:
                results.extend(missing_record(case, config, "skipped", "run interrupted (SIGTERM)")
                               for case in rest)
            break
        calibrations += [r["calibration"] for r in records if "calibration" in r]
        records = [r for r in records if "calibration" not in r]
        status = "timeout" if note and "killed" in note else "error"
        records += [missing_record(case, config, status, note or "worker ended before this case")
                    for case in group[len(records):]]
        for record in records:
            log(f"    {record['family']:<10} {record['mode']:<7} {record['status']:<13} "
                + (f"{record['median_s']:.4f} s  {record['extra_memory_bytes'] / GIB:.3f} GiB"
                   if record["status"] == "ok" else record.get("message", "")[:100]))
        results.extend(records)
    if not calibrations and not interrupted:
        log(f"calibrating the matrix-product rate on {config.device} ...")
        calibrations.append(calibrate(config))
    if kind == "cpu" and config.drift_check and not interrupted:
        log("re-measuring the matrix-product rate (drift check) ...")
        calibrations.append(calibrate(config))
    element_size = ELEMENT_SIZES[config.dtype]
    for record in results:
        add_floors(record, element_size, matmul_ceiling(calibrations, record, kind))
    finished = time.time()
    first_calibration = calibrations[0] if calibrations else {}
    return {
        "schema": 1,
        "date": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
        "device": config.device, "device_kind": kind, "device_name": first_calibration.get("device_name") or fallback_device_name(kind),
        "threads": first_calibration.get("threads"),
        "dtype": config.dtype, "preset": config.preset, "seed": config.seed,
        "versions": _versions(), "code": code_identity(),
        "settings": {"group_by": config.group_by or ("method" if kind == "cuda" else "method_size"),
                     "warmup": config.warmup, "reps": config.reps, "case_budget_s": config.case_budget_s,
                     "time_budget_s": config.time_budget_s, "mem_cap_bytes": config.mem_cap_bytes,
                     "methods": list(config.methods), "families": list(config.families),
                     "modes": list(config.modes), "step_tokens": STEP_TOKENS,
                     "naive_footprint_copies": NAIVE_FOOTPRINT_COPIES},
        "sizes": [asdict(s) for s in config.sizes],
        "calibration": calibrations, "interrupted": interrupted,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "cpu_count": os.cpu_count(),
        "wall_s": finished - started,
        "results": results,
        **config.extra,
    }


def result_stem(doc: dict) -> str:
    """File stem of a run: ``YYYYmmdd-HHMMSS-<kind>-<device slug>[-quick]``."""
    stamp = dt.datetime.fromisoformat(doc["date"]).strftime("%Y%m%d-%H%M%S")
    slug = "".join(c if c.isalnum() else "-" for c in doc["device_name"].lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part)[:40] or "device"
    suffix = "-quick" if doc.get("preset") == "quick" else ""
    return f"{stamp}-{doc['device_kind']}-{slug}{suffix}"
