"""Modular mode: the seed's Q(x) = floor(C*x + d) mod p, exactly as written.

This is the fixed-point encoding used by secure computation (additive secret sharing,
homomorphic encryption), where integers live in Z_p and wrap-around is the arithmetic.
It is *not* a quantizer for plain inference: a value whose C*x + d leaves [0, p) wraps to
the other end of the range (the seed's own example, C=256, d=128, p=256 on [0, 1), sends
0.5 to 0 and 0.25 to 192). Inference wants the saturating mode in `affine.py`, which clamps.
"""

from __future__ import annotations

import torch


def _check_p(p: int) -> None:
    if not isinstance(p, int) or p < 2:
        raise ValueError(f"p must be an integer >= 2, got {p!r}")
    if p > 2**62:
        raise ValueError("p must be <= 2**62 so that residues fit int64 arithmetic")


def modular_encode(x: torch.Tensor, C: float, d: float, p: int) -> torch.Tensor:
    """floor(C*x + d) mod p as an int64 tensor in [0, p). Computed in float64."""
    _check_p(p)
    v = torch.floor(x.double() * C + d)
    return torch.remainder(v.to(torch.int64), p)


def centered_lift(q: torch.Tensor, p: int) -> torch.Tensor:
    """Representative of q in [-floor(p/2), ceil(p/2)): how signed values are read back from Z_p."""
    _check_p(p)
    q = torch.remainder(q.to(torch.int64), p)
    return torch.where(q >= (p + 1) // 2, q - p, q)


def modular_decode(q: torch.Tensor, C: float, d: float, p: int, centered: bool = True) -> torch.Tensor:
    """Read back x_hat = (lift(q) - d) / C (+1/(2C) to land mid-cell).

    Exact to within 1/(2C) when C*x + d lies in the lift's window ([0, p) or the centered one).
    """
    _check_p(p)
    lifted = centered_lift(q, p) if centered else torch.remainder(q.to(torch.int64), p)
    return (lifted.double() - d + 0.5) / C


def modular_add(a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    """(a + b) mod p: addition in Z_p."""
    _check_p(p)
    return torch.remainder(a.to(torch.int64) + b.to(torch.int64), p)


def additive_shares(q: torch.Tensor, p: int, n: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Split q in Z_p into n additive shares (each alone is uniform and reveals nothing)."""
    _check_p(p)
    if n < 2:
        raise ValueError("need at least 2 shares")
    shares = [torch.randint(0, p, q.shape, generator=generator, dtype=torch.int64) for _ in range(n - 1)]
    last = torch.remainder(q.to(torch.int64) - reconstruct(shares, p), p)
    return shares + [last]


def reconstruct(shares: list[torch.Tensor], p: int) -> torch.Tensor:
    """Sum of shares mod p."""
    out = torch.zeros_like(shares[0])
    for s in shares:
        out = modular_add(out, s, p)
    return out
