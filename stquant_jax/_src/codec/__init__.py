"""Layer 1, the codec: code maps, bit-packing, block quantization and ``QuantizedArray``."""
