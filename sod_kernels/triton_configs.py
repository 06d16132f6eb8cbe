"""Per-problem-size launch configurations of the divergence kernels (a small table, no autotuning).

Autotuning is avoided on purpose: the forward and backward are launched once per training step with
shapes that change every step (the number of distilled rows), and each autotune pass would re-time the
whole sweep.  The table below is keyed on what matters for the kernels' codegen:

- dtype and GPU generation.  16-bit inputs on Hopper (sm_90+) use warpgroup MMA (HGMMA) on 128 x 128
  tiles over 8 warps: two fp32 logit accumulators live at once = 128 registers per thread, no spills.
  On Ampere/Ada (sm_8x, mma.sync keeps operands in registers too) 128 x 128 spills, so 128 x 64 tiles
  with BLOCK_K = 32 (no spills, 57 KB of shared memory in the backward: fits sm_86's ~100 KB).
  float32 inputs run ``tl.dot`` in "ieee" precision (exact fp32 on FMA units, no tf32 rounding: SPEC
  section 9's 1e-5), whose register-held operands need smaller 32 x 64 tiles.
- few rows (``Na <= 64``, Hopper): BLOCK_M = 64 with 4 warps (one warpgroup), so a tiny batch wastes less.
- the Triton interpreter (CPU tests): tiny blocks (16 x 32 x 16) so that test sizes of a few hundred
  columns still exercise several tiles, splits and masked edges.

Every entry was compiled for its target (``benchmarks/codegen.py`` and ad-hoc sm_80/sm_86 builds):
no local-memory spills.

The number of vocabulary splits of the forward is chosen so that ``row blocks x splits`` makes
``FORWARD_WAVES`` waves over the GPU's SMs (``INTERPRETER_TILES_PER_SPLIT`` tiles per split under the
interpreter), and every split is non-empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch options of one divergence kernel launch."""

    block_m: int
    block_v: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


HALF_CONFIG = KernelConfig(block_m=128, block_v=128, block_k=64, group_m=8, num_warps=8, num_stages=3)
HALF_SMALL_CONFIG = KernelConfig(block_m=64, block_v=128, block_k=64, group_m=8, num_warps=4, num_stages=3)
AMPERE_HALF_CONFIG = KernelConfig(block_m=128, block_v=64, block_k=32, group_m=8, num_warps=8, num_stages=3)
FP32_CONFIG = KernelConfig(block_m=32, block_v=64, block_k=32, group_m=8, num_warps=4, num_stages=2)
INTERPRETER_CONFIG = KernelConfig(block_m=16, block_v=32, block_k=16, group_m=2, num_warps=4, num_stages=1)
SMALL_ROWS = 64
HOPPER = (9, 0)
FORWARD_WAVES = 4
INTERPRETER_TILES_PER_SPLIT = 2
DEFAULT_SM_COUNT = 132
# Reverse-KL gradient filtering for 16-bit inputs: a backward tile whose student probabilities are all below
# this is skipped (see kl_backward's docstring for the error bound).  float32 inputs are never filtered.
GRADIENT_FILTER_16BIT = 2.0 ** -20

# The headline size of PERF.md, whose configs benchmarks/codegen.py compiles.
HEADLINE = dict(n_rows=16384, hs=1024, ht=2560, vocab=151936, dtype=torch.bfloat16)


def kernel_config(n_rows: int, dtype: torch.dtype, *, interpret: bool, capability: tuple[int, int] | None = None
                  ) -> KernelConfig:
    """The config for ``n_rows`` distilled rows of ``dtype`` inputs (forward and backward share it).

    ``capability``: the CUDA device's (major, minor); None means Hopper-class.
    """
    if interpret:
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return FP32_CONFIG
    if capability is not None and tuple(capability) < HOPPER:
        return AMPERE_HALF_CONFIG
    return HALF_SMALL_CONFIG if n_rows <= SMALL_ROWS else HALF_CONFIG


def forward_splits(n_rows: int, vocab: int, cfg: KernelConfig, *, interpret: bool, sm_count: int | None = None
                   ) -> tuple[int, int]:
    """``(num_splits, tiles_per_split)`` of the forward's vocabulary split; every split is non-empty."""
    num_tiles = -(-vocab // cfg.block_v)
    if interpret:
        tiles_per_split = min(INTERPRETER_TILES_PER_SPLIT, num_tiles)
    else:
        row_blocks = -(-n_rows // cfg.block_m)
        wanted = -(-FORWARD_WAVES * (sm_count or DEFAULT_SM_COUNT) // row_blocks)
        splits = min(max(wanted, 1), num_tiles)
        tiles_per_split = -(-num_tiles // splits)
    return -(-num_tiles // tiles_per_split), tiles_per_split


def headline_launch() -> tuple[KernelConfig, int, int]:
    """``(config, num_splits, tiles_per_split)`` used on an H100 at the headline size (codegen checks)."""
    h = HEADLINE
    cfg = kernel_config(h["n_rows"], h["dtype"], interpret=False, capability=(9, 0))
    splits, tiles = forward_splits(h["n_rows"], h["vocab"], cfg, interpret=False, sm_count=DEFAULT_SM_COUNT)
    return cfg, splits, tiles


def block_constexprs(cfg: KernelConfig) -> dict:
    """The block-size constexprs every divergence kernel takes."""
    return {"BLOCK_M": cfg.block_m, "BLOCK_V": cfg.block_v, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m}
