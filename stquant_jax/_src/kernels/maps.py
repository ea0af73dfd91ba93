"""In-kernel code maps: the library's ``encode``/``decode``, correctly rounded.

The maps are closed-form, so a map is fully identified by the static
``CodeMap(kind, bits, signed, param)``: kernels receive it as a static argument
and no level table is passed as an input (there is none to pass).

The kernels call ``stquant_jax._src.codec.maps.encode``/``decode`` themselves, not a copy,
through :func:`stquant_jax._src.kernels.exact_math.correctly_rounded`, which swaps float32
division and square root for IEEE-rounded versions on the GPU (Triton's default
division is approximate). Whatever the library's maps become, the kernels follow,
as long as the maps keep to element-wise ops that Triton lowers (the lowering
tests check that).
"""

from __future__ import annotations

import functools

from stquant_jax._src.kernels import exact_math
from stquant_jax._src.codec import maps as codec_maps
from stquant_jax._src.codec.maps import CodeMap


def encode(x, cmap: CodeMap, noise=None, *, ieee: bool):
  """``stquant_jax._src.codec.maps.encode`` (float32 -> uint32 codes), kernel-safe;
  ``noise`` as there (None: round to nearest)."""
  if noise is None:
    fn = functools.partial(codec_maps.encode, cmap=cmap)
    return exact_math.correctly_rounded(fn, ieee=ieee)(x)
  fn = lambda x, u: codec_maps.encode(x, cmap, u)
  return exact_math.correctly_rounded(fn, ieee=ieee)(x, noise)


def decode(codes, cmap: CodeMap, *, ieee: bool):
  """``stquant_jax._src.codec.maps.decode`` (uint32 codes -> float32), kernel-safe."""
  fn = functools.partial(codec_maps.decode, cmap=cmap)
  return exact_math.correctly_rounded(fn, ieee=ieee)(codes)
