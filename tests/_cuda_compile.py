"""Runs compile-for-H100 cases in subprocesses: one crash or hang loses one case only.

A test script defines ``CASES: dict[str, callable]``; each callable compiles
something for the GPU target and returns a JSON-able dict. :func:`run_cases`
runs the named cases in a fresh Python (``JAX_PLATFORMS=cpu``, register
spilling made a compile error), one after the other; when the process dies
(an LLVM fatal error aborts it) or a case runs past its timeout, that case is
recorded as failed and a new process continues with the next one.

Needs the CUDA compile pieces (``pip install -e ".[test]"`` installs them, via
the ``cuda-compile`` extra); :data:`needs_cuda_compile` skips with the reason
where they are missing.
"""

import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
SPILL_FLAG = "--xla_gpu_fail_ptx_compilation_on_register_spilling=true"


def _ptxas() -> str | None:
  spec = importlib.util.find_spec("nvidia")
  for base in (spec.submodule_search_locations if spec else []) or []:
    path = os.path.join(base, "cuda_nvcc", "bin", "ptxas")
    if os.path.exists(path):
      return path
  return shutil.which("ptxas")


def cuda_compile_missing() -> str | None:
  """Why compiling for CUDA is impossible here, or None when it is possible."""
  if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec(
      "jax_plugins.xla_cuda12") is None:
    return "jax-cuda12-plugin is not installed (pip install -e '.[cuda-compile]')"
  if _ptxas() is None:
    return "ptxas not found (pip install nvidia-cuda-nvcc-cu12, in the cuda-compile extra)"
  return None


needs_cuda_compile = pytest.mark.skipif(cuda_compile_missing() is not None,
                                        reason=str(cuda_compile_missing()))

_MAIN = r"""
import json as _json, sys as _sys, time as _time, traceback as _tb
for _name in _sys.argv[1:]:
  print("START " + _name, flush=True)
  _t0 = _time.perf_counter()
  try:
    _res = dict(CASES[_name]())
    _res.update(ok=True)
  except Exception as _e:
    _res = {"ok": False, "error": (type(_e).__name__ + ": " + str(_e))[:3000]}
  _res.update(name=_name, seconds=_time.perf_counter() - _t0)
  print("RESULT" + _json.dumps(_res), flush=True)
"""


def _env(devices: int):
  flags = [SPILL_FLAG] + ([f"--xla_force_host_platform_device_count={devices}"]
                          if devices > 1 else [])
  path = os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), PYTHONPATH=path,
              PYTHONWARNINGS="ignore::DeprecationWarning")


def _reader(stream, q):
  for line in stream:
    q.put(line)
  q.put(None)


def run_cases(script: str, names, *, case_timeout: float = 300, devices: int = 1):
  """Runs ``CASES[name]()`` of ``script`` for each name; returns ``{name: result}``.

  A result has ``ok`` (bool), ``seconds`` and either the case's own keys or
  ``error`` (an exception, a crash with the process' last output, or a timeout).
  """
  results, todo = {}, list(names)
  while todo:
    proc = subprocess.Popen([sys.executable, "-c", script + _MAIN, *todo], cwd=ROOT,
                            env=_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    q = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    current, tail, deadline = None, [], time.monotonic() + case_timeout
    while True:
      try:
        line = q.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        proc.kill()
        results[current or todo[0]] = {"ok": False, "error": f"timed out after {case_timeout}s"}
        break
      if line is None:  # the process ended
        dead = current or next((n for n in todo if n not in results), None)
        if dead is not None and dead not in results:
          results[dead] = {"ok": False, "error": "the process died: " + "".join(tail[-20:])}
        break
      tail = (tail + [line])[-40:]
      if line.startswith("START "):
        current, deadline = line.split()[1], time.monotonic() + case_timeout
      elif line.startswith("RESULT"):
        res = json.loads(line[len("RESULT"):])
        results[res["name"]], current = res, None
    proc.wait()
    todo = [n for n in todo if n not in results]
  return results


def assert_all_ok(results):
  bad = {k: v["error"] for k, v in results.items() if not v["ok"]}
  assert not bad, "\n".join(f"{k}: {v[:1500]}" for k, v in bad.items())
