"""Checkpoints of the full optimizer state with orbax: arrays plus the bit layout.

A :class:`~stquant_jax.QuantizedArray` keeps its bit-width, code map, block
size, shape and dtype as *static* pytree metadata, and an adaptive policy
changes the bit-widths during training (:func:`~stquant_jax.relayout`), so a
fresh ``tx.init(params)`` no longer describes a trained state's layout. A
checkpoint therefore holds two orbax items:

* ``opt_state``: every array of the optimizer state (packed codes, scales,
  float32 moments, the step count, the policy's EMAs and counters, the
  states of the other transforms in the chain), saved with
  ``ocp.args.StandardSave``;
* ``opt_state_layout``: a JSON description of every leaf (tree path, kind,
  shape and dtype; for quantized moments the code map, bits and block size)
  and of the tree structure, saved with ``ocp.args.JsonSave``.

:func:`restore_state` reads the layout first, checks it against the state the
caller passes (``like``, e.g. ``tx.init(params)``), builds the restore target
from the *saved* layout and places the arrays with ``state_shardings`` of
``param_shardings`` when given, else with the shardings of ``like``'s
committed arrays (everything else comes back uncommitted). Any disagreement
other than bit-widths and code maps moved by an adaptive policy raises a
``ValueError`` naming the leaves; nothing is reshaped, cast or dropped.

The layout item (what it records, how it is checked, rebuilding a state from
it) lives in :mod:`stquant_jax._src.checkpoint.layout`; this module does the orbax
I/O and the placement of restored arrays. orbax-checkpoint is imported only
when these functions run.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from stquant_jax._src.checkpoint.layout import (
    check_layout, describe, from_layout, is_python_scalar, layout_and_arrays, moment_paths,
    require_stquant)
from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.core.trees import has_variables, is_nnx_optimizer, unwrap_variables
from stquant_jax._src.distributed import mesh
from stquant_jax._src.distributed.placement import (
    float_sharding_from_blocks, quantized_shardings, rewidth_codes_sharding)
from stquant_jax._src.distributed.state_shardings import state_shardings
from stquant_jax._src.layout.access import write_into
from stquant_jax._src.policy.base import place_like
from stquant_jax._src.state.opt_state import find_states
from stquant_jax._src.state.typed import opt_state_of, typed_tree

_LAYOUT_SUFFIX = "_layout"



def _ocp():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - orbax is an optional dependency
    raise ImportError("stquant_jax checkpoints need orbax-checkpoint "
                      "(pip install orbax-checkpoint)") from e
  return ocp


def _item_names(item: str) -> tuple[str, str]:
  if not isinstance(item, str) or not item:
    raise TypeError(f"item must be a non-empty str, got {item!r}")
  return item, item + _LAYOUT_SUFFIX


def checkpoint_args(opt_state, *, item: str = "opt_state") -> dict[str, Any]:
  """orbax save arguments for ``opt_state``: arrays and layout, as two named items.

  For :class:`orbax.checkpoint.CheckpointManager`, which saves several items
  per step; merge them with your own items and restore with
  :func:`restore_state` (which accepts the manager)::

    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), **sq.checkpoint_args(opt_state)))

  Args:
    opt_state: the whole optimizer state (it must contain a stquant state), or
      a ``flax.nnx.Optimizer`` (its ``opt_state`` is saved).
    item: name of the arrays item; the layout item is ``item + "_layout"``.

  Returns:
    ``{item: ocp.args.StandardSave(arrays), item + "_layout": ocp.args.JsonSave(layout)}``.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> state = sq.adamw(1e-3).init({"w": jnp.zeros((128, 64))})
    >>> sorted(sq.checkpoint_args(state))
    ['opt_state', 'opt_state_layout']
  """
  ocp = _ocp()
  require_stquant(opt_state_of(opt_state), "checkpoint_args", "opt_state")
  name, layout_name = _item_names(item)
  layout, arrays = layout_and_arrays(typed_tree(opt_state), "checkpoint_args")
  if is_nnx_optimizer(opt_state):  # restored into an nnx.Optimizer as its `step`
    layout["nnx_step"] = int(np.asarray(jax.device_get(unwrap_variables(opt_state.step))))
  return {name: ocp.args.StandardSave(arrays), layout_name: ocp.args.JsonSave(layout)}


def _local_path(directory):
  path = os.fspath(directory)
  return path if "://" in path else os.path.abspath(path)


def save_state(directory, opt_state, *, item: str = "opt_state", force: bool = False) -> str:
  """Saves the full optimizer state with orbax: every array plus the bit layout.

  Writes one orbax checkpoint directory with two items: the arrays
  (``item``) and a JSON layout (``item + "_layout"``) recording each leaf's
  tree path, kind (``quantized``, ``float32`` / ``placeholder`` moment, or
  ``array``), shape and dtype, and for quantized moments the code map, bits
  and block size, plus the tree structure. Works for any optimizer state that
  contains a stquant state (``optax.chain``, ``inject_hyperparams``,
  ``MultiSteps`` ...), and for a ``flax.nnx.Optimizer`` or its ``opt_state``
  (saved in the plain form, so it restores into either). Call it outside
  ``jit``; the write is synchronous.

  Args:
    directory: the checkpoint directory to create (local path or orbax-supported URL).
    opt_state: the whole optimizer state.
    item: name of the arrays item (the layout is ``item + "_layout"``).
    force: overwrite an existing directory.

  Returns:
    The checkpoint directory (absolute for local paths).

  Raises:
    FileExistsError: ``directory`` exists and ``force`` is False.
    TypeError: ``opt_state`` holds no stquant state, or a leaf is not an array.

  Example:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> state = sq.adamw(1e-3).init({"w": jnp.zeros((128, 64))})
    >>> path = sq.save_state(os.path.join(tempfile.mkdtemp(), "ckpt"), state)
    >>> sorted(d for d in os.listdir(path) if not d.startswith("_"))
    ['commit_success.txt', 'opt_state', 'opt_state_layout']
  """
  ocp = _ocp()
  args = checkpoint_args(opt_state, item=item)  # checks everything before touching disk
  path = _local_path(directory)
  if not force and os.path.exists(path):
    raise FileExistsError(f"save_state: {path} already exists; pass force=True to overwrite")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, args=ocp.args.Composite(**args), force=force)
  return path


# ---- restore ------------------------------------------------------------------------


def _replicated_on(sharding: Sharding) -> Sharding:
  """Fully replicated over ``sharding``'s mesh (NamedSharding) or devices (other types)."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(), memory_kind=sharding.memory_kind)
  if sharding.is_fully_replicated:
    return sharding
  devices = sorted(sharding.device_set, key=lambda d: d.id)
  return NamedSharding(jax.sharding.Mesh(np.array(devices), ("replica",)), PartitionSpec())


def _placement(x) -> Sharding | None:
  """The sharding of a *committed* array of ``like`` (or of a ShapeDtypeStruct that
  carries a concrete one); None for uncommitted arrays and ShapeDtypeStructs without a
  sharding or with one on an abstract mesh."""
  if isinstance(x, jax.Array):
    return x.sharding if x.committed else None
  if isinstance(x, jax.ShapeDtypeStruct):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and isinstance(s.mesh, jax.sharding.AbstractMesh):
      return None  # eval_shape under jax.set_mesh: a type, not a placement
    return s
  return None


def _like_sharding(entry, field: str, x) -> Sharding | None:
  """Sharding of the saved array ``field`` (``"codes"``, ``"scales"``, or ``""`` for a
  plain leaf) of ``entry``, derived from ``like``'s leaf ``x`` for the same path; None
  when ``like``'s array is not placed (the array then comes back uncommitted)."""
  shape = tuple((entry[field] if field else entry)["shape"])
  if entry["kind"] == "quantized" and not is_quantized(x):  # `like` has a float32 moment there
    s = _placement(x)
    if s is None:
      return None
    if not isinstance(s, NamedSharding):
      return _replicated_on(s)
    codes, scales = quantized_shardings(s, tuple(entry["shape"]),
                                                  entry["scales"]["shape"][0])
    return codes if field == "codes" else scales
  if entry["kind"] != "quantized" and is_quantized(x):  # `like` has a quantized moment there
    s = _placement(x.codes)
    if s is None:
      return None
    return float_sharding_from_blocks(s, shape) or _replicated_on(s)
  ref = getattr(x, field) if field else x
  s = _placement(ref)
  if s is None or tuple(ref.shape) == shape or s.is_fully_replicated:
    return s
  if not isinstance(s, NamedSharding):
    return _replicated_on(s)
  if field == "codes":  # the bits changed: keep the block axis' sharding, never the words'
    s = rewidth_codes_sharding(s)
  return s if mesh.fits(s, shape) else _replicated_on(s)


def _abstract_array(meta):
  return jax.ShapeDtypeStruct(tuple(meta["shape"]), np.dtype(meta["dtype"]))


def _param_layout_shardings(layout, treedef, param_shardings):
  """Per layout entry, ``state_shardings`` of the saved layout: ``(codes, scales)`` for a
  quantized moment, one sharding otherwise."""
  out = state_shardings(
      from_layout(layout, treedef, _abstract_array), param_shardings)
  flat = jax.tree.leaves(out, is_leaf=is_quantized)
  if len(flat) != len(layout["leaves"]):  # pragma: no cover - state_shardings keeps the tree
    raise ValueError("restore_state: state_shardings changed the state's tree")
  return [(s.codes, s.scales) if is_quantized(s) else s for s in flat]


def _targets(layout, like_leaves, given=None):
  """Restore targets from the saved layout, in ``like``'s container types:
  ``(to restore, size-0 arrays to create, keys to return uncommitted)``, the first two
  keyed by array key. A ``like`` leaf that is a numpy array or Python scalar gets one
  back. Any other gets a ``jax.Array``: placed with ``given`` (per entry, from
  ``param_shardings``) when set, else with the sharding derived from ``like``'s committed
  array (:func:`_like_sharding`); without either it is read to the host and returned
  uncommitted on the default device."""
  targets, empty, uncommitted = {}, {}, set()

  def add(meta, ref, i, field, sharding):
    shape, dtype = tuple(meta["shape"]), np.dtype(meta["dtype"])
    if is_python_scalar(ref):
      t = type(ref)(0)
    elif isinstance(ref, (np.ndarray, np.generic)):
      t = np.zeros(shape, dtype)
    elif sharding is None:
      t = np.zeros(shape, dtype)
    else:
      t = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    if meta["key"] is None:
      meta["key"] = f"empty_{i:05d}{field and '_' + field}"
      empty[meta["key"]] = t
    else:
      targets[meta["key"]] = t
    if sharding is None and not isinstance(ref, (np.ndarray, np.generic)) and not (
        is_python_scalar(ref)):
      uncommitted.add(meta["key"])

  for i, (entry, x) in enumerate(zip(layout["leaves"], like_leaves)):
    if entry["kind"] == "quantized":
      for j, field in enumerate(("codes", "scales")):
        sharding = given[i][j] if given is not None else _like_sharding(entry, field, x)
        add(entry[field], getattr(x, field) if is_quantized(x) else x, i, field, sharding)
    else:
      sharding = given[i] if given is not None else _like_sharding(entry, "", x)
      add(entry, x.codes if is_quantized(x) else x, i, "", sharding)
  return targets, empty, uncommitted


def _create_empty(t):
  if isinstance(t, jax.ShapeDtypeStruct):
    return mesh.zeros(t.shape, t.dtype, t.sharding)
  return t  # numpy zeros of size 0


def _check_restored(arrays, targets, where: str):
  for key, t in targets.items():
    a = arrays.get(key)
    want = (np.shape(t), np.asarray(t).dtype if is_python_scalar(t) else np.dtype(t.dtype))
    got = None if a is None else (np.shape(a), np.asarray(a).dtype if is_python_scalar(a)
                                  else np.dtype(a.dtype))
    if got != want or type(a) is not type(t) and not isinstance(t, jax.ShapeDtypeStruct):
      got_s = "nothing" if a is None else f"{type(a).__name__} {got[1]}{list(got[0])}"
      raise ValueError(f"restore_state: array {key} in {where} restored as {got_s}, the layout "
                       f"says {want[1]}{list(want[0])}; the checkpoint is inconsistent")


def restore_state(source, like, *, step: int | None = None, item: str = "opt_state",
                  strict: bool | None = None, param_shardings=None):
  """Restores a state saved by :func:`save_state` (or :func:`checkpoint_args`) in one call.

  ``like`` is the state the caller would start from, typically
  ``tx.init(params)`` (or ``jax.eval_shape(tx.init, params)``). The result has
  ``like``'s tree structure and the *saved* bit layout (bits and code map per
  moment, which an adaptive policy may have changed since ``init``), and the
  saved values of every array (codes, scales, count, policy EMAs ...) bit for
  bit.

  Placement: with ``param_shardings`` (recommended for sharded training),
  every array gets :func:`~stquant_jax.state_shardings` of the restored
  layout, i.e. quantized codes and scales block-sharded like their parameter
  and the count and policy state replicated on the mesh. Without it, an array
  whose ``like`` counterpart is a *committed* ``jax.Array`` (or a
  ``ShapeDtypeStruct`` with a sharding) keeps that sharding; codes whose bits
  changed keep only its block-axis sharding when that divides (never the word
  axis) and are otherwise replicated on the same mesh. Every other ``jax``
  leaf (uncommitted arrays, shardingless ``ShapeDtypeStruct``) comes back
  *uncommitted* on the default device, so a plain ``jax.jit`` step places it
  next to the other arguments. numpy and Python-scalar leaves come back as such.

  Args:
    source: the checkpoint directory, or an ``orbax.checkpoint.CheckpointManager``
      whose steps were saved with :func:`checkpoint_args`.
    like: the current or fresh optimizer state (arrays or ``ShapeDtypeStruct``,
      e.g. :func:`~stquant_jax.abstract_state`), or a ``flax.nnx.Optimizer`` or
      its ``opt_state``: then the restored arrays are written into its
      variables (in place) and ``like`` itself is returned; an optimizer's
      ``step`` is set too (the saved optimizer's, or the stquant state's
      count for a checkpoint of a plain optax state).
    step: the manager's step to restore (default: its latest); only with a manager.
    item: the arrays item name used when saving.
    strict: whether the saved bit layout (bits, map, float32 or quantized per
      moment) must equal ``like``'s. ``None`` (default): required for the
      moments of every stquant state whose policy cannot change bits (its
      :meth:`~stquant_jax.Policy.proposed_bits` is None, e.g. ``FixedBits``), so
      a checkpoint at other bits never silently replaces a fixed bit-width;
      adaptive states (``STQuantPolicy``, any policy that proposes bits) adopt
      the saved bits. ``True``: required everywhere; ``False``: never (adopt
      the checkpoint's bits).
    param_shardings: a pytree like the params of ``jax.sharding.Sharding``
      objects, or the sharded params themselves (as for
      :func:`~stquant_jax.state_shardings`).

  Returns:
    The restored optimizer state.

  Raises:
    FileNotFoundError: no checkpoint at ``source`` (or the manager has no step).
    TypeError: ``like`` holds no stquant state.
    ValueError: the checkpoint does not fit ``like``: other tree paths (params
      or optimizer chain), structure, parameter shapes or dtypes, block size, a
      different code map at equal bits, a layout this version cannot build,
      or another bit layout where ``strict`` requires it. The message lists
      the leaves.

  Example:
    >>> import os, tempfile
    >>> import jax, jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.ones((128, 64))}
    >>> tx = sq.adamw(1e-3, policy=sq.FixedBits(4, 4))
    >>> state = tx.update(params, tx.init(params), params)[1]
    >>> path = sq.save_state(os.path.join(tempfile.mkdtemp(), "ckpt"), state)
    >>> restored = sq.restore_state(path, tx.init(params))
    >>> int(restored[0].count), restored[0].mu["w"].bits, restored[0].count.committed
    (1, 4, False)
    >>> bool((restored[0].mu["w"].codes == state[0].mu["w"].codes).all())
    True
    >>> other = sq.adamw(1e-3, policy=sq.FixedBits(8, 8)).init(params)
    >>> sq.restore_state(path, other)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: restore_state: the checkpoint does not match `like` (...):
      - [0].mu['w']: bit layout differs (fixed policy): saved power-p2-s4, `like` has power-p2-s8
    ...
    >>> sq.restore_state(path, other, strict=False)[0].mu["w"].bits
    4
  """
  ocp = _ocp()
  require_stquant(opt_state_of(like), "restore_state", "like")
  like_given = like
  nnx_target = opt_state_of(like) if has_variables(opt_state_of(like)) else None
  like = typed_tree(like)
  if strict is not None and not isinstance(strict, bool):
    raise TypeError(f"restore_state: strict must be True, False or None, got {strict!r}")
  name, layout_name = _item_names(item)
  like_entries, like_leaves, treedef, like_treedef = describe(like, "restore_state")

  if isinstance(source, ocp.CheckpointManager):
    if step is None:
      step = source.latest_step()
      if step is None:
        raise FileNotFoundError(f"restore_state: the CheckpointManager at {source.directory} "
                                "has no checkpoint")
    where = f"step {step} of {source.directory}"
    if step not in source.all_steps():
      raise FileNotFoundError(f"restore_state: no {where}")
    read = lambda args: source.restore(step, args=ocp.args.Composite(**args))
    ckptr = None
  else:
    if step is not None:
      raise TypeError("restore_state: step is only used with a CheckpointManager")
    path = _local_path(source)
    where = path
    if not os.path.isdir(path) and "://" not in path:
      raise FileNotFoundError(f"restore_state: no checkpoint directory {path}")
    if "://" not in path and not os.path.isdir(os.path.join(path, layout_name)):
      raise FileNotFoundError(
          f"restore_state: {path} has no {layout_name!r} item; was it written by "
          f"stquant_jax.save_state (with item={item!r})?")
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    read = lambda args: ckptr.restore(path, args=ocp.args.Composite(**args))

  try:
    layout = read({layout_name: ocp.args.JsonRestore()})[layout_name]
    check_layout(layout, like_entries, like_treedef, where, strict, moment_paths(like))
    given = (None if param_shardings is None
             else _param_layout_shardings(layout, treedef, param_shardings))
    targets, empty, uncommitted = _targets(layout, like_leaves, given)
    arrays = dict(read({name: ocp.args.StandardRestore(targets)})[name]) if targets else {}
  finally:
    if ckptr is not None:
      ckptr.close()
  _check_restored(arrays, targets, where)
  for key, t in empty.items():
    arrays[key] = _create_empty(t)
  for key in uncommitted:  # host arrays -> uncommitted jax.Arrays on the default device
    arrays[key] = jax.device_put(arrays[key])
  restored = from_layout(layout, treedef, lambda meta: arrays[meta["key"]])
  if nnx_target is None:
    return restored
  write_into(nnx_target, restored)
  if is_nnx_optimizer(like_given):
    _restore_step(like_given, layout, restored)
  return like_given


def _restore_step(optimizer, layout, restored) -> None:
  """Sets ``optimizer.step``: the saved optimizer's step, or, for a checkpoint of a plain
  optax state, the first stquant state's count (the same number unless a wrapper such
  as ``optax.MultiSteps`` counts the updates otherwise)."""
  step = layout.get("nnx_step")
  if step is None:
    step = int(np.asarray(jax.device_get(find_states(restored)[0].count)).reshape(-1)[0])
  old = unwrap_variables(optimizer.step)
  optimizer.step.set_value(place_like(np.asarray(step, np.dtype(old.dtype)), old))
