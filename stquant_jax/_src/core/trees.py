"""Small pytree helpers for states that wrappers hand back in another container.

``flax.nnx.Optimizer`` returns an optimizer state as ``nnx.State``: every
NamedTuple and registered dataclass of ours becomes a mapping of its fields.
Code that reads a field must therefore accept both forms.
"""

from __future__ import annotations

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
