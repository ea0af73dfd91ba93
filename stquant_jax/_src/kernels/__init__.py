"""Layer 5: Pallas (Triton) kernels, each beside its jnp reference, and how a step picks
and places them (by lowering platform, on each device's blocks, checked on first use;
public: ``pallas_kernels``)."""
