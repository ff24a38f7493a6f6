"""Randomized block-Hadamard rotation: orthogonal, invertible, consistent with its Hessian form."""

from __future__ import annotations

import pytest
import torch

from secquant.quant.primitives import is_rotatable, rotate, rotate_hessian, rotation_signs, unrotate
from secquant.quant.primitives.rotation import hadamard


def _dense(cols: int, block: int, signs: torch.Tensor) -> torch.Tensor:
    """R = D B as a dense matrix, built independently of `rotate` (block_diag of the Hadamard)."""
    return torch.diag(signs.double()) @ torch.block_diag(*[hadamard(block).double()] * (cols // block))


@pytest.mark.parametrize("cols,block", [(256, 128), (384, 128), (96, 32), (8, 2)])
def test_rotation_is_orthogonal_and_undone(cols, block):
    g = torch.Generator().manual_seed(cols)
    x = torch.randn(5, 7, cols, generator=g, dtype=torch.float64)
    signs = rotation_signs(cols, seed=3)
    y = rotate(x, signs, block)
    R = _dense(cols, block, signs)
    torch.testing.assert_close(y, x @ R)
    torch.testing.assert_close(R.t() @ R, torch.eye(cols, dtype=torch.float64))
    torch.testing.assert_close(unrotate(y, signs, block), x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_layer_output_is_exact_in_float_and_the_hessian_follows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g, dtype=torch.float64)
    w = torch.randn(32, 256, generator=g, dtype=torch.float64)
    signs = rotation_signs(256, seed=0)
    torch.testing.assert_close(rotate(x, signs, 128) @ rotate(w, signs, 128).t(), x @ w.t())
    xq = x + 0.1 * torch.randn(64, 256, generator=g, dtype=torch.float64)  # a second input, as for C = X~^T X
    R = _dense(256, 128, signs)
    torch.testing.assert_close(rotate_hessian(x.t() @ x, signs, 128), R.t() @ (x.t() @ x) @ R)
    torch.testing.assert_close(rotate_hessian(xq.t() @ x, signs, 128), (xq @ R).t() @ (x @ R))


def test_signs_are_seeded_and_shared_by_width():
    assert torch.equal(rotation_signs(384, 0), rotation_signs(384, 0))
    assert not torch.equal(rotation_signs(384, 0), rotation_signs(384, 1))
    assert set(rotation_signs(384, 0).tolist()) == {-1.0, 1.0}


def test_rotation_spreads_an_outlier_over_its_block():
    w = torch.zeros(1, 128)
    w[0, 5] = 10.0
    y = rotate(w, rotation_signs(128, 0), 128)
    assert float(y.abs().max()) == pytest.approx(10.0 / 128 ** 0.5, rel=1e-5)  # 10 -> 0.88 everywhere


def test_blocks_that_do_not_fit_are_refused():
    assert is_rotatable(384, 128) and not is_rotatable(384, 256) and not is_rotatable(96, 48)
    with pytest.raises(ValueError, match="cannot rotate"):
        rotate(torch.randn(3, 100), torch.ones(100), 64)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(48)
