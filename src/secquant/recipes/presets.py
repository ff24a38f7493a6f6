"""Named recipes. Plain data: a preset is just a Recipe."""

from __future__ import annotations

from ..errors import RecipeError
from ..quant.schema import QuantArgs, Recipe, Rotation, SmallTables, Smoothing

W8_CHANNEL = QuantArgs(bits=8, symmetric=True, granularity="channel", axis=0)
# 99.999: transformer activations carry a few outlier channels that matter; 99.99 clips them.
A8_STATIC = QuantArgs(bits=8, symmetric=False, granularity="tensor", observer="percentile", percentile=99.999)
A8_DYNAMIC_TOKEN = QuantArgs(bits=8, symmetric=False, granularity="token", dynamic=True)


def _w4_group(group_size: int = 128) -> QuantArgs:
    return QuantArgs(bits=4, symmetric=False, granularity="group", group_size=group_size, observer="mse")


def _wgroup(bits: int, group_size: int, observer: str = "minmax") -> QuantArgs:
    return QuantArgs(bits=bits, symmetric=False, granularity="group", group_size=group_size, observer=observer)


# GPTQ presets first search AWQ-style per-input-channel scales (GPTQ then quantizes W*s under the
# Hessian of x/s; it sets the clipping itself, through the Hessian-weighted MSE range of each group).
# On MiniLM W4 g128 (Linear layers): GPTQ alone 0.9845 mean cosine, + float-model targets 0.9876,
# + MSE ranges and these scales 0.9894, + a block-Hadamard rotation of each group (Rotation) 0.9909.
# The rotation helps at 3 bits too (0.9604 -> 0.9659) but not at 2 bits in groups of 64 (0.8671 -> 0.8610).
_GPTQ_SCALES = Smoothing(clip=False)
# Below 8 bits, embedding tables under 1% of the parameters (position, token type) stay 8-bit per row: on MiniLM
# w4a16-gptq they cost 94 kB (12.55 -> 12.65 MB) and move the mean cosine on the 256 held-out built-in sentences
# from 0.9880 to 0.9895. (The word table, 51% of the parameters, is what stays between that and 0.99: at 8 bits
# it gives 0.9903, at g64 / g32 4-bit 0.9894 / 0.9895, for ~5.8 MB more at 8 bits.)
_TABLES = SmallTables()

PRESETS: dict[str, Recipe] = {
    "w8a8": Recipe(
        name="w8a8",
        description="int8 per-channel weights, int8 static per-tensor activations (calibrated, SmoothQuant-style scales)",
        weights=W8_CHANNEL, activations=A8_STATIC, smoothing=Smoothing(),
    ),
    "w8a8-dynamic": Recipe(
        name="w8a8-dynamic",
        description="int8 per-channel weights, int8 per-token activations computed at run time",
        weights=W8_CHANNEL, activations=A8_DYNAMIC_TOKEN,
    ),
    "w8a16": Recipe(
        name="w8a16",
        description="int8 per-channel weights only; activations stay in float",
        weights=W8_CHANNEL,
    ),
    "w4a16": Recipe(
        name="w4a16",
        description="4-bit asymmetric weights in groups of 128, activation-aware scales and clipping (AWQ-style, "
                    "calibrated); activations in float",
        weights=_w4_group(128), smoothing=Smoothing(), small_tables=_TABLES,
    ),
    "w4a16-rtn": Recipe(
        name="w4a16-rtn",
        description="4-bit asymmetric weights in groups of 128, MSE-clipped round-to-nearest: reads no data",
        weights=_w4_group(128), small_tables=_TABLES,
    ),
    "w4a8-dynamic": Recipe(
        name="w4a8-dynamic",
        description="4-bit weights in groups of 128 (activation-aware scales), int8 per-token dynamic activations",
        weights=_w4_group(128), activations=A8_DYNAMIC_TOKEN, smoothing=Smoothing(), small_tables=_TABLES,
    ),
    # Low-bit static presets, the starting points of quantization-aware retraining (secquant qat).
    "w4a4": Recipe(
        name="w4a4", description="4-bit symmetric per-channel weights, 4-bit static per-tensor activations (min-max)",
        weights=QuantArgs(bits=4, granularity="channel"),
        activations=QuantArgs(bits=4, symmetric=False, observer="minmax"), small_tables=_TABLES,
    ),
    "w2a8": Recipe(
        name="w2a8", description="2-bit symmetric per-channel weights, int8 static per-tensor activations (min-max)",
        weights=QuantArgs(bits=2, granularity="channel"),
        activations=QuantArgs(bits=8, symmetric=False, observer="minmax"), small_tables=_TABLES,
    ),
    # Precise low-bit presets: Hessian-based GPTQ (calibrated), data-free range search, non-uniform codes.
    "w4a16-gptq": Recipe(
        name="w4a16-gptq", description="4-bit weights, groups of 128, GPTQ (act-order, static groups, float-model "
                                       "targets) after AWQ-style scales, Hadamard-rotated groups; calibrated",
        weights=_wgroup(4, 128, "mse"), algorithm="gptq", smoothing=_GPTQ_SCALES, rotation=Rotation(block=128),
        small_tables=_TABLES,
    ),
    "w3a16": Recipe(
        name="w3a16", description="3-bit weights, groups of 128, round-to-nearest min-max: reads no data",
        weights=_wgroup(3, 128), small_tables=_TABLES,
    ),
    "w3a16-gptq": Recipe(
        name="w3a16-gptq", description="3-bit weights, groups of 128, GPTQ (float-model targets) after AWQ-style "
                                       "scales, Hadamard-rotated groups; calibrated",
        weights=_wgroup(3, 128, "mse"), algorithm="gptq", smoothing=_GPTQ_SCALES, rotation=Rotation(block=128),
        small_tables=_TABLES,
    ),
    "w3a16-hqq": Recipe(
        name="w3a16-hqq", description="3-bit weights, groups of 128, data-free MSE-optimal range search (HQQ-style "
                                      "calibration-free clipping): reads no data",
        weights=_wgroup(3, 128, "mse"), small_tables=_TABLES,
    ),
    "w2a16-gptq": Recipe(
        name="w2a16-gptq", description="2-bit weights, groups of 64, GPTQ (float-model targets) after AWQ-style "
                                       "scales; calibrated",
        weights=_wgroup(2, 64, "mse"), algorithm="gptq", smoothing=_GPTQ_SCALES, small_tables=_TABLES,
    ),
    "nf4": Recipe(
        name="nf4", description="NormalFloat-4 codebook, absmax per group of 64 (MSE-shrunk): reads no data",
        weights=QuantArgs(bits=4, format="nf4", granularity="group", group_size=64, observer="mse"), small_tables=_TABLES,
    ),
    "kmeans4": Recipe(
        name="kmeans4", description="4-bit k-means codebook per output channel (16-entry lookup tables): reads no data",
        weights=QuantArgs(bits=4, format="kmeans", granularity="channel"), small_tables=_TABLES,
    ),
    "pow2-4": Recipe(
        name="pow2-4", description="4-bit power-of-two (logarithmic) codes, absmax per channel: reads no data",
        weights=QuantArgs(bits=4, format="pow2", granularity="channel", observer="mse"), small_tables=_TABLES,
    ),
}


def get_preset(name: str) -> Recipe:
    try:
        return PRESETS[name]
    except KeyError:
        raise RecipeError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} (or pass --recipe FILE)"
        ) from None
