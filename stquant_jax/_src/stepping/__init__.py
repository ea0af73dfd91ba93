"""Layer 10: ``adaptive_jit``, the train step that owns its bit-layout switches."""
