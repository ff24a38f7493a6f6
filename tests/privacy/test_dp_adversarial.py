"""Attacks on the DP claims of DP calibration and DP-SGD QAT (issue 14, items 1-8): each test builds the
hostile input or the attacker's view and asserts the defence holds."""

from __future__ import annotations

import builtins
import hashlib
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import secquant
from secquant.errors import CalibrationError, SecquantError
from secquant.models.digits import splits
from secquant.privacy import budget
from secquant.privacy.dp_calibration import _per_sample_stats, dp_calibrate, static_quantizers
from secquant.privacy.dp_training import PrivacyError, train_dp
from secquant.privacy.provenance import verify_commitment
from secquant.quant.algorithms import quantize_model
from secquant.recipes import get_preset

N_CALIB = 61  # private calibration samples: fewer than the recipe's num_samples (64), so n is not a public number
N_TRAIN = 301  # private training samples (DP-SGD)


def _small(preset: str, n: int = 64):
    r = get_preset(preset)
    return r.model_copy(update={"calibration": r.calibration.model_copy(update={"num_samples": n})})


def _numbers_in(obj, skip: tuple[str, ...] = ()) -> list:
    """Every number in a JSON document, and every integer written inside its strings (keys in `skip` left out)."""
    found: list = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in skip:
                found += _numbers_in(v, skip)
    elif isinstance(obj, list):
        for v in obj:
            found += _numbers_in(v, skip)
    elif isinstance(obj, bool) or obj is None:
        pass
    elif isinstance(obj, (int, float)):
        found.append(obj)
    elif isinstance(obj, str) and not re.fullmatch(r"[0-9a-f]{32,}", obj):  # a digest's digit runs encode no count
        found += [int(t) for t in re.findall(r"(?<![\d.])\d+(?![\d.])", obj)]
    return found


@pytest.fixture(scope="module")
def private_calib(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("dpadv") / "calibA-patients.safetensors"
    save_file({"inputs": splits()["train_x"][:N_CALIB].contiguous()}, str(p))
    return p


@pytest.fixture(scope="module")
def dp_calibrated(digits, private_calib, tmp_path_factory):
    """builtin:digits w8a8 (64 ZeroQ prior samples) calibrated with DP (epsilon 2, default delta) on 61 private
    samples in a file whose name says what it holds; saved, so the manifest is read as published."""
    out = tmp_path_factory.mktemp("dpadv-art") / "a"
    qm = secquant.quantize(digits, _small("w8a8"), calib=private_calib, dp_epsilon=2.0, out=out)
    return qm, json.loads((out / "secquant.json").read_text())


# ----------------------------------------------------------------------------------- 1: replay


def _tiny_run(global_seed: int) -> torch.Tensor:
    torch.manual_seed(3)
    lin = nn.Sequential(nn.Linear(4, 2))  # the same start every time
    torch.manual_seed(global_seed)  # what the old code did (with a published seed): the attacker replays it
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(120, 4, generator=g), torch.randint(0, 2, (120,), generator=g)
    train_dp(lin, x, y, epochs=1, lr=1e-2, batch_size=12, epsilon=4.0, delta=1e-3, accountant="rdp")
    return lin[0].weight.detach().clone()


def test_dp_sgd_runs_are_not_replayable(monkeypatch):
    """Same data, same model, same global seed: the released weights must differ (noise is not replayable).
    The DP count is pinned, so its own noise cannot hide a replayable generator."""
    import secquant.privacy.dp_training as dpt

    monkeypatch.setattr(dpt, "dp_count", lambda n, eps: (n, eps))
    assert not torch.equal(_tiny_run(0), _tiny_run(0))


def test_all_dp_sgd_randomness_comes_from_the_one_secure_generator(monkeypatch):
    """With that generator (and the count) pinned, the global RNG no longer matters: so the Poisson
    sampling and the noise both draw from it, and nothing draws from torch's global (seedable) RNG."""
    import secquant.privacy.dp_training as dpt

    monkeypatch.setattr(dpt, "secure_generator", lambda: torch.Generator().manual_seed(1234))
    monkeypatch.setattr(dpt, "dp_count", lambda n, eps: (n, eps))
    assert torch.equal(_tiny_run(0), _tiny_run(99))


def test_qat_api_refuses_a_seed_with_dp(digits):
    with pytest.raises(SecquantError, match="replayable"):
        secquant.qat(digits, "w8a16", epochs=1, dp_epsilon=8.0, seed=0)


# ----------------------------------------------------------------------------------- 2: no exact private count


def test_dp_calibration_manifest_holds_no_exact_private_count(dp_calibrated):
    qm, manifest = dp_calibrated
    entry = manifest["privacy"]["entries"][0]
    # the DP count may equal n by chance (sd ~6.5 here); it is the one field allowed to
    assert N_CALIB not in _numbers_in(manifest, skip=("num_samples_dp",))
    assert manifest["calibration"]["num_samples"] is None and "add or remove one sample" in entry["neighbouring"]
    assert entry["std_of_each_mean_in_window_units"] != pytest.approx(entry["noise_scale"] / N_CALIB, rel=1e-9)
    assert abs(entry["num_samples_dp"] - N_CALIB) < 7 * entry["noise_scale"]


@pytest.fixture(scope="module")
def dp_sgd_on_a_file(digits, tmp_path_factory):
    """DP-SGD QAT (w8a16, 1 epoch, epsilon 8, default delta) on a 301-sample private training file, with the
    DP count pinned to n + 7 so that any exact n left in the manifest can be told from the released count."""
    import secquant.privacy.dp_training as dpt

    d = tmp_path_factory.mktemp("dpsgd")
    train = d / "trainB-patients.safetensors"
    save_file({"inputs": splits()["train_x"][:N_TRAIN].contiguous(),
               "labels": splits()["train_y"][:N_TRAIN].contiguous()}, str(train))
    real = dpt.dp_count
    mp = pytest.MonkeyPatch()
    mp.setattr(dpt, "dp_count", lambda n, eps: (n + 7, real(n, eps)[1]))
    try:
        qm = secquant.qat(digits, "w8a16", epochs=1, train=train, dp_epsilon=8.0, out=d / "q")
    finally:
        mp.undo()
    return qm, json.loads((d / "q" / "secquant.json").read_text()), train


def test_dp_sgd_manifest_holds_no_exact_private_count(dp_sgd_on_a_file):
    qm, manifest, train = dp_sgd_on_a_file
    dp = manifest["training"]["dp"]
    assert dp["train_samples_dp"] == N_TRAIN + 7
    assert N_TRAIN not in _numbers_in(manifest)
    # nor anything the old code computed from the exact n: Opacus' sample rate 1/ceil(n/b) and its step count
    assert dp["sample_rate"] == pytest.approx(64 / (N_TRAIN + 7), rel=1e-6)
    assert dp["steps"] == int((N_TRAIN + 7) / 64) and dp["expected_batch_size"] == 64
    assert manifest["calibration"]["num_samples"] is None and "seed" not in manifest["training"]
    assert dp["delta"] == budget.DEFAULT_DELTA  # the one default (item 8)
    # item 7: the private training file is identified by an HMAC under the key only the caller got
    assert "trainB" not in json.dumps(manifest)
    assert verify_commitment(train, manifest["calibration"]["source_hmac_sha256"], qm.source_commitment_key)
    assert hashlib.sha256(train.read_bytes()).hexdigest() not in json.dumps(manifest)


# ----------------------------------------------------------------------------------- 3: --calib overlapping the private data


def test_dp_qat_refuses_a_public_calib_that_holds_a_training_sample(digits, tmp_path):
    train_x = splits()["train_x"]
    leaky = tmp_path / "public.safetensors"  # 63 non-members and one member, stored as float64
    save_file({"inputs": torch.cat([splits()["test_x"][:63], train_x[5:6]]).double().contiguous()}, str(leaky))
    with pytest.raises(PrivacyError, match="shares 1 of its 64 samples with the private training set"):
        secquant.qat(digits, _small("w8a8"), epochs=1, dp_epsilon=8.0, calib=leaky, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    whole = tmp_path / "train.safetensors"  # the private training file itself, passed as "public"
    save_file({"inputs": train_x.contiguous()}, str(whole))
    with pytest.raises(PrivacyError, match="not public data"):
        secquant.qat(digits, _small("w8a8"), epochs=1, dp_epsilon=8.0, calib=whole)


def test_dp_qat_records_the_public_calib_hash(digits, tmp_path):
    public, train = tmp_path / "public.safetensors", tmp_path / "train.safetensors"
    save_file({"inputs": splits()["test_x"][:64].contiguous()}, str(public))
    save_file({"inputs": splits()["train_x"][:200].contiguous(), "labels": splits()["train_y"][:200].contiguous()},
              str(train))  # 200 private samples: test time
    qm = secquant.qat(digits, _small("w8a8"), epochs=1, dp_epsilon=8.0, calib=public, train=train, batch_size=50)
    tr = qm.manifest.training
    assert tr["activation_init_sha256"] == hashlib.sha256(public.read_bytes()).hexdigest()
    assert "no sample in common" in tr["activation_init"]


# ----------------------------------------------------------------------------------- 4: reshaping samples into rows


class TokenToy(nn.Module):
    """16 tokens of 8 features per sample, flattened to [batch*16, 8] for every Linear (as a token-wise
    block fed a packed batch is), pooled at the end: dimension 0 of every quantized input is a token, so
    counting rows would count 1,024 "samples" for 64 inputs and bound one sample's influence 16x too low."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(torch.relu(self.proj(x.reshape(-1, 8))))
        return h.reshape(x.shape[0], 16, 4).mean(1)


def _toy_prepared():
    torch.manual_seed(0)
    m = TokenToy().eval()
    recipe = get_preset("w8a8").model_copy(update={"smoothing": None})
    public = torch.randn(64, 16, 8, generator=torch.Generator().manual_seed(1))  # public: random, no data
    quantize_model(m, recipe, lambda: (public[i:i + 16] for i in range(0, 64, 16)), lambda mod, b: mod(b))
    return m, public


def test_dp_calibration_counts_samples_not_activation_rows():
    m, public = _toy_prepared()
    private = torch.randn(64, 16, 8, generator=torch.Generator().manual_seed(2)) * 1.5
    quants = static_quantizers(m)
    stats = _per_sample_stats(m, quants, (private[i:i + 1] for i in range(64)), lambda mod, b: mod(b))
    assert stats.shape[0] == 64  # not 64 * 16 = 1024 rows: the sensitivity is one sample's
    # the statistic of a sample is its extreme over all 16 of its rows
    with torch.no_grad():
        first = private[0].reshape(-1, 8)
    assert stats[0, list(quants).index("proj.input_quant")].tolist() == pytest.approx(
        [float(first.min()), float(first.max())])
    res = dp_calibrate(m, (private[i:i + 1] for i in range(64)), (public[i:i + 1] for i in range(64)),
                       lambda mod, b: mod(b), 1.0, 1e-5)
    assert abs(res.ledger["num_samples_dp"] - 64) < 7 * res.ledger["noise_scale"] < 200


def test_dp_calibration_refuses_batches_of_several_samples():
    m, public = _toy_prepared()
    private = torch.randn(64, 16, 8)
    with pytest.raises(CalibrationError, match="one sample per batch"):
        dp_calibrate(m, (private[i:i + 16] for i in range(0, 64, 16)), (public[i:i + 1] for i in range(64)),
                     lambda mod, b: mod(b), 1.0, 1e-5)


# ----------------------------------------------------------------------------------- 5: --dp-epsilon with nothing private to protect


@pytest.mark.parametrize("preset", ["w8a8-dynamic", "w4a16"])
def test_dp_epsilon_on_a_recipe_that_reads_no_private_data_says_so(digits, private_calib, monkeypatch, preset):
    import secquant.models.classifier as adapter_module  # where the tensor classifiers' data files are read

    opened: list[str] = []
    real = adapter_module.read_tensors
    monkeypatch.setattr(adapter_module, "read_tensors", lambda p: opened.append(str(p)) or real(p))
    qm = secquant.quantize(digits, _small(preset, 32), calib=private_calib, dp_epsilon=1.0)
    assert opened == []  # the private file was never read
    (entry,) = qm.manifest.privacy.entries
    assert entry["epsilon"] == 0.0 and "read no private data" in entry["stage"]
    assert "w8a8, w4a4, w2a8" in entry["statement"] and preset in entry["statement"].split("do not:")[1]
    if preset == "w4a16":  # it does read calibration inputs (AWQ-style scales): synthetic ones, and says so
        assert list(entry["public_stages"]) == ["activation-aware scale search (AWQ/SmoothQuant-style scales and "
                                                "clipping)"]
        assert qm.manifest.calibration.data == "synthetic"
    else:
        assert entry["public_stages"].startswith("none") and qm.manifest.calibration.data == "none"


def test_cli_prints_the_epsilon_zero_entry(cli, private_calib, tmp_path):
    r = cli("quantize", "builtin:digits", "--preset", "w8a8-dynamic", "--calib", private_calib, "--dp-epsilon", "1",
            "--out", tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    assert "read no private data (epsilon = 0)" in r.stderr and "Presets with static activation ranges" in r.stderr


# ----------------------------------------------------------------------------------- 6: --calib synthetic opens no data


def test_synthetic_calibration_opens_no_data_file(digits, monkeypatch):
    """The float weights are cached (the `digits` fixture); from there a data-free run must not load the
    digits data: not through secquant's split, not through scikit-learn, not by opening its files."""
    import sklearn.datasets

    import secquant.models.digits as dg

    def refuse(*a, **k):
        raise AssertionError("a data-free run read the digits data")

    monkeypatch.setattr(dg, "splits", refuse)
    monkeypatch.setattr(sklearn.datasets, "load_digits", refuse)
    data_dir = str(Path(sklearn.datasets.__file__).parent)
    real_open, opened = builtins.open, []

    def spy(file, *a, **k):
        if str(file).startswith(data_dir):
            opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    qm = secquant.quantize("builtin:digits", _small("w8a8", 32), calib="synthetic")
    assert opened == [] and qm.manifest.calibration.data == "synthetic"


def test_dp_ledger_says_where_the_data_free_prior_comes_from(dp_calibrated):
    _, manifest = dp_calibrated
    prior = manifest["privacy"]["entries"][0]["public_prior"]
    assert "trained without differential privacy" in prior and "member split" in prior


# ----------------------------------------------------------------------------------- 7: file names


def test_private_file_name_and_plain_hash_are_not_published(dp_calibrated, private_calib):
    qm, manifest = dp_calibrated
    text = json.dumps(manifest)
    assert "calibA" not in text and "patients" not in text
    # a plain sha256 of the private file would let anyone holding the other records test a candidate
    assert hashlib.sha256(private_calib.read_bytes()).hexdigest() not in text
    cal = manifest["calibration"]
    assert cal["source_sha256"] is None
    assert verify_commitment(private_calib, cal["source_hmac_sha256"], qm.source_commitment_key)
    assert not verify_commitment(private_calib, cal["source_hmac_sha256"], "00" * 32)


def test_file_name_is_recorded_when_asked(digits, private_calib):
    qm = secquant.quantize(digits, "w8a8-dynamic", calib=private_calib, record_source_name=True)
    assert qm.manifest.calibration.data == "none"  # reads no data: nothing to name
    qm = secquant.quantize(digits, _small("w8a8", 32), calib=private_calib, record_source_name=True)
    assert qm.manifest.calibration.source == str(private_calib)
    assert qm.manifest.calibration.source_sha256 == hashlib.sha256(private_calib.read_bytes()).hexdigest()
    qm = secquant.quantize(digits, _small("w8a8", 32), calib=private_calib)
    assert "calibA" not in qm.manifest.to_json()


# ----------------------------------------------------------------------------------- 8: one delta rule, one default


def test_one_delta_rule_in_both_mechanisms(digits, private_calib):
    too_big = 1.5 / N_CALIB  # < 1, which DP calibration used to accept; not below 1/n
    with pytest.raises(PrivacyError, match="not below 1/n"):
        secquant.quantize(digits, _small("w8a8"), calib=private_calib, dp_epsilon=8.0, dp_delta=too_big)
    x, y = torch.randn(N_CALIB, 4), torch.randint(0, 2, (N_CALIB,))
    with pytest.raises(PrivacyError, match="not below 1/n"):
        train_dp(nn.Sequential(nn.Linear(4, 2)), x, y, epochs=1, lr=1e-2, batch_size=8, epsilon=8.0, delta=too_big)


def test_one_default_delta(dp_calibrated):
    assert inspect.signature(secquant.quantize).parameters["dp_delta"].default is None
    assert inspect.signature(secquant.qat).parameters["dp_delta"].default is None
    _, manifest = dp_calibrated
    assert manifest["privacy"]["entries"][0]["delta"] == budget.DEFAULT_DELTA


def test_cli_records_the_file_name_only_when_asked(cli, private_calib, tmp_path):
    recipe = tmp_path / "w8a8-32.json"
    recipe.write_text(_small("w8a8", 32).model_dump_json())
    for flag, named in [((), False), (("--record-source-name",), True)]:
        out = tmp_path / f"q{int(named)}"
        r = cli("quantize", "builtin:digits", "--recipe", recipe, "--calib", private_calib, *flag, "--out", out)
        assert r.exit_code == 0, r.stderr
        assert ("calibA-patients" in (out / "secquant.json").read_text()) == named
