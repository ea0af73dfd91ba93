"""Tile sizes of the Pallas kernels, in one small frozen dataclass.

Every kernel works on the library's 2-D block layout: row ``i`` of a
``[n_blocks, block_size]`` matrix is quantization block ``i``, and one program
(one Triton CTA) handles ``blocks_per_program`` consecutive rows.

Grid choice: the grid is ``cdiv(n_blocks, rows)`` with no padding of the state
arrays (padding the packed codes would cost a copy and break the in-place
update). The last program may run past the end: the Pallas Triton lowering
masks out-of-bounds loads and stores of a ``BlockSpec`` automatically, and
interpret mode pads with NaN and drops the extra rows. Blocks are independent
rows, so whatever an out-of-bounds row holds never reaches a real row.
"""

from __future__ import annotations

import dataclasses

import jax

import jax.experimental.pallas as pl
from jax.experimental.pallas import triton as plgpu


def _is_pow2(n: int) -> bool:
  return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Launch configuration of a kernel.

  Attributes:
    blocks_per_program: quantization blocks (rows) per program; a power of two
      (Triton tensors must have power-of-two sizes). Clamped down for small
      arrays so a one-block leaf does not run a 16-row tile.
    num_warps: warps per program (Triton ``num_warps``). 8 by default: with 4,
      the 7-bit stochastic-rounding update spills registers on an H100 (compiled
      with spilling as an error, ``tests/test_cuda_compile.py``); 8 warps hold
      16 x 128 values at 8 per thread with no spill at any width.
    num_stages: software-pipelining stages (Triton ``num_stages``); the kernels
      have no inner loop, so 1 is enough.

  Example:
    >>> from pallas_kernels import Tiling
    >>> t = Tiling(blocks_per_program=8)
    >>> t.rows(3), t.grid(3), t.rows(100), t.grid(100)
    (4, (1,), 8, (13,))
  """

  blocks_per_program: int = 16
  num_warps: int = 8
  num_stages: int = 1

  def __post_init__(self):
    if not _is_pow2(self.blocks_per_program):
      raise ValueError(
          f"blocks_per_program={self.blocks_per_program} must be a power of two")
    if not _is_pow2(self.num_warps):
      raise ValueError(f"num_warps={self.num_warps} must be a power of two")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages} must be a positive int")

  def rows(self, n_blocks: int) -> int:
    """Rows per program for an array of ``n_blocks`` blocks (a power of two)."""
    return min(self.blocks_per_program, next_pow2(max(n_blocks, 1)))

  def grid(self, n_blocks: int) -> tuple[int]:
    """One-axis grid covering ``n_blocks`` rows (the last program may be partial)."""
    return (pl.cdiv(n_blocks, self.rows(n_blocks)),)

  def compiler_params(self) -> plgpu.CompilerParams:
    """Explicit Triton backend parameters (jax otherwise picks Mosaic GPU)."""
    return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


DEFAULT_TILING = Tiling()


def check_block_size(block_size: int) -> None:
  """The kernels need ``block_size`` to be a power of two >= 32 (Triton tensor sizes)."""
  if not _is_pow2(block_size) or block_size < 32:
    raise ValueError(
        f"{block_size=}: the Pallas kernels need a power-of-two block size >= 32; "
        "use the jnp path for other block sizes")


def out_like(*inputs, shape, dtype) -> jax.ShapeDtypeStruct:
  """A ``pallas_call`` output shape that varies over the same manual mesh axes as
  ``inputs`` (the one that varies over most of them).

  Inside ``jax.shard_map(..., check_vma=True)`` a ``pallas_call`` needs to know how
  its outputs vary across the mesh; outside it this is a plain
  ``ShapeDtypeStruct``. The platform dispatch traces the GPU kernel on every
  platform, so this matters on CPU too.
  """
  types = [getattr(jax.typeof(x), "manual_axis_type", None) for x in inputs]
  types = [t for t in types if t is not None]
  if not types:
    return jax.ShapeDtypeStruct(shape, dtype)
  widest = max(types, key=lambda t: len(getattr(t, "varying", ())))
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=widest)
