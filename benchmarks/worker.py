"""Benchmark worker: runs a list of cases (or a calibration) in its own process and streams JSON lines.

Usage (the runner starts it; not meant to be typed): ``python -m benchmarks.worker JOB.json OUT.jsonl``.

A fresh process per group of cases keeps one method's compile caches, allocator state and memory
high-water mark away from the next, and lets the runner kill a case that runs away.  Each finished case
is appended to ``OUT.jsonl`` at once, so a timeout loses only the case in flight.

Job file keys: ``kind`` (``"cases"`` or ``"calibrate"``), ``device``, ``dtype``, ``threads`` (CPU thread
count or null), ``seed``; for cases: ``cases`` (list of dicts with ``method, family, mode, tokens, vocab,
student_width, teacher_width``), ``warmup``, ``reps``, ``case_budget_s``, ``mem_cap_bytes`` (CPU cap or
null), ``deadline`` (Unix time after which no case starts, or null); ``matmul_shapes`` (optional for
cases): measure the matrix-product rate first and write it as the first line (``{"calibration": ...}``).
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path

import torch

from . import measure
from .floors import check_mode
from .inputs import BenchInputs, input_statistics, make_inputs
from .methods import METHOD_INFO, make_step, method_unavailable_reason, predicted_extra_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED_MODULUS = 2**31 - 1


def case_seed(run_seed: int, family: str, tokens: int, vocab: int, student_width: int, teacher_width: int) -> int:
    """Seed of one problem: every method of a run sees the same inputs for a (family, size)."""
    key = f"{run_seed}:{family}:{tokens}:{vocab}:{student_width}:{teacher_width}".encode()
    return zlib.crc32(key) % SEED_MODULUS


def size_key(case: dict) -> tuple:
    """The (family, N, V, Hs, Ht) a case's inputs are drawn for."""
    return (case["family"], case["tokens"], case["vocab"], case["student_width"], case["teacher_width"])


def base_record(case: dict, job: dict) -> dict:
    """The identifying fields of a case's result."""
    info = METHOD_INFO[case["method"]]
    return {**{k: case[k] for k in ("method", "family", "mode", "tokens", "vocab", "student_width", "teacher_width")},
            "dtype": job["dtype"], "device": job["device"], "loss_kind": info.loss_kind, "compiled": info.compiled}


def measure_case(case: dict, job: dict, inputs: BenchInputs) -> dict:
    """Warm up, measure memory on one iteration, then time repeats; returns the figures of one case."""
    step = make_step(case["method"], inputs, check_mode(case["mode"]))
    last: dict[str, torch.Tensor] = {}

    def run() -> None:
        last["loss"] = step()

    before = inputs.zero_grads
    cuda = job["device"].startswith("cuda")
    start = time.perf_counter()
    for _ in range(job["warmup"]):
        before()
        run()
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    if cuda:
        extra, mem_s, how = measure.cuda_extra_memory(run, before, job["device"])
        grads = [inputs.student_hidden, inputs.student_weight] if case["mode"] == "fwd_bwd" else []
        times, timer = measure.cuda_times(run, grads, mem_s)
    else:
        extra, mem_s, how = measure.cpu_extra_memory(run, before)
        times = measure.cpu_times(run, before, case.get("reps") or job["reps"], job["case_budget_s"],
                                  already=[mem_s])
        timer = "time.perf_counter (first timed iteration also measured memory)"
    loss = last.get("loss")
    return {"status": "ok", "warmup_s": first_s, "times_s": times, **measure.summarize(times), "timer": timer,
            "extra_memory_bytes": extra, "memory_method": how,
            "loss_value": None if loss is None else float(loss)}


def run_cases(job: dict, out) -> None:
    """Run every case of the job in order, appending one JSON line per case to ``out``."""
    device, dtype = job["device"], DTYPES[job["dtype"]]
    cap = job.get("mem_cap_bytes")
    inputs, inputs_key, stats = None, None, None
    for case in job["cases"]:
        record = base_record(case, job)
        reason = method_unavailable_reason(case["method"], device)
        predicted = predicted_extra_bytes(case["method"], case["tokens"], case["vocab"])
        if job.get("deadline") is not None and time.time() > job["deadline"]:
            record.update(status="skipped", message="suite time budget exhausted before this case started")
        elif reason is not None:
            record.update(status="unavailable", message=reason)
        elif cap is not None and predicted is not None and predicted > cap:
            record.update(status="oom_predicted", predicted_extra_bytes=predicted,
                          message=f"predicted footprint {predicted} B exceeds the {cap} B cap; not run")
        else:
            failed = False
            try:
                if size_key(case) != inputs_key:
                    inputs, inputs_key = None, None
                    measure.release_free_memory()
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    seed = case_seed(job["seed"], *size_key(case))
                    inputs = make_inputs(case["family"], case["tokens"], case["vocab"], case["student_width"],
                                         case["teacher_width"], dtype=dtype, device=device, seed=seed)
                    inputs_key, stats = size_key(case), {**input_statistics(inputs), "seed": seed}
                record["input_stats"] = stats
                with measure.address_space_cap(None if device.startswith("cuda") else cap):
                    record.update(measure_case(case, job, inputs))
            except Exception as exc:  # a failing case is a result (OOM or error), not the end of the run
                failed = True
                record.update(status="oom" if measure.is_oom(exc) else "error",
                              message=f"{type(exc).__name__}: {str(exc)[:400]}")
            if failed:  # after the except block, so the traceback no longer pins the failed buffers
                if inputs is not None:
                    inputs.zero_grads()
                measure.release_free_memory()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        out.write(json.dumps(record) + "\n")
        out.flush()


def run_calibration(job: dict, out) -> None:
    """Device name and the dense matrix-product rate for each requested shape."""
    device = job["device"]
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_model_name()
    rates = [measure.matmul_rate(device, DTYPES[dt], *shape) for shape, dt in job["matmul_shapes"]]
    out.write(json.dumps({"calibration": {"device_name": name, "threads": torch.get_num_threads(),
                                           "matmul": rates}}) + "\n")
    out.flush()


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo (``model name``), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m benchmarks.worker JOB.json OUT.jsonl``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m benchmarks.worker JOB.json OUT.jsonl", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text())
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    with open(args[1], "a") as out:
        if job.get("matmul_shapes"):  # a calibration job, or the first case group calibrating on the way
            run_calibration(job, out)
        if job["kind"] == "cases":
            run_cases(job, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
