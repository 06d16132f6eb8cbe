"""Static codegen checks: every Triton kernel compiles for Hopper (sm_90) without a GPU and nothing spills
to local memory, at the configs used for the headline size (N=16384, Hs=1024, Ht=2560, V=151936, bf16).
The kernels with ``tl.dot`` (the d(weight) fold kernel, the experimental dual-GEMM kernel) are also checked for
warpgroup MMA (wgmma) instructions; the default path's matrix products are cuBLAS calls.

The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it for the interpreter tests,
and it turns kernels into interpreted functions that cannot be compiled): ``python -m benchmarks.codegen
--json`` discovers every module listed in ``benchmarks.codegen.KERNEL_MODULES`` through its
``codegen_specs()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
COMPILE_TIMEOUT_S = 600
# sm_90 limits: 255 registers per thread, 227 KB of shared memory per block.
MAX_REGISTERS = 255
MAX_SHARED_BYTES = 227 * 1024
EPILOGUE_KERNELS = {"kl_partial_stats_kernel", "kl_logit_grad_kernel", "logprob_partial_stats_kernel",
                    "logprob_logit_grad_kernel"}


def _codegen_report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.codegen", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.codegen
def test_kernels_compile_for_hopper_without_spills():
    """One compile pass (tens of seconds) checks every discovered kernel and config."""
    report = _codegen_report()
    names = {row["name"].split("[")[0] for row in report["rows"]}
    assert EPILOGUE_KERNELS <= names, names
    assert not report["absent"], report["absent"]
    for row in report["rows"]:
        label = f"{row['module']}: {row['name']}"
        assert row["ldl"] == 0 and row["stl"] == 0 and row["local_bytes"] == 0, (label, row)
        if row["expect_hgmma"]:
            assert row["hgmma"] > 0, (label, row)
        assert 0 < row["registers"] <= MAX_REGISTERS, (label, row)
        assert row["shared_bytes"] <= MAX_SHARED_BYTES, (label, row)
        assert row["blocks_per_sm"] >= 1, (label, row)
