"""DP budget rules shared by DP calibration and DP-SGD: one default delta, one delta rule, one
neighbour relation, and the differentially private sample count both publish instead of the exact one.

Neighbour relation (both mechanisms): data sets that differ by adding or removing one sample. Under
it the number of samples n is itself private (898 vs 897 members reveals who is in), so no artifact
records n or anything computed from it exactly; it records a noisy count released under the same
budget (see `dp_count`).
"""

from __future__ import annotations

import math

from ..errors import SecquantError

DEFAULT_DELTA = 1e-5  # the one default of --dp-delta (quantize and qat); it must also be below 1/n
NEIGHBOURS = ("add or remove one sample (the number of samples is private: only a differentially private "
              "estimate of it is published, never the exact count)")


class PrivacyError(SecquantError):
    """DP parameters are invalid or the model cannot be trained privately as it is."""


def check_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise PrivacyError(f"--dp-epsilon must be a positive number, got {epsilon}")


def resolve_delta(delta: float | None) -> float:
    """The caller's delta, or the one default; refuses a delta outside (0, 1) before any work."""
    d = DEFAULT_DELTA if delta is None else delta
    if not (isinstance(d, (int, float)) and 0 < d < 1):
        raise PrivacyError(f"--dp-delta must be in (0, 1), got {d}")
    return float(d)


def check_delta(delta: float, n: int) -> None:
    """delta < 1/n, n the private sample count: a larger delta allows releasing one sample outright.
    (The refusal tells the data owner n; nothing is released.)"""
    if delta >= 1.0 / max(1, n):
        suggestion = 10.0 ** math.floor(math.log10(0.1 / max(1, n)))
        raise PrivacyError(f"--dp-delta {delta:g} is not below 1/n = {1.0 / max(1, n):.3g} for the {n} private "
                           f"samples: a delta that large allows releasing a sample outright; use e.g. "
                           f"--dp-delta {suggestion:.0e}")


def dp_count(n: int, epsilon: float) -> tuple[int, float]:
    """(noisy n, epsilon spent): n + discrete Laplace noise of scale 1/epsilon from OpenDP, whose sampler
    draws from the OS's secure random source. A count has sensitivity 1 under add/remove-one."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    meas = dp.m.make_laplace(dp.atom_domain(T=int), dp.absolute_distance(T=int), scale=1.0 / epsilon)
    return int(meas(int(n))), float(meas.map(1))
