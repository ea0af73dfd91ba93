"""Shared output helper of the benchmark scripts."""

import json


def write_json(out, path) -> None:
  """Writes ``out`` as indented JSON to ``path`` (nothing when ``path`` is empty)."""
  if path:
    with open(path, "w") as f:
      json.dump(out, f, indent=1)
