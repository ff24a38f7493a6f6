"""Exact b-bit packing into uint8, little-endian bit order."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secquant.quant.primitives import pack, packed_nbytes, unpack

PROP = settings(max_examples=100, deadline=None)


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """Code i occupies bits [i*b, (i+1)*b) of a little-endian stream."""
    stream = 0
    for i, c in enumerate(codes):
        stream |= c << (i * bits)
    return list(stream.to_bytes(math.ceil(len(codes) * bits / 8), "little"))


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=300))
    return codes, bits


@PROP
@given(cb=codes_and_bits())
def test_pack_unpack_round_trip(cb):
    codes, bits = cb
    t = torch.tensor(codes, dtype=torch.int64)
    packed = pack(t, bits)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == packed_nbytes(len(codes), bits) == math.ceil(len(codes) * bits / 8)
    out = unpack(packed, bits, len(codes))
    assert out.dtype == torch.uint8
    assert out.tolist() == codes


@PROP
@given(cb=codes_and_bits())
def test_pack_matches_little_endian_reference(cb):
    codes, bits = cb
    assert pack(torch.tensor(codes, dtype=torch.int64), bits).tolist() == reference_pack(codes, bits)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 1000, 1001])
def test_round_trip_every_bits_and_lengths(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    packed = pack(codes, bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


@pytest.mark.parametrize(
    ("numel", "bits", "nbytes"),
    [(2, 4, 1), (3, 4, 2), (4, 2, 1), (5, 2, 2), (8, 3, 3), (9, 3, 4), (8, 1, 1), (9, 1, 2),
     (1, 8, 1), (10, 8, 10), (8, 5, 5), (8, 7, 7), (0, 4, 0), (128 * 64, 4, 4096)],
)
def test_packed_nbytes(numel, bits, nbytes):
    assert packed_nbytes(numel, bits) == nbytes
    assert pack(torch.zeros(numel, dtype=torch.int64), bits).numel() == nbytes


def test_layouts():
    assert pack(torch.tensor([1, 2]), 4).tolist() == [0x21]          # first code in the low nibble
    assert pack(torch.tensor([0xA, 0xB, 0xC]), 4).tolist() == [0xBA, 0x0C]
    assert pack(torch.tensor([0, 1, 2, 3]), 2).tolist() == [0b11100100]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0b10000001]
    assert pack(torch.tensor([7] * 8), 3).tolist() == [255, 255, 255]
    assert pack(torch.tensor([5]), 3).tolist() == [5]
    # 3-bit codes straddle byte boundaries: 1 | 2<<3 | 3<<6 | 4<<9 ...
    assert pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == reference_pack([1, 2, 3, 4, 5, 6, 7, 0], 3)
    assert pack(torch.tensor([200, 3]), 8).tolist() == [200, 3]


def test_multi_dim_codes_flatten_row_major():
    codes = torch.tensor([[1, 2], [3, 4]])
    assert pack(codes, 4).tolist() == [0x21, 0x43]
    assert unpack(pack(codes, 4), 4, 4).reshape(2, 2).tolist() == codes.tolist()


@pytest.mark.parametrize(("codes", "bits"), [([16], 4), ([-1], 4), ([2], 1), ([4], 2), ([8], 3), ([256], 8), ([0, 1, 300], 8)])
def test_out_of_range_codes_raise(codes, bits):
    with pytest.raises(ValueError):
        pack(torch.tensor(codes), bits)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError):
        pack(torch.tensor([0]), bits)
    with pytest.raises(ValueError):
        unpack(torch.zeros(1, dtype=torch.uint8), bits, 1)


def test_unpack_rejects_wrong_byte_count():
    with pytest.raises(ValueError):
        unpack(torch.zeros(2, dtype=torch.uint8), 4, 2)   # 2 nibbles fit in 1 byte
    with pytest.raises(ValueError):
        unpack(torch.zeros(2, dtype=torch.uint8), 3, 8)   # 8 x 3 bits need 3 bytes
