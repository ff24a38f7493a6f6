"""Errors a user can cause. Each message says what went wrong and what to do."""


class SecquantError(Exception):
    """Base class: the CLI prints these as one line and exits 2."""


class RecipeError(SecquantError):
    """A recipe or preset is unknown or malformed."""


class ModelError(SecquantError):
    """A model cannot be loaded, has no quantizable layer, or has bad weights."""


class CalibrationError(SecquantError):
    """Calibration data is missing, empty or of the wrong shape."""


class ArtifactError(SecquantError):
    """A quantized artifact is malformed, inconsistent or of an unknown version."""


class UnsafeInputError(SecquantError):
    """An input would need unsafe deserialization (pickle) to be read."""


class OutputExistsError(SecquantError):
    """The output path exists and overwriting was not asked for."""


class StrictError(SecquantError):
    """Strict quantization refused: a module holding weights would stay in float."""
