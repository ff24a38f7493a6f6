"""Named recipes. Plain data: a preset is just a Recipe."""

from __future__ import annotations

from ..errors import RecipeError
from .schema import QuantArgs, Recipe, Smoothing

W8_CHANNEL = QuantArgs(bits=8, symmetric=True, granularity="channel", axis=0)
# 99.999: transformer activations carry a few outlier channels that matter; 99.99 clips them.
A8_STATIC = QuantArgs(bits=8, symmetric=False, granularity="tensor", observer="percentile", percentile=99.999)
A8_DYNAMIC_TOKEN = QuantArgs(bits=8, symmetric=False, granularity="token", dynamic=True)


def _w4_group(group_size: int = 128) -> QuantArgs:
    return QuantArgs(bits=4, symmetric=False, granularity="group", group_size=group_size, observer="mse")


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
        weights=_w4_group(128), smoothing=Smoothing(),
    ),
    "w4a16-rtn": Recipe(
        name="w4a16-rtn",
        description="4-bit asymmetric weights in groups of 128, MSE-clipped round-to-nearest: reads no data",
        weights=_w4_group(128),
    ),
    "w4a8-dynamic": Recipe(
        name="w4a8-dynamic",
        description="4-bit weights in groups of 128 (activation-aware scales), int8 per-token dynamic activations",
        weights=_w4_group(128), activations=A8_DYNAMIC_TOKEN, smoothing=Smoothing(),
    ),
}


def get_preset(name: str) -> Recipe:
    try:
        return PRESETS[name]
    except KeyError:
        raise RecipeError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} (or pass --recipe FILE)"
        ) from None
