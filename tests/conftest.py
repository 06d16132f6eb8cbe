"""Test set-up shared by every test module.

Without a CUDA device the Triton kernels run under Triton's interpreter: TRITON_INTERPRET must be set
before Triton decorates any kernel, i.e. before sod_kernels' Triton modules are imported, so it is set
here, at collection time.  Tests that compile kernels for a real GPU target (codegen) run in a
subprocess without the variable.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CPU epilogues run eagerly in the suite (compiling costs seconds per variant); the tests that compile
# them (tests/sod_kernels/test_cpu_backends.py) switch it on for themselves.
os.environ.setdefault("SOD_KERNELS_CPU_COMPILE", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests: fresh random inputs each run, no deadline (the interpreter is slow and CI has 2 cores).
settings.register_profile("default", deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=200, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

HAS_CUDA = _HAS_CUDA
