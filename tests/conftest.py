"""Test configuration: CPU only, float32 by default, a few virtual devices.

Multi-device tests (8 devices) run in subprocesses that set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax;
see ``tests/_subprocess.py``.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
