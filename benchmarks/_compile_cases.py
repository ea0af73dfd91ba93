"""Runs compile cases in subprocesses: one crash or hang loses one case only.

A script defines ``CASES: dict[str, callable]``; each callable compiles
something (for a GPU target, on this CPU) and returns a JSON-able dict.
:func:`run_cases` runs the named cases in a fresh Python (``JAX_PLATFORMS=cpu``),
one after the other; when the process dies (an LLVM fatal error aborts it) or a
case runs past its timeout, that case is recorded as failed and a new process
continues with the next one. Register spills: every function ``ptxas`` reports
spilling is listed in the case's ``spills`` (XLA's log), and with
``fail_on_spill`` any spill is a compile error. Used by
``tests/test_cuda_compile*.py`` and ``benchmarks/h100_memory.py``.
"""

import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time

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


_SPILL = re.compile(r"spilled to local memory in function '([^']+)', (\d+) bytes spill stores")
# Our Pallas kernels are named stquant_* (pallas_call's name=); the rest is XLA's codegen.
OUR_KERNELS = "stquant_"


def _env(devices: int, xla_flags=(), fail_on_spill=True):
  flags = ([SPILL_FLAG] if fail_on_spill else []) + list(xla_flags) + (
      [f"--xla_force_host_platform_device_count={devices}"] if devices > 1 else [])
  path = os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), PYTHONPATH=path,
              PYTHONWARNINGS="ignore::DeprecationWarning", TF_CPP_MIN_LOG_LEVEL="0")


def _reader(stream, q):
  for line in stream:
    q.put(line)
  q.put(None)


def run_cases(script: str, names, *, case_timeout: float = 300, devices: int = 1,
              xla_flags=(), fail_on_spill: bool = True):
  """Runs ``CASES[name]()`` of ``script`` for each name; returns ``{name: result}``.

  A result has ``ok`` (bool), ``seconds`` and either the case's own keys or
  ``error`` (an exception, a crash with the process' last output, or a timeout).
  ``devices`` > 1 forces that many CPU devices; ``xla_flags`` are added to
  ``XLA_FLAGS``. ``spills`` lists ``[function, bytes]`` for every spilling function
  (with ``fail_on_spill`` the compile also fails).
  """
  results, todo = {}, list(names)
  while todo:
    proc = subprocess.Popen([sys.executable, "-c", script + _MAIN, *todo], cwd=ROOT,
                            env=_env(devices, xla_flags, fail_on_spill), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    q = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    current, tail, deadline = None, [], time.monotonic() + case_timeout
    spills = []
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
      if not line.startswith(("I1", "I0", "W1", "W0")) or "spill" in line:
        tail = (tail + [line])[-40:]  # INFO/WARNING log lines are many; keep the rest
      if (m := _SPILL.search(line)):
        spills.append([m.group(1), int(m.group(2))])
      if line.startswith("START "):
        current, deadline = line.split()[1], time.monotonic() + case_timeout
        spills = []
      elif line.startswith("RESULT"):
        res = json.loads(line[len("RESULT"):])
        res["spills"] = spills
        results[res["name"]], current = res, None
    proc.wait()
    todo = [n for n in todo if n not in results]
  return results
