"""Granularity: which elements share one scale / zero point (small frozen dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per index along `axis` (e.g. output channel 0 of a weight)."""

    axis: int = 0


@dataclass(frozen=True)
class PerGroup:
    """One scale per `group_size` consecutive elements along `axis` (the reduction dim).

    A final partial group is allowed: it is padded with zeros internally and the padding
    is never stored.
    """

    group_size: int = 128
    axis: int = -1

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError("group_size must be >= 1")


@dataclass(frozen=True)
class PerToken:
    """Activations: one scale per token, i.e. per row over the last (feature) dimension."""


Granularity = PerTensor | PerChannel | PerGroup | PerToken
