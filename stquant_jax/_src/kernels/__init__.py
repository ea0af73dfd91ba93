"""Layer 5: Pallas (Triton) kernels, each beside its jnp reference (public: ``pallas_kernels``)."""
