"""Timing, memory and matrix-product-rate measurements (CPU and CUDA), and the CPU memory cap.

Time
    CPU: ``time.perf_counter`` around each iteration, after warm-up; median and spread of the repeats.
    CUDA: ``triton.testing.do_bench`` (``return_mode="all"``: every timed run, with the L2 cache cleared
    before each); for an iteration slower than ``DO_BENCH_MAX_ITERATION_S`` (do_bench runs at least eight
    iterations) CUDA events around a few repeats instead.  Each record names its timer.
Memory
    CPU: peak resident set size of the worker process during one iteration minus the resident set size
    just before it (inputs allocated, gradients dropped, freed memory returned to the OS with
    ``malloc_trim``).  The kernel's peak counter ``VmHWM`` is reset by writing ``5`` to
    ``/proc/self/clear_refs``; where that is refused, the process-lifetime ``ru_maxrss`` is used
    instead (and the record says so).  Workers run with ``MALLOC_MMAP_THRESHOLD_`` fixed, so large
    buffers are returned to the OS when freed instead of being kept by the allocator.
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
    ``memory_allocated`` before the iteration.
CPU memory cap
    ``RLIMIT_AS`` (address space) of the worker is set to its current size plus the cap before each
    case's first iteration; an allocation beyond it fails inside PyTorch and the case is recorded as OOM.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

KIB = 1024
CLEAR_REFS_RESET_PEAK = "5"
MALLOC_MMAP_THRESHOLD_BYTES = 1 << 17           # passed to workers as MALLOC_MMAP_THRESHOLD_
DO_BENCH_WARMUP_MS = 25
DO_BENCH_REP_MS = 100
DO_BENCH_MAX_ITERATION_S = 0.5
SLOW_GPU_REPEATS = 3
DO_BENCH_FALLBACK_REPEATS = 10
MATMUL_REPEATS = 5
GPU_MATMUL_SIZE = 8192                          # square bf16 matmul timed as the GPU's dense rate
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc",
               "failed to allocate")


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is an allocation failure (CUDA OOM, CPU allocator failure, MemoryError)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return any(marker in text for marker in OOM_MARKERS)


def summarize(times: Sequence[float]) -> dict[str, float | int | None]:
    """Median, quartiles, min and max (seconds) of a list of iteration times."""
    if not times:
        return {"median_s": None, "q25_s": None, "q75_s": None, "min_s": None, "max_s": None, "reps": 0}
    ordered = sorted(times)
    if len(ordered) >= 2:
        q25, _, q75 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q25 = q75 = ordered[0]
    return {"median_s": statistics.median(ordered), "q25_s": q25, "q75_s": q75, "min_s": ordered[0],
            "max_s": ordered[-1], "reps": len(ordered)}


# ------------------------------------------------------------------------------------------ CPU memory
def _status_kib(field: str) -> int | None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    return (_status_kib("VmRSS") or 0) * KIB


def address_space_bytes() -> int:
    """Virtual address space of this process now."""
    return (_status_kib("VmSize") or 0) * KIB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write(CLEAR_REFS_RESET_PEAK)
        return True
    except OSError:
        return False


def peak_rss_bytes(resettable: bool) -> int:
    """Peak RSS since the last reset (VmHWM), or over the process's life (ru_maxrss) if not resettable."""
    if resettable:
        return (_status_kib("VmHWM") or 0) * KIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def release_free_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


@contextmanager
def address_space_cap(cap_bytes: int | None):
    """Limit this process's address space to its current size plus ``cap_bytes`` (None: no limit)."""
    if cap_bytes is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = address_space_bytes() + int(cap_bytes)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def cpu_extra_memory(step: Callable[[], object], before: Callable[[], None]) -> tuple[int, float, str]:
    """Peak RSS increase of one iteration over the RSS just before it; returns (bytes, seconds, method)."""
    before()
    release_free_memory()
    resettable = reset_peak_rss()
    base = current_rss_bytes()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes(resettable)
    how = "peak RSS (VmHWM, reset) - RSS before" if resettable else "ru_maxrss (process lifetime) - RSS before"
    return max(peak - base, 0), seconds, how


def cpu_times(step: Callable[[], object], before: Callable[[], None], reps: int, budget_s: float,
              already: Sequence[float] = ()) -> list[float]:
    """``time.perf_counter`` of up to ``reps`` iterations (stopping once ``budget_s`` is spent)."""
    times = list(already)
    spent = sum(times)
    while len(times) < reps and (spent < budget_s or not times):
        before()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return times


# ----------------------------------------------------------------------------------------- CUDA memory
def cuda_extra_memory(step: Callable[[], object], before: Callable[[], None], device) -> tuple[int, float, str]:
    """Peak allocated bytes during one iteration minus the bytes allocated before it."""
    before()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    step()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return max(torch.cuda.max_memory_allocated(device) - base, 0), seconds, \
        "torch.cuda.max_memory_allocated - memory_allocated before"


def do_bench_times(step: Callable[[], object], grads: list[torch.Tensor] | None = None,
                   warmup_ms: float = DO_BENCH_WARMUP_MS, rep_ms: float = DO_BENCH_REP_MS) -> tuple[list[float], str]:
    """Every timed run of ``triton.testing.do_bench`` in seconds (CUDA events where do_bench lacks "all")."""
    from triton.testing import do_bench

    try:
        ms = do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads or None, return_mode="all")
        return [t / 1e3 for t in ms], "triton.testing.do_bench"
    except (AssertionError, TypeError):  # older Triton: no return_mode="all"
        return cuda_event_times(step, grads or [], DO_BENCH_FALLBACK_REPEATS), \
            f"CUDA events, {DO_BENCH_FALLBACK_REPEATS} repeats (this Triton's do_bench returns no per-run times)"


def cuda_event_times(step: Callable[[], object], grads: list[torch.Tensor], repeats: int) -> list[float]:
    """Seconds of ``repeats`` iterations, each between two CUDA events (gradients dropped before each)."""
    times = []
    for _ in range(repeats):
        for g in grads:
            g.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def cuda_times(step: Callable[[], object], grads: list[torch.Tensor], iteration_s: float) -> tuple[list[float], str]:
    """Iteration times (seconds) with ``triton.testing.do_bench``, or CUDA events for slow iterations."""
    if iteration_s <= DO_BENCH_MAX_ITERATION_S:
        return do_bench_times(step, grads)
    return cuda_event_times(step, grads, SLOW_GPU_REPEATS), \
        f"CUDA events, {SLOW_GPU_REPEATS} repeats (iteration > {DO_BENCH_MAX_ITERATION_S} s)"


# -------------------------------------------------------------------------------------- matmul rates
def matmul_rate(device: str, dtype: torch.dtype, m: int, k: int, n: int) -> dict[str, float | str | list]:
    """Dense matrix-product rate: median TFLOP/s of ``[m, k] @ [k, n]`` on ``device`` in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(m * 31 + k * 7 + n)
    a = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, k, device=device, dtype=dtype, generator=gen)
    flops = 2 * m * k * n
    if device.startswith("cuda"):
        times, timer = do_bench_times(lambda: a @ b.T)
        seconds = statistics.median(times)
    else:
        a @ b.T
        times = []
        for _ in range(MATMUL_REPEATS):
            start = time.perf_counter()
            a @ b.T
            times.append(time.perf_counter() - start)
        seconds, timer = statistics.median(times), f"time.perf_counter median of {MATMUL_REPEATS}"
    return {"shape": [m, k, n], "dtype": str(dtype).replace("torch.", ""), "seconds": seconds,
            "tflops": flops / seconds / 1e12, "timer": timer}
