"""Test configuration: CPU only, float32 by default, a few virtual devices.

Multi-device tests (8 devices) run in subprocesses that set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax;
see ``tests/_subprocess.py``.

Under ``pytest -n N`` (pytest-xdist), the default ``--dist load`` runs as
``--dist loadfile``: a file's tests stay on one worker, so a module-scoped
fixture (most of them start a multi-device subprocess that compiles for a minute
or more) runs once, not once per worker that happens to receive one of its tests.
"""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # before xdist's own, which takes 'load'
def pytest_xdist_make_scheduler(config, log):
  """``--dist load`` (what ``-n`` alone gives) becomes ``loadfile``; any other mode stays."""
  if config.getvalue("dist") == "load":
    from xdist.scheduler import LoadFileScheduling
    # Files in collection order (not by test count, which would queue the few-test,
    # minute-long subprocess files last); the many small doctest files fill the tail.
    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)
  return None
