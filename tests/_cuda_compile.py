"""The compile-for-H100 test harness: ``benchmarks/_compile_cases.py`` plus pytest bits.

Needs the CUDA compile pieces (``pip install -e ".[test]"`` installs them, via
the ``cuda-compile`` extra); :data:`needs_cuda_compile` skips with the reason
where they are missing.
"""

import pytest

from benchmarks._compile_cases import cuda_compile_missing, run_cases  # noqa: F401  (re-exported)

needs_cuda_compile = pytest.mark.skipif(cuda_compile_missing() is not None,
                                        reason=str(cuda_compile_missing()))


def assert_all_ok(results):
  bad = {k: v["error"] for k, v in results.items() if not v["ok"]}
  assert not bad, "\n".join(f"{k}: {v[:1500]}" for k, v in bad.items())
