"""Layer 3: sharding rules for quantized moments, mesh helpers and ``state_shardings``."""
