"""Keyed spread-spectrum watermark: the bound, the calibrated null, embedding, fidelity, artifact and CLI round
trips. The attacks (noise, re-quantization, fine-tuning, channel rescaling and permutation) are in
adversarial/test_watermark_attacks.py."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import stat

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from typer.testing import CliRunner

import secquant
from secquant.errors import ArtifactError
from secquant.models.digits import splits
from secquant.security.watermark import (
    BD_CONSTANT,
    SCHEME,
    WatermarkError,
    _code_position,
    _layer_weight,
    as_key,
    collect_evidence,
    embed_watermark,
    int_layers,
    keygen,
    score,
    tail_bound,
    verify_watermark,
)
from secquant.security.watermark_params import DEFAULT_MAX_TAU, DEFAULT_THRESHOLD


def key(i: int) -> bytes:
    return hashlib.sha256(f"test-watermark-key-{i}".encode()).digest()


def acc(module, d) -> float:
    with torch.no_grad():
        return float((module(d["test_x"]).argmax(1) == d["test_y"]).float().mean()) * 100


@pytest.fixture(scope="module")
def setup(digits):
    """Unmarked and marked (key 0, default band) digits models for a per-channel int8 and a grouped int4 preset."""
    d = splits()
    out = {}
    for preset in ("w8a16", "w4a8-dynamic"):
        qm = secquant.quantize(digits, preset)
        marked = copy.deepcopy(qm.module)
        rep = embed_watermark(marked, digits.module, key(0))
        out[preset] = (qm, marked, rep)
    return digits, d, out


def save(out, module, h, qm, watermark=None):
    from secquant.artifact import save_artifact

    mf = qm.manifest
    save_artifact(out, module, h, mf.recipe, {n: e.model_dump() for n, e in mf.layers.items()}, mf.source,
                  mf.calibration, watermark=watermark)
    return out


# ------------------------------------------------------------------------------------------- keys


def test_key_stream_is_keyed_deterministic_and_balanced():
    k0, k1 = as_key(key(0)), as_key(key(1))
    s = k0.layer_signs("features.0", 100_003)
    assert s.dtype == torch.float32 and s.numel() == 100_003 and set(s.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(s, as_key(key(0)).layer_signs("features.0", 100_003))
    assert not torch.equal(s, k1.layer_signs("features.0", 100_003))
    assert not torch.equal(s, k0.layer_signs("features.3", 100_003))
    assert abs(float(s.mean())) < 4 / math.sqrt(1e5)
    assert torch.equal(k0.layer_signs("x", 10), k0.layer_signs("x", 20)[:10])  # a prefix, whatever the length
    assert k0.key_id != k1.key_id and len(k0.key_id) == 16 and k0.key_id not in key(0).hex()
    assert len(k0.commitment) == 64 and k0.commitment.startswith(k0.key_id) and k0.commitment != k1.commitment
    assert key(0).hex() not in k0.commitment and k0.secret.hex() not in k0.commitment
    assert k0.secret.hex() not in repr(k0)
    # known answers: the commitment is the one scheme v1 published for this key file (unchanged), and the v2
    # sign stream is frozen so that marks made today stay verifiable
    k = as_key(b"k" * 32)
    assert k.commitment == "abeade3de4638369aed425b94034a4d730d56c05a38c0dab077db24844ed4b97"
    assert k.layer_signs("a", 12).tolist() == [1, 1, 1, -1, -1, -1, 1, -1, -1, 1, -1, 1]


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


# ------------------------------------------------------------------------------------------- the bound


def test_tail_bound_is_the_stated_formula_and_survives_underflow():
    assert BD_CONSTANT >= 1.0 / (4.0 * norm.sf(math.sqrt(2.0)))  # the optimal constant, rounded up, not down
    for z in (0.5, 1.0, 2.0, 4.75, 5.0, 8.0, 20.0):
        p, lp = tail_bound(z)
        want = min(1.0, math.exp(-z * z / 2), BD_CONSTANT * norm.sf(z))
        assert p == pytest.approx(want, rel=1e-9) and lp == pytest.approx(math.log10(want), abs=1e-9)
    assert tail_bound(0.0) == (1.0, 0.0) and tail_bound(-3.0) == (1.0, 0.0)
    p, lp = tail_bound(60.0)  # far past double underflow: the log is still exact
    assert p == 0.0 and lp == pytest.approx((math.log(BD_CONSTANT) + norm.logsf(60.0)) / math.log(10), abs=1e-9)
    assert lp < -780
    # detection at p <= 1e-6 needs z >= 4.982 (the Gaussian tail alone would need 4.753, Hoeffding alone 5.257)
    assert tail_bound(4.98)[0] > DEFAULT_THRESHOLD >= tail_bound(4.983)[0]


def test_tail_bound_dominates_exact_rademacher_tails():
    # equal weights: sum of n signs = 2 Binomial(n, 1/2) - n, whose tail is exact
    for n in (1, 2, 3, 5, 10, 40, 200, 1000, 10_000):
        ks = np.arange(n // 2, n + 1)
        z = (2 * ks - n) / math.sqrt(n)
        exact = binom.sf(ks - 1, n, 0.5)  # P(B >= k)
        bound = np.array([tail_bound(float(x))[0] for x in z])
        assert np.all(bound >= exact * (1 - 1e-12)), n
    # the Bentkus-Dzindzalieta constant is tight: two equal weights reach it at z = sqrt 2 (P = 1/4), so the Gaussian
    # tail (0.079 there) is not a valid bound, and neither is a smaller constant
    assert tail_bound(math.sqrt(2))[0] == pytest.approx(0.25, rel=1e-5) and tail_bound(math.sqrt(2))[0] >= 0.25
    assert norm.sf(math.sqrt(2)) < 0.25 / 3
    # unequal weights, Monte Carlo: the empirical tail stays under the bound
    g = np.random.default_rng(0)
    for a in (g.exponential(size=7), np.array([3.0, 1, 1, 1, 1]), g.standard_normal(50) ** 3):
        a = a / np.linalg.norm(a)
        s = (g.integers(0, 2, size=(200_000, a.size)) * 2 - 1) @ a
        for x in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):
            emp = float((s >= x - 1e-12).mean())
            assert emp <= tail_bound(x)[0] + 3 * math.sqrt(tail_bound(x)[0] / 200_000) + 1e-6, (a, x, emp)


# ------------------------------------------------------------------------------------------- null and detection


def test_unmarked_models_are_not_detected_and_the_null_is_calibrated(setup):
    h, _, models = setup
    qm, marked, _ = models["w8a16"]
    # 200 keys against the unmarked quantization and against the model marked with key 0 (evidence is key-free)
    for suspect in (qm.module, marked):
        ev = collect_evidence(suspect, reference=marked, float_model=h.module)
        zs = np.array([score(ev, key(1000 + i)).z for i in range(200)])
        ps = np.array([tail_bound(z)[0] for z in zs])
        assert ps.min() > DEFAULT_THRESHOLD and zs.max() < 4.5
        assert abs(zs.mean()) < 0.3 and 0.8 < zs.std() < 1.2  # under H0, z is a unit-variance sum of random signs
        assert (ps <= 0.1).mean() <= 0.16  # the bound is conservative: P(p <= 0.1) <= 0.1 (+ sampling slack)
    for qm_, marked_, _ in models.values():
        for i in range(1, 4):
            for m in (qm_.module, marked_):
                r = verify_watermark(m, key(i), reference=marked_, float_model=h.module)
                assert not r.detected and r.p_value > 1e-4


def test_marked_models_are_detected_with_tiny_p(setup):
    h, _, models = setup
    for preset, (_, marked, rep) in models.items():
        r = verify_watermark(marked, key(0), float_model=h.module)
        n = sum(m.rows * m.cols for m in int_layers(marked).values())
        assert rep.n == r.n == n and rep.scheme == r.scheme == SCHEME
        assert rep.tau == pytest.approx(DEFAULT_MAX_TAU)  # digits is small: the default band is the cap
        assert r.detected and r.log10_p_value < -100, (preset, r.log10_p_value)
        # z ~ tau sqrt(12 N): the signal grows like N, the noise like sqrt(N)
        assert 0.7 * rep.tau * math.sqrt(12 * n) < r.z < 1.3 * rep.tau * math.sqrt(12 * n), (preset, r.z)
        assert r.z == pytest.approx(rep.z, rel=0.05)  # alignment (on by default) costs little on a clean copy
        assert set(r.layers) == set(int_layers(marked)) and all("align" in v for v in r.layers.values())
        assert rep.record() == {"scheme": SCHEME, "key_id": rep.key_id, "commitment": rep.commitment, "tau": rep.tau}


def test_z_grows_with_the_square_root_of_the_number_of_weights():
    torch.manual_seed(0)
    zs = {}
    for width in (64, 256):
        net = torch.nn.Sequential(torch.nn.Linear(width, width))
        qm = secquant.quantize(net, "w8a16")
        rep = embed_watermark(qm.module, net, key(7), tau=0.05)
        zs[width] = verify_watermark(qm.module, key(7), float_model=net).z
        assert rep.z == pytest.approx(zs[width], rel=0.05)
    assert zs[256] / zs[64] == pytest.approx(4.0, rel=0.25)  # 16x the weights, 4x the z


def test_marking_moves_only_band_elements_one_step_toward_their_sign(setup):
    h, _, models = setup
    for qm, marked, rep in models.values():
        changed = 0
        for name, m in int_layers(marked).items():
            ref = int_layers(qm.module)[name]
            before, after = ref.weight_codes().to(torch.int64), m.weight_codes().to(torch.int64)
            u = _code_position(ref, _layer_weight(h.module, ref, name))
            moved = after != before
            changed += int(moved.sum())
            assert int((after - before).abs().max()) <= 1
            assert int(after.min()) >= 0 and int(after.max()) <= 2 ** m.weight_args.bits - 1
            dist = (u - u.floor() - 0.5).abs()
            assert bool((dist[moved] <= rep.tau + 1e-9).all())  # only elements within tau of the boundary
            signs = as_key(key(0)).layer_signs(name, m.rows * m.cols).reshape(m.rows, m.cols)
            assert bool(((after - before)[moved] == signs[moved].to(torch.int64)).all())  # toward the keyed sign
            assert bool(((after.double() - u).abs()[moved] <= 0.5 + rep.tau + 1e-9).all())
            # the added squared error is at most 2 tau per moved element, about tau^2 per element on average
            added = float(((after.double() - u) ** 2).sum() - ((before.double() - u) ** 2).sum())
            assert added <= 2 * rep.tau * int(moved.sum()) + 1e-9
        assert changed == rep.changed and 0.5 * rep.tau * rep.n < changed < 1.5 * rep.tau * rep.n


def test_fidelity_cost_on_digits(setup):
    """Bar: over 4 keys, held-out accuracy drops by at most 0.25 points on average and 0.5 at worst. One standard
    error of accuracy on 899 held-out digits is sqrt(0.98 * 0.02 / 899) = 0.47 points, and one digit is 0.11: a
    cost under that is below what the test set can resolve (the bench measures the cost per preset)."""
    h, d, models = setup
    for preset, (qm, _, _) in models.items():
        base = acc(qm.module, d)
        costs = []
        for i in range(4):
            m = copy.deepcopy(qm.module)
            embed_watermark(m, h.module, key(i))
            costs.append(base - acc(m, d))
        assert sum(costs) / len(costs) <= 0.25 + 1e-9 and max(costs) <= 0.5 + 1e-9, (preset, costs)


def test_gptq_codes_are_marked_between_floor_and_ceil(digits):
    qm = secquant.quantize(digits, "w4a16-gptq")
    marked = copy.deepcopy(qm.module)
    rep = embed_watermark(marked, digits.module, key(3))
    assert rep.changed > 0 and verify_watermark(marked, key(3), float_model=digits.module).detected
    assert marked.classifier[1].rotation_block == 128  # the preset's rotation: marks land on rotated codes too
    for name, m in int_layers(marked).items():
        before = int_layers(qm.module)[name].weight_codes().to(torch.int64)
        assert int((m.weight_codes().to(torch.int64) - before).abs().max()) <= 1


# ------------------------------------------------------------------------------------------- refusals


def test_refusals(setup, digits, tmp_path):
    h, _, models = setup
    qm, marked, _ = models["w8a16"]
    m = copy.deepcopy(qm.module)
    with pytest.raises(WatermarkError, match="tau"):
        embed_watermark(m, h.module, key(0), tau=0.7)
    with pytest.raises(WatermarkError, match="not both"):
        embed_watermark(m, h.module, key(0), tau=0.1, strength=10)
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(WatermarkError, match="no layer"):
        embed_watermark(m, other, key(0))
    assert torch.equal(m.features[0].weight_codes(), qm.module.features[0].weight_codes())  # nothing half-marked
    nf4 = secquant.quantize(digits, "nf4")
    with pytest.raises(WatermarkError, match="integer"):
        embed_watermark(nf4.module, digits.module, key(0))
    with pytest.raises(WatermarkError, match="integer"):
        verify_watermark(nf4.module, key(0), float_model=digits.module)
    with pytest.raises(WatermarkError, match="threshold"):
        verify_watermark(marked, key(0), float_model=h.module, threshold=0.9)
    # a bare module carries no manifest naming its float model: the verifier must be given one
    with pytest.raises(WatermarkError, match="float model"):
        verify_watermark(marked, key(0))


def test_old_scheme_artifacts_get_a_clear_message(setup, tmp_path):
    h, _, models = setup
    qm, marked, _ = models["w8a16"]
    art = save(tmp_path / "old", marked, h, qm, watermark={"scheme": "secquant.watermark.parity.v1",
                                                           "key_id": "0" * 16, "commitment": "0" * 64, "tau": 0.06})
    with pytest.raises(WatermarkError, match="old scheme.*parity.*re-embed"):
        verify_watermark(art, key(0))
    from secquant.cli import app

    (tmp_path / "k").write_bytes(key(0))
    r = CliRunner().invoke(app, ["watermark", "verify", str(art), "--key", str(tmp_path / "k")])
    assert r.exit_code == 2 and "old scheme" in r.output and "Traceback" not in r.output


def test_float_reference_comes_from_the_manifest_and_is_hash_checked(setup, tmp_path):
    h, _, models = setup
    qm, marked, _ = models["w8a16"]
    art = save(tmp_path / "art", marked, h, qm)
    # the artifact names builtin:digits; it is rebuilt and its hash matches the manifest's source record
    r = verify_watermark(art, key(0))
    assert r.detected and not r.notes
    assert r.z == pytest.approx(verify_watermark(marked, key(0), float_model=h.module).z, rel=1e-9)
    # a different float model given explicitly is used (the bound stays valid), with a note that it differs
    other = copy.deepcopy(h.module)
    with torch.no_grad():
        other.classifier[3].weight.add_(0.01)
    r = verify_watermark(art, key(0), float_model=other)
    assert r.notes and "differs" in r.notes[0]
    # a manifest whose recorded source no longer matches what its spec rebuilds: refused, not trusted; the owner
    # then names the float model explicitly
    mf = json.loads((art / "secquant.json").read_text())
    mf["source"]["weights_sha256"] = "0" * 64
    (art / "secquant.json").write_text(json.dumps(mf))
    with pytest.raises(WatermarkError, match="source hash differs"):
        verify_watermark(art, key(0))
    r = verify_watermark(art, key(0), float_model=h.module)
    assert r.detected and r.notes


# ------------------------------------------------------------------------------------------- artifacts and CLI


def test_verify_reads_the_artifact_and_refuses_a_tampered_one(setup, tmp_path):
    h, _, models = setup
    qm, marked, _ = models["w8a16"]
    out = save(tmp_path / "art", marked, h, qm)
    from_dir = verify_watermark(out, key(0))
    from_mod = verify_watermark(marked, key(0), float_model=h.module)
    assert (from_dir.n, from_dir.detected) == (from_mod.n, True) and from_dir.z == pytest.approx(from_mod.z)
    reloaded = secquant.load(out, allow_unsealed=True)
    assert verify_watermark(reloaded, key(0)).z == pytest.approx(from_mod.z)
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
    assert summary["verify"]["detected"] and summary["changed"] > 0 and summary["n"] == summary["verify"]["n"]
    assert summary["commitment"] == as_key(k).commitment and summary["key_id"] == as_key(k).key_id
    recorded = json.loads((art / "secquant.json").read_text())["watermark"]  # the commitment, never the key
    assert recorded == {"scheme": SCHEME, "key_id": as_key(k).key_id, "commitment": as_key(k).commitment,
                        "tau": summary["tau"]}
    assert as_key(k).secret.hex() not in json.dumps(recorded) and k.read_text().strip() not in json.dumps(recorded)
    r = runner.invoke(app, ["watermark", "verify", str(art), "--key", str(k), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["detected"] and rep["false_positive_probability"] <= 1e-6 and rep["n"] == summary["n"]
    assert {"z", "n", "p_value", "log10_p_value", "threshold", "layers", "key_id", "bound"} <= set(rep)
    r = runner.invoke(app, ["watermark", "verify", str(art), "--key", str(k2)])
    assert r.exit_code == 3 and "not detected" in r.stdout
    r = runner.invoke(app, ["watermark", "verify", str(art), "--key", str(k), "--threshold", "0.7"])
    assert r.exit_code == 2 and "threshold must be a probability" in r.output  # not a probability bound
    r = runner.invoke(app, ["watermark", "verify", str(tmp_path / "nope"), "--key", str(k)])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["watermark", "embed", "builtin:digits", "--preset", "w8a16", "--key", str(k),
                            "--out", str(art)])
    assert r.exit_code == 2 and "exists" in r.output
    weak = tmp_path / "weak"  # a band too narrow to carry a detectable mark: refused, nothing written
    r = runner.invoke(app, ["watermark", "embed", "builtin:digits", "--preset", "w8a16", "--key", str(k),
                            "--out", str(weak), "--tau", "0.001"])
    assert r.exit_code == 2 and "too weak" in r.output and not weak.exists()


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


def test_cli_verify_with_reference_and_float(tmp_path, setup):
    from secquant.cli import app

    h, _, models = setup
    qm, marked, _ = models["w8a16"]
    ref = save(tmp_path / "ref", marked, h, qm)
    plain = save(tmp_path / "plain", qm.module, h, qm)
    (tmp_path / "k").write_bytes(key(0))
    runner = CliRunner()

    def verify(target, *extra):
        return runner.invoke(app, ["watermark", "verify", str(target), "--key", str(tmp_path / "k"), "--json", *extra])

    r = verify(ref, "--reference", str(ref), "--float", "builtin:digits")
    assert r.exit_code == 0 and json.loads(r.stdout)["detected"]
    r = verify(plain, "--reference", str(ref))  # the unmarked quantization of the same float model
    assert r.exit_code == 3 and not json.loads(r.stdout)["detected"]
    r = verify(plain, "--reference", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "artifact directory" in r.output
    r = verify(ref, "--float", "builtin:nope")
    assert r.exit_code == 2 and "unknown built-in" in r.output
