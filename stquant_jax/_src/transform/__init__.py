"""Layer 7: the optax transform ``scale_by_stquant`` and the ``adam`` / ``adamw`` aliases."""
