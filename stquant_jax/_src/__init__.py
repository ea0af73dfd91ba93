"""stquant-jax's implementation, in layers; each may import only the layers below it.

====  ===============  ===========================================================
 10   ``stepping``     ``adaptive_jit``: ahead-of-time compiles, stall-free layout switches
 9    ``checkpoint``   orbax save / restore of the whole state, bit layout included
 8    ``layout``       ``relayout``, telemetry (``bit_widths``), memory accounting
 7    ``transform``    ``scale_by_stquant`` and the ``adam`` / ``adamw`` aliases
 6    ``policy``       ``FixedBits``, ``STQuantPolicy``: scores, zones, budget
 5    ``kernels``      Pallas kernels + jnp twins, backend by lowering platform
 4    ``update``       the per-leaf Adam math the jnp path and the kernels share
 3    ``distributed``  sharding rules of quantized moments, ``state_shardings``
 2    ``state``        ``ScaleByStquantState``, finding and retyping states
 1    ``codec``        code maps, bit-packing, block quantization, ``QuantizedArray``
 0    ``core``         argument checks, pytree helpers
====  ===============  ===========================================================

The public API is ``stquant_jax/__init__.py`` (and ``pallas_kernels`` for the
kernels); ``tests/test_architecture.py`` enforces the layering.
"""
