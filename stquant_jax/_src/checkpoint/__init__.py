"""Layer 9: orbax checkpoints of the full optimizer state, bit layout included."""
