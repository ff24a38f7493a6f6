"""Quantization core: primitives, observers, quantized modules, algorithms."""
