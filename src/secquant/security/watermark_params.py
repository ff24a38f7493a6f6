"""Watermark defaults, apart from the torch-heavy watermark module so that the CLI can show them
in its help without importing torch (sealing and opening then start light)."""

DEFAULT_THRESHOLD = 1e-6  # detect when the false-positive bound (p-value) is at most this
# Default band: tau = min(DEFAULT_MAX_TAU, DEFAULT_STRENGTH / sqrt(12 N)) steps. A fresh mark's z is about
# tau * sqrt(12 N) and adds 12 tau^2 to the weights' rounding MSE, so large models (MiniLM, 22.7 M weights:
# tau 0.012, z ~ 200, +0.2% MSE) get a mark that survives re-quantization to 4 bits, and small ones
# (digits, 38 k weights: tau 0.06, z ~ 35, +4.3% MSE) one that survives +-1 on every code.
DEFAULT_STRENGTH = 200.0
DEFAULT_MAX_TAU = 0.06
MAX_TAU = 0.5  # at 0.5 every element next to its float position is rounded toward its keyed sign
