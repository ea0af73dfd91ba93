"""The bit layout of a checkpointed optimizer state: what is recorded, and how it is checked.

:mod:`stquant_jax._src.checkpoint.orbax_io` writes and reads the arrays with orbax; this
module builds the JSON layout item beside them (one entry per leaf: tree path,
kind, shape and dtype; for quantized moments the code map, bits and block
size; plus the tree structure), checks a saved layout against the state a
caller restores into, and rebuilds the state from a layout and its arrays.
"""

from __future__ import annotations

import collections
import math
import os

import jax
import numpy as np

from stquant_jax._src.codec.blocks import check_block_size
from stquant_jax._src.codec.maps import CodeMap
from stquant_jax._src.codec.quantized import QuantizedArray, is_quantized
from stquant_jax._src.codec.shards import check_shards, num_layout_blocks
from stquant_jax._src.policy.base import policy_of, proposes
from stquant_jax._src.state.opt_state import find_states, is_stquant_state

FORMAT = "stquant_jax.opt_state"
FORMAT_VERSION = 1
_MAX_LISTED = 12

MOMENT_KINDS = ("quantized", "float32", "placeholder")


def keystr(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _skeleton(opt_state):
  """Tree structure with every QuantizedArray (and array) as one leaf."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_quantized)
  return leaves_with_path, treedef


# The recorded structure leaves out ScaleByStquantState.config (static: no arrays): what
# it holds (shapes, block size, maps) is checked leaf by leaf, with clearer messages, and
# checkpoints written before the field existed keep restoring.
_Recorded = collections.namedtuple("ScaleByStquantState", "count mu nu policy_state")


def structure_string(opt_state) -> str:
  """The tree structure as recorded in a layout (stquant configs left out)."""
  fix = lambda x: _Recorded(x.count, x.mu, x.nu, x.policy_state) if is_stquant_state(x) else x
  recorded = jax.tree.map(fix, opt_state, is_leaf=is_stquant_state)
  return str(jax.tree.structure(recorded, is_leaf=is_quantized))


def _adaptive(state) -> bool:
  """Whether a stquant state's policy can change its bits (it proposes a layout:
  :func:`~stquant_jax._src.policy.base.proposes`); ``FixedBits`` cannot."""
  return proposes(policy_of(state), state.policy_state)


def moment_paths(opt_state) -> dict[str, bool]:
  """Paths of the m and v leaves of every stquant state in ``opt_state``, each mapped to
  whether that state's policy is adaptive (see :func:`_adaptive`)."""
  out = {}
  found = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_stquant_state)[0]
  for prefix, st in found:
    if not is_stquant_state(st):
      continue
    adaptive = _adaptive(st)
    for sub, _ in jax.tree_util.tree_flatten_with_path(st, is_leaf=is_quantized)[0]:
      if sub and getattr(sub[0], "name", None) in ("mu", "nu"):
        out[keystr(tuple(prefix) + tuple(sub))] = adaptive
  return out


def require_stquant(opt_state, fn: str, what: str) -> None:
  if isinstance(opt_state, (str, bytes, os.PathLike)):
    raise TypeError(f"{fn}: {what} must be an optimizer state, got the path {opt_state!r} "
                    "(arguments in the wrong order?)")
  if not find_states(opt_state):
    raise TypeError(
        f"{fn}: {what} ({type(opt_state).__name__}) contains no stquant_jax "
        "ScaleByStquantState; pass the whole optimizer state (e.g. tx.init(params) of "
        "stquant_jax.adamw, or the flax.nnx.Optimizer holding it).")


def _dtype_name(dtype) -> str:
  return np.dtype(dtype).name


def is_python_scalar(x) -> bool:
  return isinstance(x, (bool, int, float)) and not isinstance(x, np.generic)


def _array_meta(x, path: str, fn: str) -> tuple[tuple[int, ...], str, str | None]:
  """(shape, dtype name, python type or None) of an array-like leaf."""
  if isinstance(x, jax.core.Tracer):
    raise TypeError(f"{fn}: leaf {path} is a tracer; checkpoints are written outside jit")
  python = None
  if is_python_scalar(x):
    python = type(x).__name__
    x = np.asarray(x)
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise TypeError(f"{fn}: leaf {path} is a {type(x).__name__}, not an array; only arrays "
                    "and Python scalars can be checkpointed")
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
    raise TypeError(f"{fn}: leaf {path} has dtype {x.dtype}, which this helper does not "
                    "checkpoint (e.g. typed PRNG keys)")
  return tuple(int(d) for d in x.shape), _dtype_name(x.dtype), python


def describe(opt_state, fn: str):
  """Per-leaf layout entries (JSON-able), the flat leaves, the treedef and its string."""
  leaves_with_path, treedef = _skeleton(opt_state)
  moments = moment_paths(opt_state)
  entries, leaves = [], []
  for path, x in leaves_with_path:
    name = keystr(path)
    if is_quantized(x):
      cm = x.code_map
      entry = {"path": name, "kind": "quantized", "bits": int(cm.bits),
               "code_map": {"kind": cm.kind, "bits": int(cm.bits), "signed": bool(cm.signed),
                            "param": int(cm.param)},
               "map_name": cm.name, "block_size": int(x.block_size),
               "shape": [int(d) for d in x.shape], "dtype": _dtype_name(x.dtype)}
      if x.shards is not None:  # the per-shard layout (absent: the plain one)
        entry["shards"] = [int(c) for c in x.shards]
      for field in ("codes", "scales"):
        shape, dtype, _ = _array_meta(getattr(x, field), f"{name}.{field}", fn)
        entry[field] = {"shape": list(shape), "dtype": dtype}
    else:
      shape, dtype, python = _array_meta(x, name, fn)
      kind = "array"
      if name in moments:
        kind = "placeholder" if math.prod(shape) == 0 else "float32"
      entry = {"path": name, "kind": kind, "shape": list(shape), "dtype": dtype}
      if python is not None:
        entry["python"] = python
    entries.append(entry)
    leaves.append(x)
  return entries, leaves, treedef, structure_string(opt_state)


def layout_and_arrays(opt_state, fn: str):
  entries, leaves, _, treedef_str = describe(opt_state, fn)
  arrays = {}

  def put(key, meta, value):  # orbax cannot write size-0 arrays; they carry no data
    meta["key"] = key if math.prod(meta["shape"]) else None
    if meta["key"] is not None:
      arrays[key] = value

  for i, (entry, x) in enumerate(zip(entries, leaves)):
    if entry["kind"] == "quantized":
      check_quantized_entry(entry, fn)
      for field in ("codes", "scales"):
        put(f"leaf_{i:05d}_{field}", entry[field], getattr(x, field))
    else:
      put(f"leaf_{i:05d}", entry, x)
  layout = {"format": FORMAT, "version": FORMAT_VERSION, "treedef": treedef_str,
            "leaves": entries}
  return layout, arrays


def _shards(entry):
  return None if entry.get("shards") is None else tuple(entry["shards"])


def check_quantized_entry(entry, fn: str) -> CodeMap:
  """The CodeMap of a quantized entry, after checking that its arrays fit its layout."""
  where = entry["path"]
  try:
    cmap = CodeMap(**entry["code_map"])
    check_block_size(entry["block_size"])
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"{fn}: the layout of {where} cannot be represented by this version of "
                     f"stquant_jax: {e}") from e
  bs = entry["block_size"]
  shards = _shards(entry)
  try:
    check_shards(entry["shape"], shards)
  except ValueError as e:
    raise ValueError(f"{fn}: the layout of {where}: {e}") from e
  nb = num_layout_blocks(entry["shape"], shards, bs)
  want = {"codes": ([nb, bs * cmap.bits // 32], "uint32"), "scales": ([nb], "float32")}
  for field, (shape, dtype) in want.items():
    got = entry[field]
    if list(got["shape"]) != shape or got["dtype"] != dtype:
      raise ValueError(f"{fn}: {where}.{field} is {got['dtype']}{list(got['shape'])}, but "
                       f"{cmap.bits} bits, block_size={bs} and shape {tuple(entry['shape'])} "
                       f"need {dtype}{shape}")
  return cmap


def from_layout(layout, treedef, array):
  """The state a layout describes, with the *saved* bit layout; ``array(meta)`` gives
  each array from its layout entry (``{"shape", "dtype", "key"}``): e.g. a
  ``ShapeDtypeStruct`` for an abstract state, or the restored array."""
  leaves = []
  for entry in layout["leaves"]:
    if entry["kind"] == "quantized":
      leaves.append(QuantizedArray(
          array(entry["codes"]), array(entry["scales"]), CodeMap(**entry["code_map"]),
          entry["block_size"], tuple(entry["shape"]), np.dtype(entry["dtype"]), _shards(entry)))
    else:
      leaves.append(array(entry))
  return jax.tree.unflatten(treedef, leaves)


def _strict_label(strict: bool | None, path: str, moments: dict[str, bool]) -> str | None:
  """Why the bit layout of moment ``path`` must match (a label for the error), or None."""
  if strict is not None:
    return "strict=True" if strict else None
  if path in moments and not moments[path]:
    return "fixed policy"
  return None


def _compare(saved, like, strict: str | None) -> list[str]:
  """Differences between a saved leaf entry and ``like``'s entry for the same path;
  ``strict`` (a label, or None) also requires the same bit layout."""
  p, sk, lk = saved["path"], saved["kind"], like["kind"]
  shape = lambda e: tuple(e["shape"])
  if (sk in MOMENT_KINDS) != (lk in MOMENT_KINDS):
    return [f"{p}: saved as {sk}, but `like` has a {lk} there"]
  if shape(saved) != shape(like) or saved["dtype"] != like["dtype"]:
    what = "parameter" if sk in MOMENT_KINDS else "array"
    return [f"{p}: {what} shape/dtype differs: saved {saved['dtype']}{list(shape(saved))}, "
            f"`like` has {like['dtype']}{list(shape(like))}"]
  if sk == "array":
    return []
  if "placeholder" in (sk, lk) and sk != lk:
    return [f"{p}: saved as {sk} moment, but `like` has a {lk} moment (parameter dtype "
            "changed between integer and floating point?)"]
  out = []
  if sk == lk == "quantized":
    if saved["block_size"] != like["block_size"]:
      out.append(f"{p}: block_size differs: saved {saved['block_size']}, "
                 f"`like` has {like['block_size']}")
    if saved["bits"] == like["bits"] and saved["code_map"] != like["code_map"]:
      out.append(f"{p}: code map for {saved['bits']} bits differs: saved {saved['map_name']}, "
                 f"`like` has {like['map_name']} (a different mu_map / nu_map?)")
    if _shards(saved) != _shards(like):
      out.append(f"{p}: per-shard block layout differs: saved shards={_shards(saved)}, "
                 f"`like` has shards={_shards(like)} (the parameter is sharded differently; "
                 "restore with the sharding it was saved with, then change it)")
  if strict and not out:
    desc = lambda e: e["map_name"] if e["kind"] == "quantized" else e["kind"]
    if desc(saved) != desc(like):
      out.append(f"{p}: bit layout differs ({strict}): saved {desc(saved)}, "
                 f"`like` has {desc(like)}")
  return out


_STRICT_HINT = {
    "strict=True": "pass strict=False (or None) to adopt the checkpoint's bits",
    "fixed policy": ("`like`'s policy never changes bits (no proposal in its policy state, "
                     "e.g. FixedBits), so the checkpoint's bits would be kept for the rest of "
                     "training; build `like` with the policy the checkpoint was written with, "
                     "or pass strict=False to adopt the checkpoint's bits"),
}


def _raise(problems: list[str], where: str, headline: str, hint: str = ""):
  listed = problems[:_MAX_LISTED]
  more = len(problems) - len(listed)
  tail = f"\n  ... and {more} more" if more > 0 else ""
  tail += f"\n{hint}" if hint else ""
  raise ValueError(f"restore_state: {headline} ({where}):\n  - " + "\n  - ".join(listed) + tail)


def check_layout(layout, like_entries, like_treedef: str, where: str, strict: bool | None,
                  moments: dict[str, bool]):
  if not isinstance(layout, dict) or layout.get("format") != FORMAT:
    raise ValueError(f"restore_state: {where} does not hold a stquant_jax optimizer-state "
                     "layout")
  if layout.get("version") != FORMAT_VERSION:
    raise ValueError(f"restore_state: {where} has layout version {layout.get('version')}; "
                     f"this stquant_jax reads version {FORMAT_VERSION}")
  saved = layout["leaves"]
  saved_paths = [e["path"] for e in saved]
  like_paths = [e["path"] for e in like_entries]
  if saved_paths != like_paths:
    sp, lp = set(saved_paths), set(like_paths)
    problems = [f"{p}: in the checkpoint, missing from `like`" for p in saved_paths
                if p not in lp]
    problems += [f"{p}: in `like`, missing from the checkpoint" for p in like_paths
                 if p not in sp]
    if not problems:
      problems = ["the same leaves in a different order"]
    _raise(problems, where, "the optimizer-state tree differs (other params or optimizer?)")
  if layout["treedef"] != like_treedef:
    _raise([f"saved:  {layout['treedef']}", f"`like`: {like_treedef}"], where,
           "the optimizer-state structure differs (a different optimizer chain?)")
  for e in saved:
    if e["kind"] == "quantized":
      e["map_name"] = check_quantized_entry(e, "restore_state").name
  problems, labels = [], set()
  for s, l in zip(saved, like_entries):
    label = _strict_label(strict, s["path"], moments)
    found = _compare(s, l, label)
    problems += found
    if label and any("bit layout differs" in f for f in found):
      labels.add(label)
  saved_bs = {e["block_size"] for e in saved if e["kind"] == "quantized"}
  like_bs = {e["block_size"] for e in like_entries if e["kind"] == "quantized"}
  if saved_bs and like_bs and saved_bs != like_bs and not any("block_size" in p
                                                              for p in problems):
    problems.append(f"block_size differs: saved {sorted(saved_bs)}, `like` has {sorted(like_bs)}")
  if problems:
    _raise(problems, where, "the checkpoint does not match `like`",
           "\n".join(_STRICT_HINT[l] for l in sorted(labels)))
