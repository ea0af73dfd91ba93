"""Small pytree helpers for states that wrappers hand back in another container.

``flax.nnx.Optimizer`` wraps every array of an optimizer state in an
``nnx.Variable`` and, after a step, hands registered dataclasses of ours (a
``QuantizedArray``) back as ``nnx.State`` mappings of their fields (older flax
versions did the same to NamedTuples). Code that reads a field must therefore
accept both forms. flax is never imported here: an object can only be an
``nnx.Variable`` if the program already imported ``flax.nnx``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import jax

_MISSING = object()


def is_mapping(x) -> bool:
  """A mapping (``dict``, ``nnx.State``...), as opposed to a NamedTuple or dataclass."""
  return isinstance(x, Mapping) or (hasattr(x, "keys") and hasattr(x, "__getitem__")
                                    and not hasattr(x, "_fields"))


def field(obj, name: str, default=_MISSING):
  """``obj.name`` for a NamedTuple / dataclass, ``obj[name]`` for a mapping.

  Returns ``default`` when the field is absent (raises without a default).

  Example:
    >>> import collections
    >>> P = collections.namedtuple("P", "proposed")
    >>> field(P(3), "proposed"), field({"proposed": 3}, "proposed"), field((), "proposed", None)
    (3, 3, None)
  """
  if is_mapping(obj):
    if name in obj:
      return obj[name]
  elif hasattr(obj, name):
    return getattr(obj, name)
  if default is _MISSING:
    raise KeyError(f"{type(obj).__name__} has no field {name!r}")
  return default


def path_names(tree, is_leaf=None, separator: str = "/") -> list[str]:
  """``a/b/c``-style names of the leaves of ``tree`` (``<root>`` for a bare leaf)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return [jax.tree_util.keystr(p, simple=True, separator=separator) or "<root>"
          for p, _ in flat]


def _nnx():
  """``flax.nnx`` if the program imported it (then its Variables may be in a state),
  else None; never imports flax itself."""
  return sys.modules.get("flax.nnx")


def is_variable(x) -> bool:
  """Whether ``x`` is a ``flax.nnx.Variable`` (``flax.nnx.Optimizer`` wraps every array
  of the optimizer state in one)."""
  nnx = _nnx()
  return nnx is not None and isinstance(x, nnx.Variable)


def unwrap_variables(tree):
  """``tree`` with every ``flax.nnx.Variable`` replaced by its value (``tree`` itself
  when it holds none).

  Example:
    >>> unwrap_variables({"a": 1, "b": (2, 3)})
    {'a': 1, 'b': (2, 3)}
  """
  if not has_variables(tree):
    return tree  # the same object: callers rely on identity for "nothing changed"
  return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree,
                      is_leaf=is_variable)


def has_variables(tree) -> bool:
  """Whether ``tree`` holds any ``flax.nnx.Variable``."""
  if _nnx() is None:
    return False
  return any(is_variable(x) for x in jax.tree.leaves(tree, is_leaf=is_variable))


def is_nnx_object(x) -> bool:
  """Whether ``x`` is a ``flax.nnx`` object (a module, an optimizer...: ``nnx.Pytree``)."""
  nnx = _nnx()
  return nnx is not None and isinstance(x, getattr(nnx, "Pytree", ()))


def is_nnx_optimizer(x) -> bool:
  """Whether ``x`` is a ``flax.nnx.Optimizer`` (whose ``opt_state`` tools read)."""
  nnx = _nnx()
  cls = getattr(nnx, "Optimizer", None) if nnx is not None else None
  return cls is not None and isinstance(x, cls)
