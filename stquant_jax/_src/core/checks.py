"""Argument checks shared by every factory: one family, one message style.

Each check raises ``TypeError`` for a value of the wrong type and
``ValueError`` for one out of range, naming the argument and its value
(``every=0 must be >= 1``), as optax's constructors do.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def is_traced_or_array(value) -> bool:
  """Whether ``value`` is an array (possibly traced), e.g. a hyperparameter under
  ``optax.inject_hyperparams``, whose range cannot be checked at construction."""
  return isinstance(value, (jax.Array, np.ndarray, jax.core.Tracer))


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *,
              allow_none: bool = False, note: str = "") -> None:
  """``value`` is a Python int (not a bool) in ``[lo, hi]`` (either bound optional).

  Example:
    >>> check_int("every", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: every=0 must be >= 1
  """
  if value is None and allow_none:
    return
  if not isinstance(value, int) or isinstance(value, bool):
    raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, "
                    f"got {type(value).__name__}")
  if hi is None and lo is not None and value < lo:
    raise ValueError(f"{name}={value} must be >= {lo}{note}")
  if hi is not None and not ((lo is None or lo <= value) and value <= hi):
    lo_s = "" if lo is None else f"{lo}"
    raise ValueError(f"{name}={value} must be in {lo_s}..{hi}{note}")


def check_number(name: str, value, lo: float = -math.inf, hi: float = math.inf, *,
                 lo_open: bool = False, hi_open: bool = False,
                 traced_ok: bool = False) -> None:
  """``value`` is a real number (not a bool, not NaN) in the given interval.

  ``traced_ok``: arrays and tracers pass unchecked (hyperparameters that
  ``optax.inject_hyperparams`` hands over as traced values).

  Example:
    >>> check_number("b1", 1.0, 0.0, 1.0, hi_open=True)
    Traceback (most recent call last):
    ...
    ValueError: b1=1.0 must be in [0.0, 1.0)
  """
  if traced_ok and is_traced_or_array(value):
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"{name} must be a number, got {type(value).__name__}")
  ok_lo = value > lo if lo_open else value >= lo
  ok_hi = value < hi if hi_open else value <= hi
  if math.isnan(value) or not (ok_lo and ok_hi):
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    raise ValueError(f"{name}={value} must be in {lb}{lo}, {hi}{rb}")


def check_pair(name: str, value, what: str) -> tuple:
  """``value`` is a 2-sequence (tuple or list); returns it as a tuple."""
  if not isinstance(value, (tuple, list)) or len(value) != 2:
    raise TypeError(f"{name}={value!r} must be a {what} pair")
  return tuple(value)


def check_choice(name: str, value, choices: tuple) -> None:
  """``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name}={value!r} must be one of {choices}")
