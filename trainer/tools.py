"""The Python tool behind rollouts: a thin adapter from the trainer's executor interface to the sandbox.

The rollout only needs a callable ``code -> result`` with ``output`` / ``ok`` / ``timed_out`` fields
(:data:`trainer.rollout.ToolExecutor`), so tests can inject their own; real runs use
:func:`sandbox_executor`, which checks the sandbox policy once up front (fail fast on a machine missing a
protection the run did not explicitly allow) and then runs every call in :func:`trainer.sandbox.run_python`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import sandbox
from .rollout import ToolObservation


@dataclass(frozen=True)
class SandboxExecutor:
    """Runs tool code with :func:`trainer.sandbox.run_python` under a fixed policy and timeout."""

    timeout_s: float
    policy: sandbox.SandboxPolicy

    def __call__(self, code: str) -> ToolObservation:
        result = sandbox.run_python(code, timeout_s=self.timeout_s, policy=self.policy)
        return ToolObservation(output=result.output, ok=result.ok, timed_out=result.timed_out)


def sandbox_executor(timeout_s: float, allow_missing: Sequence[str] = ()) -> SandboxExecutor:
    """A checked sandbox executor.

    Args:
        timeout_s: wall-clock limit of each tool call.
        allow_missing: protections (names from ``trainer.sandbox.PROTECTIONS``) the run may do without;
            the trainer's ``sandbox_allow_missing`` option.
    Raises:
        trainer.sandbox.SandboxUnavailableError: a protection not in ``allow_missing`` is unavailable.
    """
    policy = sandbox.SandboxPolicy(allow_missing=frozenset(allow_missing))
    sandbox.check_policy(policy)
    return SandboxExecutor(timeout_s=timeout_s, policy=policy)


def describe_sandbox() -> str:
    """The sandbox's capability summary (printed when a run starts)."""
    return sandbox.sandbox_capabilities().describe()


def demo_tool_executor(executor, *, allow_missing, memoize: bool):
    """The tool executor of the demo and the experiment: ``executor`` if the caller gives one (tests), else
    the sandbox (its protections printed), wrapped in :class:`trainer.measure.MemoizedExecutor` unless
    ``memoize`` is False."""
    if executor is not None:
        print(f"tool executor: {type(executor).__name__} (given by the caller, not the sandbox)")
        return executor
    from .measure import MemoizedExecutor
    print(describe_sandbox())
    sandbox = sandbox_executor(timeout_s=10.0, allow_missing=allow_missing)
    return MemoizedExecutor(sandbox) if memoize else sandbox
