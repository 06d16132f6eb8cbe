"""Hand-written C++ kernels for the CPU single passes, built once per machine through the C++ toolchain
``torch.compile`` already uses on the CPU: the KL statistics (``kl_stats`` without soft-caps), the token
log-prob statistics and gradient (``logprob_stats`` / ``logprob_grad`` without soft-caps: the row maximum, then
one exponential per entry from L2, in one row loop each), and the matrix
products as vocabulary tiles on torch's OpenMP threads (:func:`tiled_logits`, :func:`tiled_fold`, used by
:mod:`sod_kernels.core.cpu_products`; one BLAS call per tile, the BLAS torch links).

The compiled PyTorch epilogue (:func:`sod_kernels.core.cpu_epilogue.kl_stats`) becomes four row loops over the
``[C, V]`` blocks (Inductor does not fuse the two maxima and the sums into one outer loop), so each block is read
from memory four times.  This kernel does, per row: one pass for both maxima (reading the two rows, 2 x 4V
bytes, which then stay in the core's L2), and one pass that forms the two exponentials, the sums, the KL
accumulator and writes the two blocks the gradient needs.  Its arithmetic is that of ``kl_stats`` (the same
two exponentials per pair, ``at::vec`` / Sleef ``exp``, sums blocked in vector registers and added in float64),
so results agree to rounding; rows are shared out dynamically over torch's OpenMP threads (a row is computed by
one thread, in a fixed order: bitwise the same run to run).

The epilogue kernels are used for float32 and float64 blocks with unit column stride and no soft-cap; everything
else runs the compiled epilogue.  ``SOD_KERNELS_CPU_NATIVE=0`` (``off``/``false``/``no``) turns it off; if building
or loading it fails (no compiler, an Inductor without the code cache), the compiled epilogue runs instead, with
one ``RuntimeWarning``.
"""

from __future__ import annotations

import ctypes
import threading
import warnings

import torch

from .runtime import env_switch
ENV_NATIVE = "SOD_KERNELS_CPU_NATIVE"

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>

// max over v < V of (p[v] + b[v]) * it (the scaled logits of one row)
template <typename T>
static inline T scaled_row_max(const T* p, const T* b, int64_t V, T it) {
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t L = Vec::size();
    const int64_t Vv = V - V % L;
    const Vec itv(it);
    Vec mx(-std::numeric_limits<T>::infinity());
    for (int64_t v = 0; v < Vv; v += L)
        mx = at::vec::maximum(mx, (Vec::loadu(p + v) + Vec::loadu(b + v)) * itv);
    T m = at::vec::vec_reduce_all<T>([](Vec& a, Vec& c) { return at::vec::maximum(a, c); }, mx);
    for (int64_t v = Vv; v < V; ++v)
        m = std::max(m, (p[v] + b[v]) * it);
    return m;
}

template <typename T>
static inline double lane_sum(at::vec::Vectorized<T> a) {
    return at::vec::vec_reduce_all<T>([](at::vec::Vectorized<T>& x, at::vec::Vectorized<T>& y) { return x + y; }, a);
}

template <typename T>
static void sod_kl_stats(T* xs, T* xt, const T* bs, const T* bt, T* out, int64_t C, int64_t V, int64_t ld,
                         double inv_temp, int64_t forward) {
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t L = Vec::size();
    constexpr int64_t BLOCK = 64 * L;
    const T it = static_cast<T>(inv_temp);
    const Vec itv(it);
    const int64_t Vv = V - V % L;
    #pragma omp parallel for schedule(dynamic, 4)
    for (int64_t r = 0; r < C; ++r) {
        T* ps = xs + r * ld;
        T* pt = xt + r * ld;
        const T ms = scaled_row_max(ps, bs, V, it), mt = scaled_row_max(pt, bt, V, it);
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
            Ss += lane_sum(ss);
            St += lane_sum(st);
            A += lane_sum(acc);
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

// Token log-prob statistics of a raw block x [C, V] (row stride ld), z = (x + b) * inv_temp: per row one pass for
// the maximum M, one (from L2) for e = exp(z - M), S = sum e and, with_entropy, A = sum e (z - M); with keep,
// x <- e.  out [3, C]: lse = M + log S, S, entropy = log S - A / S.
template <typename T>
static void sod_logprob_stats(T* x, const T* b, T* out, int64_t C, int64_t V, int64_t ld, double inv_temp,
                              int64_t with_entropy, int64_t keep) {
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t L = Vec::size();
    constexpr int64_t BLOCK = 64 * L;
    const T it = static_cast<T>(inv_temp);
    const Vec itv(it);
    const int64_t Vv = V - V % L;
    #pragma omp parallel for schedule(dynamic, 4)
    for (int64_t r = 0; r < C; ++r) {
        T* p = x + r * ld;
        const T m = scaled_row_max(p, b, V, it);
        const Vec mv(m);
        double S = 0, A = 0;
        for (int64_t b0 = 0; b0 < Vv; b0 += BLOCK) {
            const int64_t b1 = std::min(b0 + BLOCK, Vv);
            Vec s(0), acc(0);
            for (int64_t v = b0; v < b1; v += L) {
                Vec y = (Vec::loadu(p + v) + Vec::loadu(b + v)) * itv - mv;
                Vec e = y.exp();
                s = s + e;
                if (with_entropy)
                    acc = acc + e * y;
                if (keep)
                    e.store(p + v);
            }
            S += lane_sum(s);
            if (with_entropy)
                A += lane_sum(acc);
        }
        for (int64_t v = Vv; v < V; ++v) {
            const T y = (p[v] + b[v]) * it - m, e = std::exp(y);
            S += e;
            A += e * y;
            if (keep)
                p[v] = e;
        }
        const T total = static_cast<T>(S), log_total = std::log(total);
        out[r] = m + log_total;
        out[C + r] = total;
        out[2 * C + r] = with_entropy ? static_cast<T>(log_total - A / S) : T(0);
    }
}

// The recomputing backward's d(logits) in place of a raw block x [C, V] (row stride ld): with
// log p = (x + b) * inv_temp - lse, g = scale (onehot(y) - p) - scale_h p (log p + ent) (the entropy term only
// with_entropy).
template <typename T>
static void sod_logprob_grad(T* x, const T* b, const T* lse, const int64_t* y, const T* scale, const T* scale_h,
                             const T* ent, int64_t C, int64_t V, int64_t ld, double inv_temp, int64_t with_entropy) {
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t L = Vec::size();
    const T it = static_cast<T>(inv_temp);
    const Vec itv(it);
    const int64_t Vv = V - V % L;
    #pragma omp parallel for schedule(dynamic, 4)
    for (int64_t r = 0; r < C; ++r) {
        T* p = x + r * ld;
        const T l = lse[r], s = scale[r], sh = with_entropy ? scale_h[r] : T(0), h = with_entropy ? ent[r] : T(0);
        const int64_t target = y[r];
        const T lp_y = (p[target] + b[target]) * it - l, p_y = std::exp(lp_y);
        const Vec lv(l), nsv(-s), shv(sh), hv(h);
        for (int64_t v = 0; v < Vv; v += L) {
            Vec lp = (Vec::loadu(p + v) + Vec::loadu(b + v)) * itv - lv;
            Vec q = lp.exp();
            Vec g = q * nsv;
            if (with_entropy)
                g = g - shv * q * (lp + hv);
            g.store(p + v);
        }
        for (int64_t v = Vv; v < V; ++v) {
            const T lp = (p[v] + b[v]) * it - l, q = std::exp(lp);
            T g = -q * s;
            if (with_entropy)
                g = g - sh * q * (lp + h);
            p[v] = g;
        }
        T g_y = (T(1) - p_y) * s;
        if (with_entropy)
            g_y = g_y - sh * p_y * (lp_y + h);
        p[target] = g_y;
    }
}

// The CPU products as vocabulary tiles shared out dynamically over torch's OpenMP threads, each tile one
// single-threaded BLAS call (MKL / OpenBLAS run sequentially inside a parallel region).  Row-major [R, K] with
// row stride ld is column-major [K, R] with leading dimension ld.
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);
extern "C" void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
                       const double*, const int*, const double*, const int*, const double*, double*, const int*);

static inline void gemm(const char* ta, const char* tb, int m, int n, int k, float alpha, const float* a, int lda,
                        const float* b, int ldb, float beta, float* c, int ldc) {
    sgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
static inline void gemm(const char* ta, const char* tb, int m, int n, int k, double alpha, const double* a, int lda,
                        const double* b, int ldb, double beta, double* c, int ldc) {
    dgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// out[:, a:b] = h W[a:b]^T for each of `tiles` even column tiles (out [C, V] row stride ldo; h [C, H] row
// stride ldh; W [V, H] row stride ldw).
template <typename T>
static void sod_tiled_logits(const T* h, int64_t ldh, const T* w, int64_t ldw, T* out, int64_t ldo, int64_t C,
                             int64_t V, int64_t H, int64_t tiles) {
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t a = V * t / tiles, b = V * (t + 1) / tiles;
        if (b > a)
            gemm("T", "N", (int)(b - a), (int)C, (int)H, T(1), w + a * ldw, (int)ldw, h, (int)ldh, T(0), out + a,
                 (int)ldo);
    }
}

// Per even vocabulary group j of `groups`: d_hidden (j == 0) or partials[j - 1] ([C, H] contiguous) =
// g[:, a:b] W[a:b]; d_weight[a:b] += g[:, a:b]^T h (d_weight [V, H] contiguous); d_bias[a:b] += column sums;
// then d_hidden += partials in group order.  A null pointer skips that gradient.
template <typename T>
static void sod_tiled_fold(const T* g, int64_t ldg, const T* h, int64_t ldh, const T* w, int64_t ldw, T* d_hidden,
                           T* partials, T* d_weight, T* d_bias, int64_t C, int64_t V, int64_t H, int64_t groups) {
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t j = 0; j < groups; ++j) {
        const int64_t a = V * j / groups, b = V * (j + 1) / groups;
        if (b <= a)
            continue;
        if (d_hidden) {
            T* target = j == 0 ? d_hidden : partials + (j - 1) * C * H;
            gemm("N", "N", (int)H, (int)C, (int)(b - a), T(1), w + a * ldw, (int)ldw, g + a, (int)ldg, T(0),
                 target, (int)H);
        }
        if (d_weight)
            gemm("N", "T", (int)H, (int)(b - a), (int)C, T(1), h, (int)ldh, g + a, (int)ldg, T(1),
                 d_weight + a * H, (int)H);
        if (d_bias)
            for (int64_t r = 0; r < C; ++r)
                for (int64_t v = a; v < b; ++v)
                    d_bias[v] += g[r * ldg + v];
    }
    if (d_hidden)
        for (int64_t j = 1; j < groups; ++j)
            for (int64_t i = 0; i < C * H; ++i)
                d_hidden[i] += partials[(j - 1) * C * H + i];
}

extern "C" void sod_tiled_logits_f32(const float* h, int64_t ldh, const float* w, int64_t ldw, float* out,
                                     int64_t ldo, int64_t C, int64_t V, int64_t H, int64_t tiles) {
    sod_tiled_logits<float>(h, ldh, w, ldw, out, ldo, C, V, H, tiles);
}
extern "C" void sod_tiled_logits_f64(const double* h, int64_t ldh, const double* w, int64_t ldw, double* out,
                                     int64_t ldo, int64_t C, int64_t V, int64_t H, int64_t tiles) {
    sod_tiled_logits<double>(h, ldh, w, ldw, out, ldo, C, V, H, tiles);
}
extern "C" void sod_tiled_fold_f32(const float* g, int64_t ldg, const float* h, int64_t ldh, const float* w,
                                   int64_t ldw, float* d_hidden, float* partials, float* d_weight, float* d_bias,
                                   int64_t C, int64_t V, int64_t H, int64_t groups) {
    sod_tiled_fold<float>(g, ldg, h, ldh, w, ldw, d_hidden, partials, d_weight, d_bias, C, V, H, groups);
}
extern "C" void sod_tiled_fold_f64(const double* g, int64_t ldg, const double* h, int64_t ldh, const double* w,
                                   int64_t ldw, double* d_hidden, double* partials, double* d_weight,
                                   double* d_bias, int64_t C, int64_t V, int64_t H, int64_t groups) {
    sod_tiled_fold<double>(g, ldg, h, ldh, w, ldw, d_hidden, partials, d_weight, d_bias, C, V, H, groups);
}

extern "C" void sod_logprob_stats_f32(float* x, const float* b, float* out, int64_t C, int64_t V, int64_t ld,
                                      double inv_temp, int64_t with_entropy, int64_t keep) {
    sod_logprob_stats<float>(x, b, out, C, V, ld, inv_temp, with_entropy, keep);
}
extern "C" void sod_logprob_stats_f64(double* x, const double* b, double* out, int64_t C, int64_t V, int64_t ld,
                                      double inv_temp, int64_t with_entropy, int64_t keep) {
    sod_logprob_stats<double>(x, b, out, C, V, ld, inv_temp, with_entropy, keep);
}
extern "C" void sod_logprob_grad_f32(float* x, const float* b, const float* lse, const int64_t* y,
                                     const float* scale, const float* scale_h, const float* ent, int64_t C,
                                     int64_t V, int64_t ld, double inv_temp, int64_t with_entropy) {
    sod_logprob_grad<float>(x, b, lse, y, scale, scale_h, ent, C, V, ld, inv_temp, with_entropy);
}
extern "C" void sod_logprob_grad_f64(double* x, const double* b, const double* lse, const int64_t* y,
                                     const double* scale, const double* scale_h, const double* ent, int64_t C,
                                     int64_t V, int64_t ld, double inv_temp, int64_t with_entropy) {
    sod_logprob_grad<double>(x, b, lse, y, scale, scale_h, ent, C, V, ld, inv_temp, with_entropy);
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
    return env_switch(ENV_NATIVE)


def _build():
    from torch._inductor.codecache import CppCodeCache   # noqa: PLC0415 - only where the kernel is wanted

    lib = CppCodeCache.load(_SOURCE)
    ptr, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for name in ("sod_kl_stats_f32", "sod_kl_stats_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f64, i64]
        fn.restype = None
    for suffix in ("f32", "f64"):
        fn = getattr(lib, f"sod_logprob_stats_{suffix}")
        fn.argtypes = [ptr, ptr, ptr, i64, i64, i64, f64, i64, i64]
        fn.restype = None
        fn = getattr(lib, f"sod_logprob_grad_{suffix}")
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f64, i64]
        fn.restype = None
    for suffix in ("f32", "f64"):
        fn = getattr(lib, f"sod_tiled_logits_{suffix}")
        fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, i64]
        fn.restype = None
        fn = getattr(lib, f"sod_tiled_fold_{suffix}")
        fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64]
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
                warnings.warn(f"sod_kernels: building the CPU kernels (KL statistics, tiled products) failed "
                              f"({type(exc).__name__}); using the compiled epilogue and the thread pool (set "
                              f"{ENV_NATIVE}=0 to skip the attempt)",
                              RuntimeWarning, stacklevel=3)
                return None
        return _library[0] if _library else None


def _rows_ok(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= max(t.shape[1], 1) and t.device.type == "cpu"


def products_supported(dtype: torch.dtype, *tensors: torch.Tensor | None) -> bool:
    """Whether :func:`tiled_logits` / :func:`tiled_fold` take these ``[R, K]`` tensors: float32 / float64, one
    dtype, unit column stride (None entries are skipped)."""
    return dtype in (torch.float32, torch.float64) and all(
        t is None or (t.dtype == dtype and _rows_ok(t)) for t in tensors)


def tiled_logits(lib, h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, tiles: int) -> None:
    """``out [C, V] = h [C, H] w [V, H]^T`` over ``tiles`` even vocabulary tiles on torch's threads."""
    (C, H), V = h.shape, w.shape[0]
    fn = lib.sod_tiled_logits_f32 if h.dtype == torch.float32 else lib.sod_tiled_logits_f64
    if C and V:
        fn(h.data_ptr(), h.stride(0), w.data_ptr(), w.stride(0), out.data_ptr(), out.stride(0), C, V, H, tiles)


def tiled_fold(lib, g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, d_hidden, d_weight, d_bias,
               groups: int) -> None:
    """``d_hidden [C, H] = g w`` (written), ``d_weight [V, H] += g^T h``, ``d_bias [V] += colsum(g)`` over
    ``groups`` even vocabulary groups on torch's threads (``d_hidden``, ``d_weight``, ``d_bias`` contiguous or
    None)."""
    (C, V), H = g.shape, w.shape[1]
    partials = (torch.empty(groups - 1, C, H, dtype=g.dtype) if d_hidden is not None and groups > 1 else None)
    ptr = (lambda t: None if t is None else t.data_ptr())  # noqa: E731
    fn = lib.sod_tiled_fold_f32 if g.dtype == torch.float32 else lib.sod_tiled_fold_f64
    if C and V:
        fn(g.data_ptr(), g.stride(0), h.data_ptr(), h.stride(0), w.data_ptr(), w.stride(0), ptr(d_hidden),
           ptr(partials), ptr(d_weight), ptr(d_bias), C, V, H, groups)
    elif d_hidden is not None:
        d_hidden.zero_()


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


def logprob_supported(x: torch.Tensor, capped: bool) -> bool:
    """Whether :func:`logprob_stats` / :func:`logprob_grad` take this block: a float32 / float64 CPU ``[C, V]``
    block with unit column stride, no soft-cap."""
    return (not capped and x.dtype in (torch.float32, torch.float64) and x.device.type == "cpu" and _rows_ok(x))


def logprob_stats(lib, x: torch.Tensor, b: torch.Tensor, inv_temp: float, with_entropy: bool, keep: bool) -> tuple:
    """The contract of :func:`sod_kernels.core.cpu_epilogue.logprob_stats` without a soft-cap: raw block ``x``
    ``[C, V]`` (``keep``: overwritten with ``exp(z - M)``), bias ``b [V]`` (zeros for none),
    ``z = (x + b) * inv_temp``.  Returns ``(lse, total, entropy or None)``, each ``[C]`` in the block's dtype."""
    C, V = x.shape
    out = torch.empty(3, C, dtype=x.dtype)
    b = b.to(x.dtype).contiguous()
    fn = lib.sod_logprob_stats_f32 if x.dtype == torch.float32 else lib.sod_logprob_stats_f64
    if C:
        fn(x.data_ptr(), b.data_ptr(), out.data_ptr(), C, V, x.stride(0), float(inv_temp), int(bool(with_entropy)),
           int(bool(keep)))
    return out[0], out[1], (out[2] if with_entropy else None)


def logprob_grad(lib, x: torch.Tensor, b: torch.Tensor, inv_temp: float, lse: torch.Tensor, y: torch.Tensor,
                 scale: torch.Tensor, scale_entropy: torch.Tensor, entropy: torch.Tensor,
                 with_entropy: bool) -> None:
    """The contract of :func:`sod_kernels.core.cpu_epilogue.logprob_grad` without a soft-cap: ``x [C, V]`` raw
    logits, overwritten with ``d(logits)``; ``lse``, ``scale``, ``scale_entropy``, ``entropy`` ``[C]``, ``y [C]``
    the sampled columns (in ``[0, V)``)."""
    C, V = x.shape
    if not C:
        return
    dt = x.dtype
    col = (lambda t: t.to(dt).contiguous())  # noqa: E731
    lse, scale = col(lse), col(scale)
    scale_entropy, entropy = (col(scale_entropy), col(entropy)) if with_entropy else (scale, scale)
    b, y = col(b), y.to(torch.int64).contiguous()
    fn = lib.sod_logprob_grad_f32 if dt == torch.float32 else lib.sod_logprob_grad_f64
    fn(x.data_ptr(), b.data_ptr(), lse.data_ptr(), y.data_ptr(), scale.data_ptr(), scale_entropy.data_ptr(),
       entropy.data_ptr(), C, V, x.stride(0), float(inv_temp), int(bool(with_entropy)))
