"""Layer 0: helpers with no stquant concepts (argument checks, pytree fields)."""
