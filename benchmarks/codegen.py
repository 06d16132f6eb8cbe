"""What the Triton compiler makes of sod_kernels' kernels for a Hopper GPU, without a GPU.

Run as ``python -m benchmarks.codegen`` (``make codegen``).  For every kernel spec it compiles the kernel
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, disassembles the cubin with
the ``cuobjdump`` bundled in Triton's wheel (``triton/backends/nvidia/bin/``) and reports, per kernel and
config: registers per thread, shared memory, local-memory spill instructions (``LDL``/``STL`` count and
the cubin's LOCAL bytes), warpgroup MMA instructions (``HGMMA`` count) and the implied occupancy.  The
Markdown table is printed and written to ``benchmarks/results/codegen.md``; ``--json`` prints the rows
as JSON instead (what ``tests/sod_kernels/core/test_codegen.py`` reads).

It must run WITHOUT ``TRITON_INTERPRET`` in the environment: that variable turns ``@triton.jit``
functions into interpreted functions that cannot be compiled, so this module refuses to run under it
(tests call it in a subprocess with the variable removed).

Spec format (how a kernel module takes part)
--------------------------------------------
Every Triton kernel module of ``sod_kernels`` listed in :data:`KERNEL_MODULES` defines

    def codegen_specs() -> list[dict]:

returning one dict per (kernel, config) to compile, with the configs used at the headline size
(N=16384, Hs=1024, Ht=2560, V=151936, bf16).  Keys:

- ``"name"`` (str): a unique label for the table, e.g. ``"kl_logit_grad_kernel[reverse bv2048]"``.
- ``"fn"``: the ``@triton.jit`` function itself.
- ``"signature"`` (dict str -> str): the Triton type of every *runtime* (non-constexpr) argument of
  ``fn``, e.g. ``{"hidden_ptr": "*bf16", "row_index_ptr": "*i64", "n_rows": "i32", "inv_temp": "fp32"}``.
  Pointer types are ``"*" + dtype`` with dtype in ``bf16, fp16, fp32, i32, i64``; scalars ``"i32"``,
  ``"i64"``, ``"fp32"``.
- ``"constexprs"`` (dict str -> value): the value of every ``tl.constexpr`` argument (block sizes,
  switches).  They are added to the signature as ``"constexpr"`` automatically.
- ``"num_warps"`` (int), ``"num_stages"`` (int): launch options, as passed at the headline size.
- ``"divisible_by_16"`` (list of str, optional): integer arguments whose value is a multiple of 16 at the
  headline size (strides, hidden sizes), so the compiler gets the same ``tt.divisibility`` hints the JIT
  gives them at launch.  Pointer arguments always get the hint (torch allocations are 16-byte aligned).
- ``"expect_hgmma"`` (bool, optional, default True): whether the kernel's matrix products must become
  ``HGMMA`` instructions (set False for kernels without ``tl.dot``, such as a small merge kernel).

Every argument of ``fn`` must appear in exactly one of ``signature`` and ``constexprs``.  A module in
:data:`KERNEL_MODULES` whose file exists is imported, and any error it raises is an error here (a
module that exists is never skipped silently); a listed module whose file does not exist is reported
as absent.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL_MODULES = (
    "sod_kernels.core.fold_kernels",
    "sod_kernels.dense.kernels",
    "sod_kernels.dense.jsd_kernels",
    "sod_kernels.dense.dual_gemm_kernels",
    "sod_kernels.logprobs.kernels",
    "sod_kernels.sparse.kernels",
)

HOPPER_TARGET = ("cuda", 90, 32)
# H100 (sm_90) per-SM resources used for the implied occupancy.
REGISTERS_PER_SM = 65536
SHARED_MEMORY_PER_SM = 228 * 1024
SHARED_MEMORY_RESERVED_PER_BLOCK = 1024
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REGISTER_ALLOCATION_UNIT = 256  # registers are allocated per warp in units of 256

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "codegen.md"


def _triton_bin(tool: str) -> str:
    import triton

    path = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / tool
    if not path.exists():
        raise FileNotFoundError(f"{tool} is not bundled with this Triton wheel (looked for {path})")
    return str(path)


def discover_specs(modules=KERNEL_MODULES) -> tuple[list[dict], list[str]]:
    """Import each listed module that exists and collect its ``codegen_specs()``.

    Returns ``(specs, absent)`` where ``absent`` lists the modules whose file does not exist.
    """
    specs, absent = [], []
    for name in modules:
        if importlib.util.find_spec(name) is None:
            absent.append(name)
            continue
        module = importlib.import_module(name)
        if not hasattr(module, "codegen_specs"):
            raise AttributeError(f"{name} is a Triton kernel module listed in benchmarks.codegen.KERNEL_MODULES "
                                 "but defines no codegen_specs()")
        for spec in module.codegen_specs():
            specs.append(dict(spec, module=name))
    return specs, absent


def compile_spec(spec: dict):
    """Compile one spec for sm_90; returns the compiled kernel (with ``asm["cubin"]``)."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = spec["fn"]
    constexprs = dict(spec.get("constexprs", {}))
    signature = dict(spec["signature"])
    missing = [a for a in fn.arg_names if a not in signature and a not in constexprs]
    extra = [a for a in list(signature) + list(constexprs) if a not in fn.arg_names]
    if missing or extra:
        raise ValueError(f"codegen spec {spec['name']!r}: arguments missing from signature/constexprs {missing}, "
                         f"unknown arguments {extra}")
    full_signature = {a: (signature[a] if a in signature else "constexpr") for a in fn.arg_names}
    aligned = set(spec.get("divisible_by_16", ())) | {a for a, t in signature.items() if t.startswith("*")}
    unknown = aligned - set(signature)
    if unknown:
        raise ValueError(f"codegen spec {spec['name']!r}: divisible_by_16 names unknown arguments {sorted(unknown)}")
    hint = BaseBackend.parse_attr("D")  # the JIT's "divisible by 16" specialization
    attrs = {(fn.arg_names.index(a),): hint for a in aligned}
    source = ASTSource(fn, full_signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget(*HOPPER_TARGET),
                          options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})


def inspect_cubin(cubin: bytes) -> dict:
    """Registers, local memory, LDL/STL and HGMMA counts of a cubin, from the bundled cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([_triton_bin("cuobjdump"), "-sass", str(path)], check=True, capture_output=True,
                              text=True).stdout
        usage = subprocess.run([_triton_bin("cuobjdump"), "-res-usage", str(path)], check=True, capture_output=True,
                               text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    opcodes = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, flags=re.M)
    base = [op.split(".")[0] for op in opcodes]
    return {
        "registers": int(regs.group(1)) if regs else None,
        "local_bytes": int(local.group(1)) if local else None,
        "ldl": base.count("LDL"),
        "stl": base.count("STL"),
        "hgmma": base.count("HGMMA"),
        "instructions": len(base),
    }


def implied_occupancy(registers: int, shared_bytes: int, num_warps: int) -> tuple[int, int]:
    """(blocks per SM, warps per SM) on sm_90 from registers/thread, shared memory and warps."""
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_regs = REGISTERS_PER_SM // max(per_warp * num_warps, 1)
    by_smem = SHARED_MEMORY_PER_SM // max(shared_bytes + SHARED_MEMORY_RESERVED_PER_BLOCK, 1)
    by_warps = MAX_WARPS_PER_SM // num_warps
    blocks = max(min(by_regs, by_smem, by_warps, MAX_BLOCKS_PER_SM), 0)
    return blocks, blocks * num_warps


def analyse(spec: dict) -> dict:
    kernel = compile_spec(spec)
    info = inspect_cubin(kernel.asm["cubin"])
    shared = int(kernel.metadata.shared)
    blocks, warps = implied_occupancy(info["registers"] or 0, shared, spec["num_warps"])
    # Block sizes and other numeric constexprs; boolean switches and strings are left to the spec's name.
    config = ", ".join(f"{k}={v}" for k, v in spec.get("constexprs", {}).items()
                       if isinstance(v, int) and not isinstance(v, bool))
    return {
        "module": spec["module"], "name": spec["name"], "config": config, "num_warps": spec["num_warps"],
        "num_stages": spec["num_stages"], "shared_bytes": shared, "blocks_per_sm": blocks, "warps_per_sm": warps,
        "expect_hgmma": bool(spec.get("expect_hgmma", True)), **info,
    }


def _commit() -> str:
    """The sources' commit (``SOD_GIT_COMMIT`` if set, else ``git rev-parse --short HEAD``; "unknown" without git)."""
    sha = os.environ.get("SOD_GIT_COMMIT")
    if sha:
        return sha
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(rows: list[dict], absent: list[str]) -> str:
    import triton

    lines = [
        "# Codegen for sm_90 (compiled without a GPU)",
        "",
        f"Triton {triton.__version__}, target GPUTarget{HOPPER_TARGET}, headline-size configs "
        f"(N=16384, Hs=1024, Ht=2560, V=151936, bf16); commit {_commit()}. Produced by `python -m benchmarks.codegen`.",
        "",
        "| kernel | config | warps | stages | regs/thread | shared mem (KiB) | spills (LDL/STL, local bytes) "
        "| HGMMA | occupancy (blocks, warps / SM) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['config']} | {r['num_warps']} | {r['num_stages']} | {r['registers']} "
                     f"| {r['shared_bytes'] / 1024:.1f} | {r['ldl']}/{r['stl']}, {r['local_bytes']} | {r['hgmma']} "
                     f"| {r['blocks_per_sm']}, {r['warps_per_sm']} |")
    if absent:
        lines += ["", "Modules listed but not present: " + ", ".join(f"`{m}`" for m in absent) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON, write nothing")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="where to write the Markdown table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("benchmarks.codegen needs real JIT functions: unset TRITON_INTERPRET and run it again")
    specs, absent = discover_specs()
    rows = [analyse(spec) for spec in specs]
    if args.json:
        print(json.dumps({"rows": rows, "absent": absent}))
        return 0
    table = markdown(rows, absent)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
