"""A hand-written C++ kernel for the CPU single pass's KL statistics (``kl_stats`` without soft-caps), built once
per machine through the C++ toolchain ``torch.compile`` already uses on the CPU.

The compiled PyTorch epilogue (:func:`sod_kernels.core.cpu_epilogue.kl_stats`) becomes four row loops over the
``[C, V]`` blocks (Inductor does not fuse the two maxima and the sums into one outer loop), so each block is read
from memory four times.  This kernel does, per row: one pass for both maxima (reading the two rows, 2 x 4V
bytes, which then stay in the core's L2), and one pass that forms the two exponentials, the sums, the KL
accumulator and writes the two blocks the gradient needs.  Its arithmetic is that of ``kl_stats`` (the same
two exponentials per pair, ``at::vec`` / Sleef ``exp``, sums blocked in vector registers and added in float64),
so results agree to rounding; rows are shared out dynamically over torch's OpenMP threads (a row is computed by
one thread, in a fixed order: bitwise the same run to run).

Used automatically for float32 and float64 blocks with unit column stride and no soft-cap; everything else
runs the compiled epilogue.  ``SOD_KERNELS_CPU_NATIVE=0`` (``off``/``false``/``no``) turns it off; if building
or loading it fails (no compiler, an Inductor without the code cache), the compiled epilogue runs instead, with
one ``RuntimeWarning``.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings

import torch

ENV_NATIVE = "SOD_KERNELS_CPU_NATIVE"

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>

template <typename T>
static void sod_kl_stats(T* xs, T* xt, const T* bs, const T* bt, T* out, int64_t C, int64_t V, int64_t ld,
                         double inv_temp, int64_t forward) {
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t L = Vec::size();
    constexpr int64_t BLOCK = 64 * L;
    const T it = static_cast<T>(inv_temp);
    const Vec itv(it);
    const int64_t Vv = V - V % L;
    auto vmax = [](Vec& a, Vec& b) { return at::vec::maximum(a, b); };
    auto vadd = [](Vec& a, Vec& b) { return a + b; };
    #pragma omp parallel for schedule(dynamic, 4)
    for (int64_t r = 0; r < C; ++r) {
        T* ps = xs + r * ld;
        T* pt = xt + r * ld;
        Vec mxs(-std::numeric_limits<T>::infinity()), mxt(-std::numeric_limits<T>::infinity());
        for (int64_t v = 0; v < Vv; v += L) {
            mxs = at::vec::maximum(mxs, (Vec::loadu(ps + v) + Vec::loadu(bs + v)) * itv);
            mxt = at::vec::maximum(mxt, (Vec::loadu(pt + v) + Vec::loadu(bt + v)) * itv);
        }
        T ms = at::vec::vec_reduce_all<T>(vmax, mxs), mt = at::vec::vec_reduce_all<T>(vmax, mxt);
        for (int64_t v = Vv; v < V; ++v) {
            ms = std::max(ms, (ps[v] + bs[v]) * it);
            mt = std::max(mt, (pt[v] + bt[v]) * it);
        }
        const Vec msv(ms), mtv(mt);
        double Ss = 0, St = 0, A = 0;
        for (int64_t b0 = 0; b0 < Vv; b0 += BLOCK) {
            const int64_t b1 = std::min(b0 + BLOCK, Vv);
            Vec ss(0), st(0), acc(0);
            for (int64_t v = b0; v < b1; v += L) {
                Vec ys = (Vec::loadu(ps + v) + Vec::loadu(bs + v)) * itv - msv;
                Vec yt = (Vec::loadu(pt + v) + Vec::loadu(bt + v)) * itv - mtv;
                Vec es = ys.exp(), et = yt.exp();
                Vec d = ys - yt;
                ss = ss + es;
                st = st + et;
                if (forward) {
                    acc = acc + et * d;
                    et.store(pt + v);
                } else {
                    acc = acc + es * d;
                    d.store(pt + v);
                }
                es.store(ps + v);
            }
            Ss += at::vec::vec_reduce_all<T>(vadd, ss);
            St += at::vec::vec_reduce_all<T>(vadd, st);
            A += at::vec::vec_reduce_all<T>(vadd, acc);
        }
        for (int64_t v = Vv; v < V; ++v) {
            const T ys = (ps[v] + bs[v]) * it - ms, yt = (pt[v] + bt[v]) * it - mt;
            const T es = std::exp(ys), et = std::exp(yt), d = ys - yt;
            Ss += es;
            St += et;
            if (forward) {
                A += et * d;
                pt[v] = et;
            } else {
                A += es * d;
                pt[v] = d;
            }
            ps[v] = es;
        }
        const T ss_t = static_cast<T>(Ss), st_t = static_cast<T>(St);
        T centre, D;
        if (forward) {            // c' = E_t[(z_s - M_s) - (z_t - M_t)] with the sign of kl_stats
            centre = static_cast<T>(-A / St);
            D = centre - std::log(st_t) + std::log(ss_t);
        } else {
            centre = static_cast<T>(A / Ss);
            D = centre - std::log(ss_t) + std::log(st_t);
        }
        out[r] = D;
        out[C + r] = ms + std::log(ss_t);
        out[2 * C + r] = mt + std::log(st_t);
        out[3 * C + r] = centre;
        out[4 * C + r] = ss_t;
        out[5 * C + r] = st_t;
    }
}

extern "C" void sod_kl_stats_f32(float* xs, float* xt, const float* bs, const float* bt, float* out, int64_t C,
                                 int64_t V, int64_t ld, double inv_temp, int64_t forward) {
    sod_kl_stats<float>(xs, xt, bs, bt, out, C, V, ld, inv_temp, forward);
}

extern "C" void sod_kl_stats_f64(double* xs, double* xt, const double* bs, const double* bt, double* out,
                                 int64_t C, int64_t V, int64_t ld, double inv_temp, int64_t forward) {
    sod_kl_stats<double>(xs, xt, bs, bt, out, C, V, ld, inv_temp, forward);
}
"""

_lock = threading.Lock()
_library: list = []        # [ctypes.CDLL] once built
_broken: list[str] = []    # the first build error, if any


def native_enabled() -> bool:
    """``SOD_KERNELS_CPU_NATIVE`` unset or ``1``/``on``/``true``/``yes``: True; ``0``/``off``/``false``/``no``:
    False; anything else is a ``ValueError``."""
    value = os.environ.get(ENV_NATIVE, "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("", "1", "on", "true", "yes"):
        return True
    raise ValueError(f"{ENV_NATIVE} must be 1/on or 0/off, got {os.environ.get(ENV_NATIVE)!r}")


def _build():
    from torch._inductor.codecache import CppCodeCache   # noqa: PLC0415 - only where the kernel is wanted

    lib = CppCodeCache.load(_SOURCE)
    ptr, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for name in ("sod_kl_stats_f32", "sod_kl_stats_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f64, i64]
        fn.restype = None
    return lib


def library():
    """The built kernel library, or None (turned off, or building failed: then one warning, once)."""
    if not native_enabled() or _broken:
        return None
    with _lock:
        if not _library and not _broken:
            try:
                _library.append(_build())
            except Exception as exc:  # no compiler, no Inductor code cache, ...: the compiled epilogue instead
                _broken.append(f"{type(exc).__name__}: {exc}")
                warnings.warn(f"sod_kernels: building the CPU KL statistics kernel failed ({type(exc).__name__}); "
                              f"using the compiled epilogue (set {ENV_NATIVE}=0 to skip the attempt)",
                              RuntimeWarning, stacklevel=3)
                return None
        return _library[0] if _library else None


def kl_stats_supported(xs: torch.Tensor, xt: torch.Tensor, capped: bool) -> bool:
    """Whether :func:`kl_stats` takes these blocks: float32 / float64 CPU blocks of one shape with unit column
    stride and one row stride, no soft-cap."""
    return (not capped and xs.dtype in (torch.float32, torch.float64) and xt.dtype == xs.dtype
            and xs.device.type == "cpu" and xs.dim() == 2 and xs.shape == xt.shape and xs.stride(1) == 1
            and xt.stride(1) == 1 and xs.stride(0) == xt.stride(0) and xs.stride(0) >= xs.shape[1])


def kl_stats(lib, xs: torch.Tensor, xt: torch.Tensor, bs: torch.Tensor, bt: torch.Tensor, inv_temp: float,
             forward_kl: bool) -> tuple:
    """The contract of :func:`sod_kernels.core.cpu_epilogue.kl_stats` without soft-caps: raw blocks ``xs``,
    ``xt`` (``[C, V]``, overwritten: ``xs <- exp(z_s - M_s)``, ``xt <- (z_s - M_s) - (z_t - M_t)`` or, forward
    KL, ``exp(z_t - M_t)``), biases ``bs``, ``bt`` ``[V]`` (zeros for none), ``z = (x + b) * inv_temp``.
    Returns ``(D, lse_s, lse_t, centre, sum_s, sum_t)``, each ``[C]`` in the blocks' dtype."""
    C, V = xs.shape
    out = torch.empty(6, C, dtype=xs.dtype)
    bs = bs.to(xs.dtype).contiguous()
    bt = bt.to(xs.dtype).contiguous()
    fn = lib.sod_kl_stats_f32 if xs.dtype == torch.float32 else lib.sod_kl_stats_f64
    if C:
        fn(xs.data_ptr(), xt.data_ptr(), bs.data_ptr(), bt.data_ptr(), out.data_ptr(), C, V, xs.stride(0),
           float(inv_temp), int(bool(forward_kl)))
    return tuple(out.unbind(0))
