"""Per-chunk epilogues of the CPU single pass, compiled once per shape family (docs/cpu.md).

The CPU single pass (:mod:`sod_kernels.cpu_single_pass`) forms, per row chunk, the raw logit blocks
``xs = h_s W_s^T`` and ``xt = h_t W_t^T`` (``[C, V]``, whole vocabulary rows) with two matrix products,
then runs two epilogues over them:

- :func:`kl_stats` (``[C, V]`` -> per-row statistics): ``z = (x + b) / tau`` (with a soft-cap
  ``cap tanh((x + b) / cap) / tau``), the row maxima ``M`` (known before any exponential, so no rescaling),
  ``e_s = exp(z_s - M_s)``, ``e_t = exp(z_t - M_t)`` (the two exponentials per pair), their sums, the
  KL accumulator and ``D``; and, in place, the two blocks the gradient needs: ``xs <- e_s * slope``
  (``slope`` = the student cap's derivative, 1 without a cap) and ``xt <- (z_s - M_s) - (z_t - M_t)``
  (reverse KL) or ``e_t * slope`` (forward KL).
- :func:`jsd_stats` (``divergence="jsd"``, ``0 < beta < 1``): as :func:`kl_stats` for the generalized JSD
  ``D = beta KL(p_t || M) + (1 - beta) KL(p_s || M)``, ``M = (1 - beta) p_s + beta p_t``.  Its sum needs both
  log-partition functions, which whole-vocabulary rows know after the two sums: one more read of the block
  with one more ``exp`` and one ``log1p`` per entry than the KL (``log M`` from the two shifted log-probs,
  never from probabilities that underflow).  In place: ``xs <- e_s * slope``, ``xt <- r = log p_s - log M``;
  it returns ``c = KL(p_s || M)`` as the centre, so the gradient ``(1 - beta) p_s (r - c)`` is
  :func:`kl_grad`'s reverse-KL form with ``scale`` times ``1 - beta``.
- :func:`kl_grad` (in place into ``xs``): ``d(logits) = scale * p_s ((z_s - M_s) - (z_t - M_t) - c')`` for
  reverse KL (the shifted form of docs/math.md) or ``scale * (p_s - p_t)`` for forward KL, with
  ``p = e / sum(e)``; with a hard-label term (``with_hard``) plus ``hard * p_s`` (the softmax part of the
  cross-entropy's gradient; the caller subtracts ``hard`` times the slope at the label's column).

Both are plain PyTorch.  By default each is wrapped in ``torch.compile`` (Inductor's C++ backend: one fused,
row-parallel, vectorized loop nest per function instead of a dozen separate passes over ``[C, V]``) with
dynamic sizes, so a process compiles each variant once (per dtype, divergence, soft-cap combination and
hard-label flag; ``beta`` is a tensor argument, not a variant), never per call or per chunk shape.  The first
call of a variant pays the compilation (seconds).
Set the environment variable ``SOD_KERNELS_CPU_COMPILE=0`` to run them eagerly (same results up to
rounding, slower, more temporary memory); where compilation fails (no C++ compiler, unsupported platform)
the epilogues fall back to eager with one warning.

Token log-probabilities (:mod:`sod_kernels.cpu_logprobs`) use :func:`logprob_stats` (forward statistics),
:func:`logprob_grad` (the recomputing backward) and :func:`token_loss_grad` (the policy loss's single pass) in
the same way.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch

from . import cpu_native

ENV_COMPILE = "SOD_KERNELS_CPU_COMPILE"
RECOMPILE_LIMIT = 64       # variants (dtype x flags) per epilogue before Dynamo would give up and run eagerly
# [rows, V] temporaries an epilogue's compiled code allocates (read off Inductor's generated code; the others keep
# none: they update the blocks in place), and how many bytes of them one call may hold (run_row_blocks)
TEMPORARIES = {"jsd_stats": 4}
TEMPORARY_BYTES = 32 << 20

_lock = threading.Lock()
_compiled: dict[str, Callable] = {}
_broken: list[str] = []    # the first compilation error, if any: eager from then on


def compile_enabled() -> bool:
    """Whether the CPU epilogues run compiled: ``SOD_KERNELS_CPU_COMPILE`` unset or not ``0``/``false``/``off``,
    Dynamo supported here, and no earlier compilation failure in this process."""
    if os.environ.get(ENV_COMPILE, "1").strip().lower() in ("0", "false", "off", "no", "eager"):
        return False
    if _broken:
        return False
    try:
        return bool(torch._dynamo.is_dynamo_supported())
    except Exception:  # pragma: no cover - very old or stripped-down torch
        return False


# ----------------------------------------------------------------------------------------- epilogues
def capped_logits(x, b, inv_temp, cap, capped: bool):
    """``z = (x + b) * inv_temp`` or ``cap tanh((x + b) / cap) * inv_temp``."""
    if capped:
        return torch.tanh((x + b) / cap) * cap * inv_temp
    return (x + b) * inv_temp


def capped_logits_slope(x, b, inv_temp, cap):
    """Capped student logits and the cap's slope ``1 - tanh^2(u) = 4 e / (1 + e)^2``, ``e = exp(-2|u|)``
    (exact where the cap saturates)."""
    u = (x + b) / cap
    e = torch.exp(-2.0 * u.abs())
    one_e = 1.0 + e
    t = (1.0 - e) / one_e
    t = torch.where(u < 0, -t, t)
    return t * cap * inv_temp, 4.0 * e / (one_e * one_e)


def student_logits(x, b, inv_temp, cap, capped: bool):
    """``(z, slope)``: the (capped) temperature-scaled logits of a raw block and the cap's slope there (None
    without a cap), as :func:`capped_logits_slope` forms them."""
    if capped:
        return capped_logits_slope(x, b, inv_temp, cap)
    return capped_logits(x, b, inv_temp, cap, False), None


def shifted_exponentials(xs: torch.Tensor, xt: torch.Tensor, bs: torch.Tensor, bt: torch.Tensor,
                         inv_temp: torch.Tensor, scap: torch.Tensor, tcap: torch.Tensor, student_capped: bool,
                         teacher_capped: bool):
    """The beginning every two-model epilogue shares, from the raw blocks ``xs``, ``xt`` (``[C, V]``; ``bs``,
    ``bt`` ``[V]`` biases, zeros for none; ``inv_temp``, ``scap``, ``tcap`` 0-d tensors): the capped logits
    ``z``, row maxima ``M = max z`` (``[C, 1]``), shifted logits ``y = z - M`` and ``e = exp(y)`` (``[C, V]``),
    row sums ``S = sum e`` (``[C]``).  Returns ``(slope, M_s, M_t, y_s, y_t, e_s, e_t, S_s, S_t)``, ``slope``
    the student cap's slope (None without a cap)."""
    zs, slope = student_logits(xs, bs, inv_temp, scap, student_capped)
    zt = capped_logits(xt, bt, inv_temp, tcap, teacher_capped)
    ms = zs.amax(1, keepdim=True)
    mt = zt.amax(1, keepdim=True)
    ys = zs - ms
    yt = zt - mt
    es = torch.exp(ys)
    et = torch.exp(yt)
    return slope, ms, mt, ys, yt, es, et, es.sum(1), et.sum(1)


def kl_stats(xs: torch.Tensor, xt: torch.Tensor, bs: torch.Tensor, bt: torch.Tensor, inv_temp: torch.Tensor,
             scap: torch.Tensor, tcap: torch.Tensor, forward_kl: bool, student_capped: bool, teacher_capped: bool):
    """Row statistics of the raw blocks ``xs``, ``xt`` (``[C, V]``, overwritten as the module docstring says).

    ``bs``, ``bt``: ``[V]`` biases (zeros for none); ``inv_temp``, ``scap``, ``tcap``: 0-d tensors.
    Returns ``(D, lse_s, lse_t, centre, sum_s, sum_t)``, each ``[C]`` in the blocks' dtype.
    """
    slope, ms, mt, ys, yt, es, et, sum_s, sum_t = shifted_exponentials(xs, xt, bs, bt, inv_temp, scap, tcap,
                                                                        student_capped, teacher_capped)
    delta = ys - yt
    if forward_kl:       # W = teacher: c' = E_t[(z_t - M_t) - (z_s - M_s)]
        centre = -(et * delta).sum(1) / sum_t
        D = centre - sum_t.log() + sum_s.log()
        second = et if slope is None else et * slope
    else:                # W = student: c' = E_s[(z_s - M_s) - (z_t - M_t)]
        centre = (es * delta).sum(1) / sum_s
        D = centre - sum_s.log() + sum_t.log()
        second = delta
    first = es if slope is None else es * slope
    xs.copy_(first)
    xt.copy_(second)
    return D, ms.squeeze(1) + sum_s.log(), mt.squeeze(1) + sum_t.log(), centre, sum_s, sum_t


def jsd_stats(xs: torch.Tensor, xt: torch.Tensor, bs: torch.Tensor, bt: torch.Tensor, inv_temp: torch.Tensor,
              scap: torch.Tensor, tcap: torch.Tensor, beta: torch.Tensor, student_capped: bool,
              teacher_capped: bool):
    """Row statistics of the generalized JSD of the raw blocks ``xs``, ``xt`` (``[C, V]``, overwritten as the
    module docstring says); ``beta``: 0-d tensor in ``(0, 1)`` (a tensor: one compiled variant for every beta).

    With ``d = (log p_t + log beta) - (log p_s + log(1 - beta))``: ``r_s = log p_s - log M =
    -log(1 - beta) - softplus(d)``, ``r_t = log p_t - log M = -log(beta) - softplus(-d)``
    (``softplus(x) = max(x, 0) + log1p(exp(-|x|))``: the one more ``exp`` + ``log1p`` per entry).
    Returns ``(D, lse_s, lse_t, c, sum_s, sum_t)``, each ``[C]`` in the blocks' dtype, ``c = KL(p_s || M)``.
    """
    slope, ms, mt, ys, yt, es, et, sum_s, sum_t = shifted_exponentials(xs, xt, bs, bt, inv_temp, scap, tcap,
                                                                        student_capped, teacher_capped)
    log_sum_s, log_sum_t = sum_s.log(), sum_t.log()
    log_b, log_1mb = torch.log(beta), torch.log1p(-beta)
    d = (yt - ys) + (log_sum_s - log_sum_t + (log_b - log_1mb))[:, None]
    soft = torch.log1p(torch.exp(-d.abs()))
    r_s = -log_1mb - (torch.clamp(d, min=0.0) + soft)
    r_t = -log_b - (torch.clamp(-d, min=0.0) + soft)
    centre = (es * r_s).sum(1) / sum_s
    kl_t = (et * r_t).sum(1) / sum_t
    D = beta * kl_t + (1.0 - beta) * centre
    xs.copy_(es if slope is None else es * slope)
    xt.copy_(r_s)
    return D, ms.squeeze(1) + log_sum_s, mt.squeeze(1) + log_sum_t, centre, sum_s, sum_t


def kl_grad(first: torch.Tensor, second: torch.Tensor, centre: torch.Tensor, sum_s: torch.Tensor,
            sum_t: torch.Tensor, scale: torch.Tensor, hard: torch.Tensor, forward_kl: bool, with_hard: bool) -> None:
    """``first <- d(logits)`` of the blocks :func:`kl_stats` (or :func:`jsd_stats`, reverse-KL form) left
    (``scale [C]``: dL/dD / tau per row; ``hard``: 0-d, the hard-label term's ``lambda / (normalizer tau)``,
    used when ``with_hard``: adds ``hard * p_s`` times the slope)."""
    if forward_kl:
        a = scale + hard if with_hard else scale
        g = first * (a / sum_s)[:, None] - second * (scale / sum_t)[:, None]
    elif with_hard:
        g = first * ((second - centre[:, None]) * (scale / sum_s)[:, None] + (hard / sum_s)[:, None])
    else:
        g = first * (second - centre[:, None]) * (scale / sum_s)[:, None]
    first.copy_(g)


def logprob_stats(x: torch.Tensor, b: torch.Tensor, inv_temp: torch.Tensor, cap: torch.Tensor, capped: bool,
                  with_entropy: bool, keep: bool):
    """Token log-prob statistics of a raw block ``x [C, V]``: returns ``(lse, total, entropy)`` (``total`` =
    ``sum exp(z - M)``, ``entropy`` = ``-sum p log p`` or None).  With ``keep`` it leaves, in place,
    ``x <- exp(z - M) * slope`` (the unnormalized probabilities times the cap's slope) for
    :func:`token_loss_grad`."""
    z, slope = student_logits(x, b, inv_temp, cap, capped)
    m = z.amax(1, keepdim=True)
    y = z - m
    e = torch.exp(y)
    total = e.sum(1)
    log_total = total.log()
    entropy = log_total - (e * y).sum(1) / total if with_entropy else None
    if keep:
        x.copy_(e if slope is None else e * slope)
    return m.squeeze(1) + log_total, total, entropy


def token_loss_grad(e: torch.Tensor, total: torch.Tensor, scale: torch.Tensor) -> None:
    """``e <- -scale * p`` (``p = e / total``, times the cap's slope already in ``e``): the softmax part of
    ``scale * d logp(y) / dx``; the caller adds ``scale`` (times the slope) at the sampled column."""
    e.copy_(e * (-scale / total)[:, None])


def logprob_grad(x: torch.Tensor, b: torch.Tensor, inv_temp: torch.Tensor, cap: torch.Tensor, lse: torch.Tensor,
                 y: torch.Tensor, scale: torch.Tensor, scale_entropy: torch.Tensor, entropy: torch.Tensor,
                 capped: bool, with_entropy: bool) -> None:
    """The recomputing backward's ``d(logits)`` in place of the raw block ``x [C, V]``:
    ``scale (onehot(y) - p) - scale_entropy p (log p + H)``, times the cap's slope (``scale`` and
    ``scale_entropy`` ``[C]`` already hold ``1 / tau``)."""
    if capped:
        z, slope = capped_logits_slope(x, b, inv_temp, cap)
    else:
        z, slope = capped_logits(x, b, inv_temp, cap, False), None
    log_p = z - lse[:, None]
    p = torch.exp(log_p)
    cols = torch.arange(x.shape[1], device=x.device)
    onehot = cols[None, :] == y[:, None]
    g = torch.where(onehot, 1.0 - p, -p) * scale[:, None]
    if with_entropy:
        g = g - scale_entropy[:, None] * p * (log_p + entropy[:, None])
    if slope is not None:
        g = g * slope
    x.copy_(g)


EPILOGUES = {"kl_stats": kl_stats, "jsd_stats": jsd_stats, "kl_grad": kl_grad, "logprob_stats": logprob_stats,
             "token_loss_grad": token_loss_grad, "logprob_grad": logprob_grad}


# The C++ kernels (sod_kernels.core.cpu_native) that replace an epilogue where they apply: name -> (whether they
# take these arguments, the call), both with the epilogue's own arguments.
_NATIVE = {
    "kl_stats": (
        lambda xs, xt, bs, bt, inv_temp, scap, tcap, forward_kl, s_capped, t_capped:
            cpu_native.kl_stats_supported(xs, xt, s_capped or t_capped),
        lambda lib, xs, xt, bs, bt, inv_temp, scap, tcap, forward_kl, s_capped, t_capped:
            cpu_native.kl_stats(lib, xs, xt, bs, bt, float(inv_temp), forward_kl)),
    "logprob_stats": (
        lambda x, b, inv_temp, cap, capped, with_entropy, keep: cpu_native.logprob_supported(x, capped),
        lambda lib, x, b, inv_temp, cap, capped, with_entropy, keep:
            cpu_native.logprob_stats(lib, x, b, float(inv_temp), with_entropy, keep)),
    "logprob_grad": (
        lambda x, b, inv_temp, cap, lse, y, scale, scale_h, ent, capped, with_entropy:
            cpu_native.logprob_supported(x, capped),
        lambda lib, x, b, inv_temp, cap, lse, y, scale, scale_h, ent, capped, with_entropy:
            cpu_native.logprob_grad(lib, x, b, float(inv_temp), lse, y, scale, scale_h, ent, with_entropy)),
}


# --------------------------------------------------------------------------------------- compile once
def _compiled_fn(name: str) -> Callable:
    with _lock:
        fn = _compiled.get(name)
        if fn is None:
            fn = torch.compile(EPILOGUES[name], dynamic=True, fullgraph=True)
            _compiled[name] = fn
        return fn


def run_row_blocks(name: str, xs: torch.Tensor, xt: torch.Tensor, *args, rows: int):
    """:func:`run` of a two-block epilogue (``xs``, ``xt``: ``[rows, V]``, then ``args``) over row sub-blocks small
    enough that its ``[rows, V]`` temporaries (:data:`TEMPORARIES`) stay within :data:`TEMPORARY_BYTES`; the
    per-row outputs (a tuple of ``[rows]`` tensors) concatenated.  Rows are independent, so the results are
    those of one call; an epilogue without temporaries runs as one call."""
    per_row = TEMPORARIES.get(name, 0) * xs.shape[1] * xs.element_size()
    step = max(TEMPORARY_BYTES // per_row, 2) if per_row else rows
    if step >= rows:
        return run(name, xs, xt, *args, rows=rows)
    parts = [run(name, xs[a:a + step], xt[a:a + step], *args, rows=min(step, rows - a))
             for a in range(0, rows, step)]
    return tuple(torch.cat(column) for column in zip(*parts))


def run(name: str, *args, rows: int):
    """Run epilogue ``name`` compiled (when :func:`compile_enabled` and the chunk has more than one row: a
    one-row chunk runs eagerly rather than compile a size-1 specialization) or eagerly.  ``kl_stats`` without
    soft-caps, ``logprob_stats`` and ``logprob_grad`` without a soft-cap run the C++ kernels of
    :mod:`sod_kernels.core.cpu_native` where they are available (same results to rounding, fewer reads of the
    blocks)."""
    fn = EPILOGUES[name]
    if rows <= 1 or not compile_enabled():
        with torch.no_grad():
            return fn(*args)
    native = _NATIVE.get(name)
    if native is not None and native[0](*args):
        lib = cpu_native.library()
        if lib is not None:
            return native[1](lib, *args)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return _compiled_fn(name)(*args)
    except Exception as exc:  # no compiler, unsupported platform...: eager for the rest of the process
        if not _broken:
            _broken.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(f"sod_kernels: compiling the CPU epilogue failed ({type(exc).__name__}); running it "
                          f"eagerly from now on (set {ENV_COMPILE}=0 to skip the attempt)", RuntimeWarning,
                          stacklevel=2)
        with torch.no_grad():
            return fn(*args)
