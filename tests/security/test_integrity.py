"""Run-time integrity: keyed group checksums over every tensor a model holds catch bit flips; repair
zeroes code groups and rebuilds caches, and says what it cannot repair."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import secquant
from secquant.security.integrity import IntegrityGuard, reachable_tensors


@pytest.fixture(scope="module")
def digits_q(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SECQUANT_CACHE", str(tmp_path_factory.mktemp("cache")))
    from secquant.models.digits import splits
    yield {p: secquant.quantize("builtin:digits", p) for p in ("w8a16", "w4a16-rtn", "kmeans4")}, splits()
    mp.undo()


def _independent_enumeration(model: torch.nn.Module) -> set[str]:
    """Every tensor reachable from the module, found without the guard's code: parameters and buffers of
    each submodule (persistent or not) and tensors held as plain attributes."""
    names = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        names |= {prefix + n for n, _ in m.named_parameters(recurse=False)}
        names |= {prefix + n for n, _ in m.named_buffers(recurse=False)}
        names |= {prefix + k for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
    return names


@pytest.mark.parametrize("preset", ["w8a16", "w4a16-rtn"])
def test_every_injected_single_bit_flip_in_the_codes_is_detected(digits_q, preset):
    qm = digits_q[0][preset]
    g = IntegrityGuard(qm.module, b"k1")
    assert g.check() == []
    rng = random.Random(0)
    layers = list(g.layers)
    n, hits = 500, 0
    for _ in range(n):
        name = rng.choice(layers)
        m = g.layers[name]
        i, bit = rng.randrange(m.qweight.numel()), rng.randrange(8)
        m.qweight[i] ^= 1 << bit
        found = g.check()
        hits += [(c.name, c.kind) for c in found] == [(f"{name}.qweight", "codes")] and \
            found[0].byte_range[0] <= i < found[0].byte_range[1]
        m.qweight[i] ^= 1 << bit
    assert hits == n  # a keyed odd-multiplier checksum catches all single flips
    assert g.check() == []


def test_the_guard_covers_every_tensor_reachable_from_the_module(digits_q):
    qm = copy.deepcopy(digits_q[0]["w4a16-rtn"])
    g = IntegrityGuard(qm.module, b"k")
    want = _independent_enumeration(qm.module)
    assert {"classifier.3._w_cache", "features.1.running_var", "classifier.3.weight_zero_point"} <= want
    assert want == set(g.tensors) == set(reachable_tensors(qm.module))
    # a new kind of tensor on a layer (here a plain attribute, as a new layer type might hold) is covered
    # without the guard naming it ...
    layer = qm.module.get_submodule("classifier.1")
    layer.extra_table = torch.linspace(-1, 1, 40)
    layer.register_buffer("scratch", torch.ones(3), persistent=False)
    g2 = IntegrityGuard(qm.module, b"k")
    assert {"classifier.1.extra_table", "classifier.1.scratch"} <= set(g2.tensors)
    layer.extra_table.view(torch.int32)[7] ^= 1 << 30
    assert [c.name for c in g2.check()] == ["classifier.1.extra_table"]
    layer.extra_table.view(torch.int32)[7] ^= 1 << 30
    # ... and one that appears (or vanishes) after the guard was made is reported, not ignored
    layer.late = torch.zeros(2)
    found = g2.check()
    assert [(c.name, c.kind) for c in found] == [("classifier.1.late", "structure")] and "not covered" in found[0].detail
    del layer.late
    del layer._buffers["scratch"]
    assert [(c.name, c.kind) for c in g2.check()] == [("classifier.1.scratch", "structure")]


def test_a_dropped_cache_is_recomputed_and_still_checked(digits_q):
    qm = copy.deepcopy(digits_q[0]["w8a16"])
    g = IntegrityGuard(qm.module, b"k")
    layer = g.layers["classifier.3"]
    assert layer._w_cache is not None  # made by the guard from the codes it just took as reference
    layer._w_cache = None  # dropped (e.g. by a weight update): the forward recomputes it from checked tensors
    assert g.check() == []
    qm(torch.zeros(1, 1, 8, 8))
    assert g.check() == []  # the same bytes as before: the checksum is of the content
    layer._w_cache[3, 5] = 7.0
    assert [(c.name, c.kind) for c in g.check()] == [("classifier.3._w_cache", "derived")]


def test_checksums_depend_on_the_key(digits_q):
    qm = digits_q[0]["w8a16"]
    a, b = IntegrityGuard(qm.module, b"k1"), IntegrityGuard(qm.module, b"k2")
    for name in ("features.0.qweight", "features.0.bias", "features.0._w_cache"):
        assert (a.reference[name].sums != b.reference[name].sums).any()
    with pytest.raises(ValueError):
        IntegrityGuard(qm.module, b"")


def test_repair_zeroes_the_corrupted_group_and_rebuilds_the_cache(digits_q):
    qm = copy.deepcopy(digits_q[0]["w8a16"])
    d = digits_q[1]

    def acc():
        with torch.no_grad():
            return float((qm(d["test_x"]).argmax(1) == d["test_y"]).float().mean())

    clean = acc()
    g = IntegrityGuard(qm.module, b"k", group_bytes=64)
    m = g.layers["classifier.3"]  # the logits layer, 10 x 64 int8 weights: one group per class row
    for i in range(3 * 64, 4 * 64):
        m.qweight[i] ^= 0x80  # the top bit of every weight of class 3's row: each jumps by 128 steps
    m._w_cache = None  # as the bit-flip audit does: the forward recomputes the cache from the flipped codes
    broken = acc()
    found = g.check()
    assert [(c.layer, c.group) for c in found if c.kind == "codes"] == [("classifier.3", 3)]
    assert {c.name for c in found if c.kind == "derived"} == {"classifier.3._w_cache"}  # the row, 4 float groups
    assert g.repair(found) == []
    assert {c.repaired for c in found} == {"zeroed", "rebuilt"}
    repaired = acc()
    assert g.check() == []
    print(f"accuracy clean {clean:.4f}, after flips {broken:.4f}, after repair {repaired:.4f}")
    assert broken < clean - 0.05  # the flips do real damage
    # measured: clean 0.9833, after flips 0.8865, after zeroing the group 0.8888: zeroing is never worse
    # than the corrupted weights, and it stops the corruption from spreading through later checks
    assert repaired >= broken
    w = m.dequantized_weight()
    lo, hi = found[0].byte_range
    assert torch.all(w.reshape(-1)[lo:hi] == 0)  # 8-bit codes: one byte per weight


def test_a_corrupted_cache_alone_is_rebuilt_from_the_verified_codes(digits_q):
    qm = copy.deepcopy(digits_q[0]["w8a16"])
    x = digits_q[1]["test_x"][:64]
    want = qm(x)
    g = IntegrityGuard(qm.module, b"k")
    cache = g.layers["classifier.1"]._w_cache
    cache.view(-1).view(torch.int32)[100] ^= 1 << 30  # the forward reads this copy, not the codes
    assert not torch.equal(qm(x), want)
    found = g.check()
    assert [(c.name, c.kind) for c in found] == [("classifier.1._w_cache", "derived")]
    assert g.repair(found) == [] and found[0].repaired == "rebuilt"
    assert torch.equal(qm(x), want) and g.check() == []


def test_codebook_codes_are_zeroed_to_the_entry_nearest_zero(digits_q):
    qm = copy.deepcopy(digits_q[0]["kmeans4"])
    g = IntegrityGuard(qm.module, b"k")
    m = g.layers["classifier.1"]
    m.qweight[:64] ^= 0xFF
    found = g.check()
    assert [(c.name, c.group, c.kind) for c in found] == [("classifier.1.qweight", 0, "codes")]
    assert g.repair(found) == []
    w = m.dequantized_weight().reshape(m.rows, m.cols)[0, :128]  # 64 bytes of 4-bit codes: 128 weights of row 0
    assert torch.all(w == m.codebook[0, m.codebook[0].abs().argmin()])
    assert g.check() == []


def test_float_tensors_are_not_repaired_in_place(digits_q):
    qm = copy.deepcopy(digits_q[0]["w8a16"])
    g = IntegrityGuard(qm.module, b"k")
    bias = qm.module.get_submodule("classifier.3").bias
    scale = g.layers["features.0"].weight_scale
    codes = g.layers["features.3"].qweight
    bias.data.view(torch.int32)[2] ^= 1 << 30
    scale.view(torch.int32)[0] ^= 1 << 30
    codes[9] ^= 0x80
    found = g.check()
    assert {(c.name, c.kind) for c in found} == {("classifier.3.bias", "tensor"), ("features.0.weight_scale", "tensor"),
                                                 ("features.3.qweight", "codes")}
    left = g.repair(found)
    assert {c.name for c in left} == {"classifier.3.bias", "features.0.weight_scale"}
    assert [c.name for c in g.check()] == ["features.0.weight_scale", "classifier.3.bias"]  # the codes were zeroed


def test_check_integrity_repair_says_what_it_cannot_repair(digits_q):
    from secquant.security.integrity import IntegrityError

    qm = copy.deepcopy(digits_q[0]["w8a16"])
    qm.integrity = IntegrityGuard(qm.module, b"k")
    qm.integrity.layers["features.3"].qweight[3] ^= 0x80
    assert len(qm.check_integrity(repair=True)) == 1 and qm.check_integrity() == []
    qm.module.get_submodule("features.1").running_var.view(torch.int32)[0] ^= 1 << 30
    with pytest.raises(IntegrityError, match=r"features\.1\.running_var.*cannot be repaired.*reload the model") as e:
        qm.check_integrity(repair=True)
    assert [c.name for c in e.value.corruptions] == ["features.1.running_var"]


def test_rotated_layers_read_their_own_hadamard_block():
    """The forward of a rotated layer multiplies by a Hadamard block the layer holds (so the guard covers
    it), and computes exactly what the shared primitive does."""
    from secquant.quant.modules import QuantLinear
    from secquant.quant.primitives import rotate
    from secquant.recipes import QuantArgs

    q = QuantLinear(64, 8, True, QuantArgs(bits=4, granularity="group", group_size=32), None, rotation=32)
    q.rotation_signs.copy_(torch.randint(0, 2, (64,)).float() * 2 - 1)
    x = torch.randn(5, 64)
    assert torch.equal(q.input_space(x), rotate(x, q.rotation_signs, 32))
    g = IntegrityGuard(q, b"k")
    assert "rotation_hadamard" in g.tensors and "rotation_signs" in g.tensors
    q.rotation_hadamard.view(-1).view(torch.int32)[5] ^= 1 << 30
    found = g.check()
    assert [(c.name, c.kind) for c in found] == [("rotation_hadamard", "derived")]
    assert g.repair(found) == [] and torch.equal(q.input_space(x), rotate(x, q.rotation_signs, 32))


@pytest.mark.parametrize("nbytes", [1, 63, 64, 130])
def test_every_single_bit_flip_changes_its_runtime_group_checksum(nbytes):
    """The run-time checksums (no per-word keystream) still catch every single-bit flip, in its group,
    including the zero-padded last group, and depend on the key."""
    import numpy as np

    from secquant.security.checksums import runtime_checksums

    raw = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    ref = runtime_checksums(raw, b"s" * 32, "t", 64)
    assert ref.shape == (-(-nbytes // 64),)
    assert (runtime_checksums(raw, b"z" * 32, "t", 64) != ref).any()
    for byte in range(nbytes):
        for bit in range(8):
            raw[byte] ^= 1 << bit
            diff = np.flatnonzero(runtime_checksums(raw, b"s" * 32, "t", 64) != ref).tolist()
            raw[byte] ^= 1 << bit
            assert diff == [byte // 64]
