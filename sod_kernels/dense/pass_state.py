"""Per-call state of the dense loss's GPU passes, shared by its chunk loops: :class:`ForwardResult` (the per-row
outputs and the frame the gradient kernel needs) and :class:`ChunkWeightPlan` (the single pass's weights as the
row-finish kernel takes them, chunk by chunk)."""

from __future__ import annotations

import torch

from ..steps.plan import kernel_plan
from .kernels import WEIGHTS_GIVEN, WEIGHTS_NONE, WEIGHTS_STEPS, ChunkWeightArgs, KLRowStats, RowOutputs


class ForwardResult:
    """Per-row outputs ``[Na]`` float32: D, lse_s, lse_t, logp_s(y), logp_t(y) (None without targets), and
    ``frame [3, Na]`` (max_s, max_t, centre) that the backward's gradient kernel needs."""

    def __init__(self, n: int, device, with_targets: bool):
        empty = lambda: torch.empty(n, dtype=torch.float32, device=device)  # noqa: E731
        self.D, self.lse_s, self.lse_t = empty(), empty(), empty()
        self.lp_s = empty() if with_targets else None
        self.lp_t = empty() if with_targets else None
        self.frame = torch.empty(3, n, dtype=torch.float32, device=device)

    def store(self, start: int, stop: int, stats: KLRowStats, sampled=None) -> None:
        self.D[start:stop], self.lse_s[start:stop], self.lse_t[start:stop] = stats.D, stats.lse_s, stats.lse_t
        self.frame[0, start:stop], self.frame[1, start:stop], self.frame[2, start:stop] = \
            stats.max_s, stats.max_t, stats.centre
        if sampled is not None:
            self.lp_s[start:stop], self.lp_t[start:stop] = sampled

    def views(self, start: int) -> RowOutputs:
        """Views of every per-row buffer from row ``start`` on (where the row-finish kernel writes a chunk)."""
        tail = lambda x: None if x is None else x[start:]  # noqa: E731
        return RowOutputs(self.D[start:], self.lse_s[start:], self.lse_t[start:], self.frame[:, start:],
                          tail(self.lp_s), tail(self.lp_t))

    def stats(self, start: int, stop: int) -> KLRowStats:
        return KLRowStats(self.D[start:stop], self.lse_s[start:stop], self.lse_t[start:stop],
                          self.frame[0, start:stop], self.frame[1, start:stop], self.frame[2, start:stop])


class ChunkWeightPlan:
    """The single pass's weights, as :func:`kl_row_finish` takes them chunk by chunk.

    From a weight function's :class:`~sod_kernels.steps.plan.KernelWeightPlan` (``in_kernel``): the mode and the
    whole-call tensors, made once (``params`` float64 ``(epsilon, delta, grad_scale)``, the steps' float64 prefix
    scratch); each chunk's
    :class:`ChunkWeightArgs` is then views and Python ints (no launch, no sync).  From any other callable: the
    kernel runs with every weight 1 and :meth:`apply_callable` overwrites the chunk's loss slot and scale."""

    def __init__(self, chunk_weights, grad_scale: float, longest: int, device):
        self.fn = chunk_weights
        self.grad_scale = grad_scale
        plan = kernel_plan(chunk_weights)
        self.in_kernel = plan is not None
        mode = plan.mode if self.in_kernel else "none"
        self.mode = {"none": WEIGHTS_NONE, "given": WEIGHTS_GIVEN, "steps": WEIGHTS_STEPS}[mode]
        steps = plan.steps if self.mode == WEIGHTS_STEPS else None
        eps, delta = (steps.epsilon, steps.delta) if steps is not None else (1.0, 0.0)
        self.params = torch.tensor([eps, delta, grad_scale], dtype=torch.float64, device=device)
        self.steps = steps
        self.tensors = steps.kernel_args() if steps is not None else None
        self.prefix = torch.empty(longest + 1, dtype=torch.float64, device=device) if steps is not None else None
        self.given = plan.given if self.mode == WEIGHTS_GIVEN else None

    def args(self, start: int, stop: int) -> ChunkWeightArgs:
        if self.mode == WEIGHTS_GIVEN:
            return ChunkWeightArgs(WEIGHTS_GIVEN, self.params, given=self.given[start:stop])
        if self.mode == WEIGHTS_STEPS:
            t = self.tensors
            return ChunkWeightArgs(WEIGHTS_STEPS, self.params, step=t["step"][start:stop], bounds=t["bounds"],
                                   first_step=t["first_step"], means=t["means"], prefix=self.prefix,
                                   chunk_start=start, chunk_step0=self.steps.first_step_of_chunk(start))
        return ChunkWeightArgs(WEIGHTS_NONE, self.params)

    def apply_callable(self, out: ForwardResult, start: int, stop: int, sampled_signal: bool, scale: torch.Tensor,
                       slot: torch.Tensor) -> None:
        """A plain ``chunk_weights`` callable: the chunk's weights from torch ops, into ``slot`` (``sum w D``,
        float64) and ``scale[:C]`` (``w * grad_scale``, float32)."""
        D = out.D[start:stop]
        signal = (out.lp_s[start:stop] - out.lp_t[start:stop]).abs() if sampled_signal else D
        w = self.fn(start, stop, D, signal)
        slot.copy_((w.to(torch.float64) * D.to(torch.float64)).sum())
        scale[: stop - start] = (w * self.grad_scale).to(torch.float32)
