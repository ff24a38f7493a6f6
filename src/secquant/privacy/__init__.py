"""Data privacy mechanisms: DP calibration, data-free inputs, DP-SGD, PII masking, encrypted data, the
calibration plan and privacy ledger (the audits that attack them live in secquant.audits).

Imports stay lazy: `import secquant.privacy` loads no heavy dependency (Presidio, spaCy, torch);
names resolve on first use.
"""

from __future__ import annotations

import importlib

# name -> submodule that defines it. Other privacy modules add their own entries here.
_LAZY = {
    "MaskingError": "masking",
    "Masker": "masking",
    "mask_texts": "masking",
    "mask_file": "masking",
    "unmask_value": "masking",
    "unmask_file": "masking",
    "generate_key": "masking",
    "dp_calibrate": "dp_calibration",
    "synthetic_source": "synthetic",
    "dp_qat": "dp_training",
    "verify_commitment": "provenance",
    "plaintext_path": "encrypted_data",
    "encrypt_file": "encrypted_data",
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
