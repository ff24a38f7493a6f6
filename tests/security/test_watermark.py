"""Keyed rounding watermark: calibrated null, detection, robustness, fidelity, artifact and CLI round trips."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import stat

import pytest
import torch
from typer.testing import CliRunner

import secquant
from secquant.errors import ArtifactError
from secquant.models import ModelHandle
from secquant.models.digits import splits
from secquant.security.watermark import (
    WatermarkError,
    _float_position,
    _granule_index,
    as_key,
    binomial_tail,
    dequantized_float,
    embed_watermark,
    int_layers,
    keygen,
    verify_watermark,
)


def key(i: int) -> bytes:
    return hashlib.sha256(f"test-watermark-key-{i}".encode()).digest()


def acc(module, d) -> float:
    with torch.no_grad():
        return float((module(d["test_x"]).argmax(1) == d["test_y"]).float().mean()) * 100


def requantize(h: ModelHandle, float_like: torch.nn.Module, preset: str):
    return secquant.quantize(ModelHandle(float_like, h.kind, h.spec, h.rebuild, h.adapter), preset)


@pytest.fixture(scope="module")
def setup(digits):
    """Unmarked and marked (key 0) digits models for a per-channel int8 and a grouped int4 preset."""
    d = splits()
    out = {}
    for preset in ("w8a16", "w4a8-dynamic"):
        qm = secquant.quantize(digits, preset)
        marked = copy.deepcopy(qm.module)
        rep = embed_watermark(marked, digits.module, key(0))
        out[preset] = (qm, marked, rep)
    return digits, d, out


def test_key_stream_is_keyed_deterministic_and_balanced(tmp_path):
    k0, k1 = as_key(key(0)), as_key(key(1))
    w = k0.layer_words("features.0", 100_000)
    assert torch.equal(w, as_key(key(0)).layer_words("features.0", 100_000))
    assert not torch.equal(w, k1.layer_words("features.0", 100_000))
    assert not torch.equal(w, k0.layer_words("features.3", 100_000))
    assert int(w.min()) >= 0 and int(w.max()) < 2**32
    assert abs(float((w & 1).float().mean()) - 0.5) < 4 * 0.5 / math.sqrt(1e5)
    assert k0.key_id != k1.key_id and len(k0.key_id) == 16 and k0.key_id not in key(0).hex()
    assert len(k0.commitment) == 64 and k0.commitment.startswith(k0.key_id) and k0.commitment != k1.commitment
    assert key(0).hex() not in k0.commitment and k0.secret.hex() not in k0.commitment
    assert k0.secret.hex() not in repr(k0)
    # known answer: marks made today must stay verifiable, so the key schedule of scheme v1 is frozen
    assert as_key(b"k" * 32).layer_words("a", 3).tolist() == [2586311292, 2864675061, 2599095670]


def test_keygen_writes_a_private_key_and_refuses_weak_or_missing_keys(tmp_path):
    p = keygen(tmp_path / "wm.key")
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert len(bytes.fromhex(p.read_text().strip())) == 32
    assert as_key(p).key_id == as_key(p.read_bytes()).key_id
    with pytest.raises(WatermarkError, match="overwrite"):
        keygen(p)
    (tmp_path / "short").write_bytes(b"x" * 31)
    with pytest.raises(WatermarkError, match="at least 32"):
        as_key(tmp_path / "short")
    with pytest.raises(WatermarkError, match="does not exist"):
        as_key(tmp_path / "missing")


def test_binomial_tail_is_exact_and_survives_underflow():
    p, lp = binomial_tail(8, 10)
    assert p == pytest.approx((45 + 10 + 1) / 1024, rel=1e-12)
    assert lp == pytest.approx(math.log10(56 / 1024))
    assert binomial_tail(0, 10) == (1.0, 0.0)
    # far past double underflow: compare with the log of the leading terms computed by lgamma
    n, m = 100_000, 75_000
    p, lp = binomial_tail(m, n)
    terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)
             for k in range(m, m + 200)]
    top = max(terms)
    ref = (top + math.log(sum(math.exp(t - top) for t in terms))) / math.log(10)
    assert p == 0.0 and lp == pytest.approx(ref, abs=1e-6) and lp < -3000


def test_unmarked_models_are_not_detected_and_the_null_is_calibrated(setup):
    _, _, models = setup
    for qm, marked, _ in models.values():
        for i in range(1, 9):  # any key on the unmarked model, and wrong keys on the marked one
            for m in (qm.module, marked):
                r = verify_watermark(m, key(i))
                assert not r.detected and r.p_value > 1e-4 and abs(r.z) < 4.5
    # calibration: over 200 keys the whole-model p-value is (super-)uniform, so P(p <= 0.1) ~ 0.1
    qm = models["w8a16"][0]
    codes = {n: m.weight_codes().reshape(-1).to(torch.int64) & 1 for n, m in int_layers(qm.module).items()}
    ps = []
    for i in range(100, 300):
        k = as_key(key(i))
        hits = sum(int((c == (k.layer_words(n, c.numel()) & 1)).sum()) for n, c in codes.items())
        ps.append(binomial_tail(hits, sum(c.numel() for c in codes.values()))[0])
    frac = sum(p <= 0.1 for p in ps) / len(ps)
    assert 0.03 <= frac <= 0.18, frac


def test_marked_models_are_detected_with_tiny_p(setup):
    _, _, models = setup
    for preset, (_, marked, rep) in models.items():
        r = verify_watermark(marked, key(0))
        assert r.detected and r.log10_p_value < -80, (preset, r.log10_p_value)
        assert r.z == pytest.approx(rep.expected_z, abs=5.0)
        assert rep.keyed == r.n == sum(m.rows * m.cols for m in int_layers(marked).values())
        assert 0 < rep.tau < 0.25 and rep.changed == pytest.approx(rep.marked / 2, rel=0.1)
        assert 0 < rep.balanced <= rep.changed
        # the Bonferroni-combined p is a bound on each single test
        best = min([binomial_tail(r.matches, r.n)[1]] + [v["log10_p_value"] for v in r.layers.values()])
        assert r.log10_p_value == pytest.approx(best + math.log10(r.tests))


def test_marking_only_rerounds_near_boundary_weights_within_range(setup):
    h, _, models = setup
    for qm, marked, rep in models.values():
        for name, m in int_layers(marked).items():
            before = int_layers(qm.module)[name].weight_codes().to(torch.int64)
            after = m.weight_codes().to(torch.int64)
            diff = (after - before).abs()
            assert int(diff.max()) <= 1
            qmax = 2 ** m.weight_args.bits - 1
            assert int(after.min()) >= 0 and int(after.max()) <= qmax
            # every code is still floor(u) or ceil(u) of its float position; marked codes lie within tau of
            # a rounding boundary, and balancing cancels each granule's net shift
            ref = int_layers(qm.module)[name]
            u = _float_position(ref, h.module.get_submodule(name), name)
            assert bool(((after.double() - u).abs()[diff.bool()] < 1.0).all())
            near = (u - u.floor() - 0.5).abs() <= rep.tau + 1e-9
            assert int((diff.bool() & near).sum()) > 0
            g = _granule_index(ref).reshape(-1)
            net = torch.zeros(int(g.max()) + 1, dtype=torch.int64).index_add_(0, g, (after - before).reshape(-1))
            assert float((net == 0).float().mean()) > 0.95, (name, net)
        plain = copy.deepcopy(qm.module)
        embed_watermark(plain, h.module, key(0), balance=False)
        # balancing moved only elements outside the band: the keyed band agrees with the unbalanced mark
        for name, m in int_layers(plain).items():
            u = _float_position(int_layers(qm.module)[name], h.module.get_submodule(name), name)
            near = (u - u.floor() - 0.5).abs() <= rep.tau - 1e-9
            assert torch.equal(m.weight_codes()[near], int_layers(marked)[name].weight_codes()[near])


def test_fidelity_cost_on_digits(setup):
    h, d, models = setup
    for preset, (qm, _, _) in models.items():
        base = acc(qm.module, d)
        with torch.no_grad():
            ref_pred = qm.module(d["test_x"]).argmax(1)
        costs, flips = [], []
        for i in range(4):
            m = copy.deepcopy(qm.module)
            embed_watermark(m, h.module, key(i))
            costs.append(base - acc(m, d))
            with torch.no_grad():
                flips.append(int((m(d["test_x"]).argmax(1) != ref_pred).sum()))
        assert sum(costs) / len(costs) <= 0.1 + 1e-9, (preset, costs)
        assert max(flips) <= 3, (preset, flips)  # of 899 held-out digits


def test_mark_survives_requantization_at_the_same_bits(setup):
    h, _, models = setup
    for preset, (_, marked, _) in models.items():
        again = requantize(h, dequantized_float(h.module, marked), preset)
        r = verify_watermark(again, key(0))
        assert r.detected and r.log10_p_value < -20, (preset, r.log10_p_value)


def test_mark_survives_short_finetuning_then_requantization(setup):
    h, d, models = setup
    _, marked, _ = models["w4a8-dynamic"]
    f = dequantized_float(h.module, marked).train()
    for p in f.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(f.parameters(), lr=1e-2, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = d["train_x"], d["train_y"]
    for _ in range(2):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(f(x[b]), y[b]).backward()
            opt.step()
    moved = sum(float((a.detach() - b.detach()).abs().sum()) for a, b in zip(f.parameters(), h.module.parameters()))
    assert moved > 0
    r = verify_watermark(requantize(h, f.eval(), "w4a8-dynamic"), key(0))
    assert r.detected and r.log10_p_value < -20


def test_gptq_codes_are_marked_between_floor_and_ceil(digits):
    qm = secquant.quantize(digits, "w4a16-gptq")
    marked = copy.deepcopy(qm.module)
    rep = embed_watermark(marked, digits.module, key(3))
    assert rep.changed > 0 and verify_watermark(marked, key(3)).detected
    assert marked.classifier[1].rotation_block == 128  # the preset's rotation: marks land on rotated codes too
    for name, m in int_layers(marked).items():
        before = int_layers(qm.module)[name].weight_codes().to(torch.int64)
        assert int((m.weight_codes().to(torch.int64) - before).abs().max()) <= 1


def test_refusals(setup, digits):
    h, _, models = setup
    qm = models["w8a16"][0]
    m = copy.deepcopy(qm.module)
    with pytest.raises(WatermarkError, match="tau"):
        embed_watermark(m, h.module, key(0), tau=0.7)
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(WatermarkError, match="float model"):
        embed_watermark(m, other, key(0))
    nf4 = secquant.quantize(digits, "nf4")
    with pytest.raises(WatermarkError, match="integer"):
        embed_watermark(nf4.module, digits.module, key(0))
    with pytest.raises(WatermarkError, match="integer"):
        verify_watermark(nf4.module, key(0))
    with pytest.raises(WatermarkError, match="threshold"):
        verify_watermark(qm.module, key(0), threshold=0.9)


def test_verify_reads_the_artifact_and_refuses_a_tampered_one(setup, tmp_path):
    h, _, models = setup
    qm, marked, _ = models["w8a16"]
    from secquant.artifact import save_artifact

    mf = qm.manifest
    out = tmp_path / "art"
    save_artifact(out, marked, h, mf.recipe, {n: e.model_dump() for n, e in mf.layers.items()}, mf.source,
                  mf.calibration)
    from_dir = verify_watermark(out, key(0))
    from_mod = verify_watermark(marked, key(0))
    assert (from_dir.matches, from_dir.n, from_dir.detected) == (from_mod.matches, from_mod.n, True)
    reloaded = secquant.load(out, allow_unsealed=True)
    assert verify_watermark(reloaded, key(0)).matches == from_mod.matches
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        verify_watermark(out, key(0))


def test_cli_keygen_embed_verify_exit_codes(tmp_path, digits):
    from secquant.cli import app

    runner = CliRunner()
    k, k2, art = tmp_path / "k", tmp_path / "k2", tmp_path / "art"
    r = runner.invoke(app, ["watermark", "keygen", "--out", str(k)])
    assert r.exit_code == 0 and r.stdout.strip() == as_key(k).commitment
    assert runner.invoke(app, ["watermark", "keygen", "--out", str(k2)]).exit_code == 0
    r = runner.invoke(app, ["watermark", "keygen", "--out", str(k)])
    assert r.exit_code == 2 and "overwrite" in r.output
    r = runner.invoke(app, ["watermark", "embed", "builtin:digits", "--preset", "w8a16", "--key", str(k),
                            "--out", str(art)])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["verify"]["detected"] and summary["changed"] > 0 and summary["keyed"] == summary["verify"]["n"]
    assert summary["commitment"] == as_key(k).commitment and summary["key_id"] == as_key(k).key_id
    recorded = json.loads((art / "secquant.json").read_text())["watermark"]  # the commitment, never the key
    assert recorded["commitment"] == as_key(k).commitment and as_key(k).secret.hex() not in json.dumps(recorded)
    r = runner.invoke(app, ["watermark", "verify", str(art), "--key", str(k), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["detected"] and rep["false_positive_probability"] <= 1e-9 and rep["n"] == summary["keyed"]
    assert {"matches", "n", "z", "p_value", "log10_p_value", "threshold", "layers", "key_id"} <= set(rep)
    r = runner.invoke(app, ["watermark", "verify", str(art), "--key", str(k2)])
    assert r.exit_code == 3 and "not detected" in r.stdout
    # an impossible threshold cannot be met: still a clean verdict, not an error
    r = runner.invoke(app, ["watermark", "verify", str(art), "--key", str(k), "--threshold", "1e-300"])
    assert r.exit_code == 3
    r = runner.invoke(app, ["watermark", "verify", str(tmp_path / "nope"), "--key", str(k)])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["watermark", "embed", "builtin:digits", "--preset", "w8a16", "--key", str(k),
                            "--out", str(art)])
    assert r.exit_code == 2 and "exists" in r.output
    weak = tmp_path / "weak"  # a band too narrow to carry a detectable mark: refused, nothing written
    r = runner.invoke(app, ["watermark", "embed", "builtin:digits", "--preset", "w8a16", "--key", str(k),
                            "--out", str(weak), "--tau", "0.0005"])
    assert r.exit_code == 2 and "too weak" in r.output and not weak.exists()


def test_keyed_subset_fraction_round_trip(setup):
    h, _, models = setup
    qm = models["w8a16"][0]
    m = copy.deepcopy(qm.module)
    rep = embed_watermark(m, h.module, key(5), fraction=0.5)
    total = sum(x.rows * x.cols for x in int_layers(m).values())
    assert rep.keyed == pytest.approx(total / 2, rel=0.03)
    r = verify_watermark(m, key(5), fraction=0.5)
    assert r.detected and r.n == rep.keyed and r.z == pytest.approx(rep.expected_z, abs=5.0)
    # the full keyed set dilutes the mark with unmarked elements, and another subset misses it
    assert verify_watermark(m, key(5)).z < r.z
    assert not verify_watermark(m, key(6), fraction=0.5).detected
    with pytest.raises(WatermarkError, match="fraction"):
        embed_watermark(m, h.module, key(5), fraction=0.0)


def test_cli_verifies_a_sealed_model(tmp_path, digits):
    from secquant.cli import app
    from secquant.security import keygen as age_keygen
    from secquant.security import seal

    runner = CliRunner()
    k, art = tmp_path / "wm.key", tmp_path / "art"
    keygen(k)
    r = runner.invoke(app, ["watermark", "embed", "builtin:digits", "--preset", "w4a16-rtn", "--key", str(k),
                            "--out", str(art)])
    assert r.exit_code == 0, r.output
    alice = age_keygen(tmp_path / "alice")
    sealed = seal(art, [str(alice.recipient)], alice.sign_key, tmp_path / "m.age")
    base = ["watermark", "verify", str(sealed), "--key", str(k)]
    r = runner.invoke(app, base + ["--identity", str(alice.identity), "--verify-key", str(alice.verify_key), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["detected"]
    r = runner.invoke(app, base)  # a sealed file without its keys: a one-line error, not a verdict
    assert r.exit_code == 2 and "identity" in r.output


def test_reference_assisted_verification_undoes_rescaled_requantization(setup, digits):
    h, d, models = setup
    qm, marked, _ = models["w4a8-dynamic"]
    # Adam moves every weight by ~lr per step: after 2 epochs at 1e-3 the re-searched scales re-round the codes
    f = dequantized_float(h.module, marked).train()
    for p in f.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(f.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = d["train_x"], d["train_y"]
    for _ in range(2):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(f(x[b]), y[b]).backward()
            opt.step()
    suspect = requantize(h, f.eval(), "w4a8-dynamic")
    alone = verify_watermark(suspect, key(0))
    with_ref = verify_watermark(suspect, key(0), reference=marked)
    assert with_ref.detected and with_ref.log10_p_value < -40 and with_ref.log10_p_value < alone.log10_p_value - 20
    # a leaked float copy of the marked model is traceable too
    assert verify_watermark(dequantized_float(h.module, marked), key(0), reference=marked).detected
    # the null stays exact: unmarked models (the float source, an independent quantization) and wrong keys
    for other, k in [(h.module, key(0)), (qm.module, key(0)), (suspect, key(9))]:
        r = verify_watermark(other, k, reference=marked)
        assert not r.detected and r.p_value > 1e-4


def test_cli_verify_with_reference(tmp_path, setup):
    from secquant.artifact import save_artifact
    from secquant.cli import app

    h, _, models = setup
    qm, marked, _ = models["w8a16"]
    mf = qm.manifest
    ref, plain = tmp_path / "ref", tmp_path / "plain"
    layers = {n: e.model_dump() for n, e in mf.layers.items()}
    save_artifact(ref, marked, h, mf.recipe, layers, mf.source, mf.calibration)
    save_artifact(plain, qm.module, h, mf.recipe, layers, mf.source, mf.calibration)
    (tmp_path / "k").write_bytes(key(0))
    runner = CliRunner()

    def verify(target, reference):
        return runner.invoke(app, ["watermark", "verify", str(target), "--key", str(tmp_path / "k"), "--json",
                                   "--reference", str(reference)])

    r = verify(ref, ref)
    assert r.exit_code == 0 and json.loads(r.stdout)["detected"]
    r = verify(plain, ref)  # the unmarked quantization of the same float model
    assert r.exit_code == 3 and not json.loads(r.stdout)["detected"]
    r = verify(plain, tmp_path / "nope")
    assert r.exit_code == 2 and "artifact directory" in r.output
