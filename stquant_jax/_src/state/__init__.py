"""Layer 2: the optimizer state's types, and finding and retyping them in any optax state."""
