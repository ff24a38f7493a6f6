"""Watermark defaults, apart from the torch-heavy watermark module so that the CLI can show them
in its help without importing torch (sealing and opening then start light)."""

DEFAULT_THRESHOLD = 1e-9  # detect when the false-positive probability is at most this
DEFAULT_STRENGTH = 24.0  # expected z of a fresh mark; p <= 1e-9 needs z ~ 6, the rest is robustness margin
