"""How a value between two code levels is rounded: to the nearest, or stochastically.

Round-to-nearest (RTN) sends ``0.9 * level`` back to the same level whenever the
gap between levels is wider than ~20% of the value, so a moment that only
decays (a quiet element: ``m <- b1 * m``, ``v <- b2 * v``) never moves and its
update never vanishes. *Stochastic* rounding picks the level above with
probability ``(x - lo) / (hi - lo)``, so the stored value equals ``x`` in
expectation (unbiased in the value domain) and every decay reaches the
levels below it.

The random numbers are a pure function of a counter, ``(step, salt, element
index)``, hashed with integer operations only (no PRNG state, no key in the
optimizer state): a run is reproducible, a checkpoint resumes bit-identically,
the jnp path and the Pallas kernel draw the same numbers, and a sharded array
draws the numbers of its global element indices.
"""

from __future__ import annotations

import jax.numpy as jnp

from stquant_jax._src.core.checks import check_choice

ROUNDINGS = ("nearest", "stochastic")

_U32 = jnp.uint32


def check_rounding(rounding, name: str = "rounding") -> tuple[str, str]:
  """``rounding`` as an ``(m, v)`` pair of names from :data:`ROUNDINGS`.

  Example:
    >>> check_rounding("stochastic"), check_rounding(("stochastic", "nearest"))
    (('stochastic', 'stochastic'), ('stochastic', 'nearest'))
  """
  pair = (rounding, rounding) if isinstance(rounding, str) else rounding
  if not isinstance(pair, (tuple, list)) or len(pair) != 2:
    raise TypeError(f"{name}={rounding!r} must be one of {ROUNDINGS} or an (m, v) pair of them")
  for which, r in zip(("m", "v"), pair):
    check_choice(f"{name} for {which}", r, ROUNDINGS)
  return tuple(pair)


def _mix32(x):
  """A 32-bit integer finaliser (``lowbias32``, C. Wellons): every input bit flips
  each output bit with probability ~1/2."""
  x = x ^ (x >> _U32(16))
  x = x * _U32(0x7FEB352D)
  x = x ^ (x >> _U32(15))
  x = x * _U32(0x846CA68B)
  return x ^ (x >> _U32(16))


def uniform_noise(index, step, salt):
  """float32 uniform numbers in ``[0, 1)`` (24-bit), one per element of ``index``.

  Args:
    index: int32/uint32 array: each element's global flat index in its leaf.
    step: int scalar (may be traced): the optimizer step.
    salt: int scalar (may be traced): distinguishes leaves and moments.

  Returns:
    float32 array of ``index``'s shape; a pure function of ``(step, salt, index)``.

  Example:
    >>> import jax.numpy as jnp
    >>> u = uniform_noise(jnp.arange(100000), 7, 3)
    >>> bool((u >= 0).all() & (u < 1).all()), round(float(u.mean()), 2)
    (True, 0.5)
  """
  # The key mixes the scalars once; each element then costs one finaliser.
  key = _mix32(jnp.asarray(step).astype(_U32) * _U32(0x9E3779B9)
               ^ _mix32(jnp.asarray(salt).astype(_U32) + _U32(0x85EBCA6B)))
  r = _mix32(jnp.asarray(index).astype(_U32) * _U32(0x9E3779B9) + key)
  return (r >> _U32(8)).astype(jnp.int32).astype(jnp.float32) * jnp.float32(2.0**-24)
