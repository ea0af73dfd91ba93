"""Layer 6: bit-allocation policies (``FixedBits``, ``STQuantPolicy``: scores, zones, budget)."""
