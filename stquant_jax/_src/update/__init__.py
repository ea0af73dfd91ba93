"""Layer 4: the per-leaf Adam math on quantized moments (jnp path and kernels' reference)."""
