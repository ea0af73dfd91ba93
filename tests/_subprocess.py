"""Runs a test script in a fresh Python with N forced CPU devices.

The device count must be set (``XLA_FLAGS``) before jax is imported, so
multi-device tests run their script in a subprocess. The script reports by
printing one line ``RESULT<json>``.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, *args: str, devices: int = 8, timeout: int = 600) -> str:
  """Runs ``script`` (source text) with ``devices`` CPU devices; returns its stdout.

  Fails the calling test with the script's stderr tail when it exits non-zero.
  """
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
  return proc.stdout


def run_json(script: str, *args: str, devices: int = 8, timeout: int = 600):
  """:func:`run_script`, then the JSON of the script's last ``RESULT`` line."""
  lines = [l for l in run_script(script, *args, devices=devices, timeout=timeout).splitlines()
           if l.startswith("RESULT")]
  assert lines, "the script printed no RESULT line"
  return json.loads(lines[-1][len("RESULT"):])
