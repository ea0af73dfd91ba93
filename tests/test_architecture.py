"""Imports run one way: each layer of ``stquant_jax/_src`` imports only the layers below it.

The layers (bottom to top) are listed in ``LAYERS`` and drawn in
``stquant_jax/_src/__init__.py`` and ``docs/design.md``. Checked on the source
text (an AST walk, no imports executed):

* a module of layer ``k`` imports modules of layers ``<= k`` only;
* the library never imports the public ``stquant_jax`` namespace from inside
  ``_src``, nor ``pallas_kernels``, ``experiments``, ``benchmarks`` or ``tests``;
* ``pallas_kernels`` (the kernels' public face) imports only ``_src.kernels``;
* no project import hides inside a function (that is how cycles hide);
* the module graph has no cycle.

The checker is tested on small synthetic trees too, so a back-edge is known to fail.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("core", "codec", "state", "distributed", "update", "kernels", "policy",
          "transform", "layout", "checkpoint", "stepping")
PROJECT = ("stquant_jax", "pallas_kernels", "experiments", "benchmarks", "tests")
SRC = "stquant_jax._src"


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def library_sources() -> dict[str, str]:
  files = sorted((ROOT / "stquant_jax").rglob("*.py")) + sorted(
      (ROOT / "pallas_kernels").rglob("*.py"))
  return {module_name(f): f.read_text() for f in files}


def _imports(source: str):
  """``(imported name, line, at module level)`` for each import in ``source``;
  relative imports come back as ``"."``-prefixed names (refused by the rules)."""
  tree = ast.parse(source)
  top = {id(n) for n in tree.body}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno, id(node) in top) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = "." * node.level + (node.module or "")
      # "from pkg import mod" imports the submodule pkg.mod when it is one
      out += [(f"{base}.{a.name}", node.lineno, id(node) in top) for a in node.names]
      out.append((base, node.lineno, id(node) in top))
  return out


def _resolve(target: str, modules) -> str | None:
  """The longest known module that ``target`` names; else the name itself inside
  ``_src`` (its layer still counts), the top package for other project names, or
  None (a third-party import)."""
  parts = target.split(".")
  for i in range(len(parts), 0, -1):
    cand = ".".join(parts[:i])
    if cand in modules:
      return cand
  if target.startswith(SRC + "."):
    return target
  return parts[0] if parts[0] in PROJECT else None


def _layer(module: str) -> str | None:
  if module == SRC or not module.startswith(SRC + "."):
    return None
  return module[len(SRC) + 1:].split(".")[0]


def violations(sources: dict[str, str]) -> list[str]:
  """Every broken rule in a tree of ``{module name: source}``."""
  problems, graph = [], {m: set() for m in sources}
  for mod, src in sources.items():
    layer = _layer(mod)
    if mod.startswith(SRC + ".") and layer not in LAYERS:
      problems.append(f"{mod}: package {layer!r} is not in LAYERS; place it in a layer")
      continue
    for target, line, at_top in _imports(src):
      if target.startswith("."):
        problems.append(f"{mod}:{line}: relative import {target}; import absolutely")
        continue
      dep = _resolve(target, sources)
      if dep is None or dep == mod:
        continue
      where = f"{mod}:{line} imports {dep}"
      if not at_top:
        problems.append(f"{where} inside a function (lazy imports hide cycles)")
      if dep in sources:
        graph[mod].add(dep)
      if mod.startswith(SRC):
        if not dep.startswith(SRC + "."):
          problems.append(f"{where}: _src imports only _src")
        elif LAYERS.index(_layer(dep)) > LAYERS.index(layer):
          problems.append(f"{where}: layer {layer} may not import the higher layer "
                          f"{_layer(dep)}")
      elif mod.startswith("pallas_kernels") and not dep.startswith(SRC + ".kernels"):
        problems.append(f"{where}: pallas_kernels re-exports _src.kernels only")
      elif mod.startswith("stquant_jax") and not dep.startswith(SRC):
        problems.append(f"{where}: the public API re-exports from _src only")
  problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
  return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected knot found by depth-first search."""
  state, stack, found = {}, [], []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for d in sorted(graph.get(n, ())):
      if state.get(d) == 1:
        found.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[n] = 2

  for n in sorted(graph):
    if n not in state:
      visit(n)
  return found


def test_library_imports_run_one_way():
  sources = library_sources()
  assert any(m.startswith(SRC + ".transform") for m in sources)  # found the tree
  assert violations(sources) == []


def test_every_src_package_is_a_declared_layer():
  found = {p.name for p in (ROOT / "stquant_jax" / "_src").iterdir()
           if p.is_dir() and (p / "__init__.py").exists()}
  assert found == set(LAYERS)


def test_layer_table_in_docs_matches():
  """The diagram in docs/design.md and _src/__init__.py lists the layers in this order."""
  for path in (ROOT / "docs" / "design.md", ROOT / "stquant_jax" / "_src" / "__init__.py"):
    text = path.read_text()
    positions = [text.find(f"``{l}``") if path.suffix == ".py" else text.find(f"`{l}`")
                 for l in LAYERS]
    assert -1 not in positions, (path, dict(zip(LAYERS, positions)))
    assert positions == sorted(positions, reverse=True), path  # drawn top layer first


_BASE = {
    "stquant_jax._src.codec.maps": "import jax\n",
    "stquant_jax._src.transform.alias": "from stquant_jax._src.codec import maps\n",
}


@pytest.mark.parametrize("module,source,expect", [
    ("stquant_jax._src.codec.blocks", "from stquant_jax._src.transform import alias\n",
     "may not import the higher layer transform"),
    ("stquant_jax._src.codec.blocks",
     "def f():\n  from stquant_jax._src.codec import maps\n", "inside a function"),
    ("stquant_jax._src.codec.blocks", "import stquant_jax\n", "_src imports only _src"),
    ("stquant_jax._src.kernels.k", "import pallas_kernels\n", "_src imports only _src"),
    ("stquant_jax._src.update.adam", "from experiments import train\n",
     "_src imports only _src"),
    ("stquant_jax._src.tools.x", "import jax\n", "not in LAYERS"),
    ("stquant_jax._src.codec.blocks", "from . import maps\n", "relative import"),
    ("pallas_kernels", "from stquant_jax._src.codec import maps\n",
     "re-exports _src.kernels only"),
])
def test_checker_catches(module, source, expect):
  """Each rule fails on a tree that breaks it (and the base tree alone is clean)."""
  assert violations(_BASE) == []
  found = violations({**_BASE, module: source})
  assert any(expect in p for p in found), found


def test_checker_catches_a_cycle_within_a_layer():
  tree = {"stquant_jax._src.codec.a": "from stquant_jax._src.codec import b\n",
          "stquant_jax._src.codec.b": "from stquant_jax._src.codec import a\n"}
  assert any("import cycle" in p for p in violations(tree))
