"""Layer 8: bit layouts from outside ``jit``: ``relayout``, telemetry, memory accounting."""
