"""Shared output helper of the benchmark scripts."""

import json


def write_json(out, path) -> None:
  """Writes ``out`` as indented JSON to ``path`` (nothing when ``path`` is empty)."""
  if path:
    with open(path, "w") as f:
      json.dump(out, f, indent=1)


def print_and_write(out, table: str, json_path=None, md_path=None) -> None:
  """Prints ``out`` (JSON) and the Markdown ``table``; writes each where a path is given."""
  print(json.dumps(out, indent=1))
  print(table)
  write_json(out, json_path)
  if md_path:
    with open(md_path, "w") as f:
      f.write(table)
