"""Membership-inference audit: attack statistics, shadow training, the audit end to end, CLI, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from secquant.errors import ModelError, SecquantError
from secquant.audits.membership import (
    JSON_NAME, PLOT_NAME, audit_membership, fpr_note, lira_offline_scores, loss_scores, privacy_section,
    roc_metrics, tpr_at_fpr,
)
from secquant.audits.shadow import (
    TargetRecipe, TrainConfig, keep_matrix, logit_confidence, run_shadows, shadow_seed, train_classifier,
)

SMALL = {"shadows": 4, "epochs": 2}


# ------------------------------------------------------------------------------------------- statistics

def test_logit_confidence_is_log_odds_of_true_class():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 10, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 10, (50,), generator=g)
    p = torch.softmax(logits, 1).gather(1, labels.view(-1, 1)).squeeze(1)
    np.testing.assert_allclose(logit_confidence(logits, labels), torch.log(p / (1 - p)).numpy(), rtol=1e-9)
    # stable where p -> 1 (1 - p underflows in float64): phi = z_y - max other logit
    big = torch.tensor([[60.0, 0.0, -5.0]], dtype=torch.float64)
    assert logit_confidence(big, torch.tensor([0]))[0] == pytest.approx(60.0 - np.log(1 + np.exp(-5.0)))
    np.testing.assert_allclose(loss_scores(logits, labels), torch.log(p).numpy(), rtol=1e-9)


def test_tpr_at_fpr_reads_the_step_curve_without_interpolating_up():
    # 4 non-members, 4 members: FPR moves in steps of 0.25
    is_member = np.array([1, 1, 0, 1, 0, 1, 0, 0], dtype=bool)
    scores = np.array([9, 8, 7, 6, 5, 4, 3, 2], dtype=float)
    m = roc_metrics(is_member, scores)
    assert m["auc"] == pytest.approx(roc_auc_score(is_member, scores))
    assert m["tpr_at_1pct_fpr"] == 0.5 and m["tpr_at_0.1pct_fpr"] == 0.5  # best TPR with zero false positives
    fpr, tpr = np.array([0.0, 0.0, 0.25, 0.25, 1.0]), np.array([0.0, 0.5, 0.5, 0.75, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.2) == 0.5 and tpr_at_fpr(fpr, tpr, 0.25) == 0.75
    assert "zero false positives" in fpr_note(899) and "at most 8 false positive" in fpr_note(899)
    assert "zero" not in fpr_note(5000)


def test_keep_matrix_balanced_and_seeded():
    k = keep_matrix(5, 300, seed=3)
    assert k.shape == (5, 300) and (k.sum(0) == 2).all()  # every example IN for floor(5/2) shadows
    assert np.array_equal(k, keep_matrix(5, 300, seed=3)) and not np.array_equal(k, keep_matrix(5, 300, seed=4))
    assert shadow_seed(0, 1) != shadow_seed(0, 2) and shadow_seed(0, 1) == shadow_seed(0, 1)
    with pytest.raises(SecquantError, match="at least 2"):
        keep_matrix(1, 10, 0)


def test_lira_offline_separates_a_planted_signal_and_not_noise():
    rng = np.random.default_rng(0)
    n, s = 400, 16
    keep = keep_matrix(s, n, 0)
    mu = rng.normal(0, 3, n)  # per-example difficulty: the reason LiRA beats a global threshold
    shadow = mu + rng.normal(0, 0.5, (s, n))
    member = np.arange(n) < n // 2
    target = mu + rng.normal(0, 0.5, n) + np.where(member, 1.5, 0.0)
    for var in ("global", "per-example"):
        sc, used = lira_offline_scores(target, shadow, keep, var)
        assert used.startswith(var)
        assert roc_auc_score(member, sc) > 0.9
        assert roc_auc_score(member, target) < 0.75  # raw confidence is swamped by difficulty
    null, _ = lira_offline_scores(mu + rng.normal(0, 0.5, n), shadow, keep)
    assert abs(roc_auc_score(member, null) - 0.5) < 0.1
    # pooled global sigma recovers the true within-example spread
    sc, _ = lira_offline_scores(mu + 1.0, shadow, keep, "global")
    assert np.median(sc) == pytest.approx(1.0 / 0.5, rel=0.15)
    _, used = lira_offline_scores(target, shadow[:2], keep_matrix(2, n, 0), "auto")
    assert "one OUT shadow" in used
    with pytest.raises(SecquantError, match="per-example"):
        lira_offline_scores(target, shadow[:2], keep_matrix(2, n, 0), "per-example")


# ------------------------------------------------------------------------------------------- shadows

def test_shadow_training_is_the_digits_recipe(digits):
    """Shadows are 'trained with the same recipe': on the member split with seed 0 they are train_digits."""
    from secquant.models.digits import splits, train_digits

    s = splits()
    ref = train_digits(epochs=2, seed=0).state_dict()
    got = train_classifier(digits.module, s["train_x"], s["train_y"], seed=0, cfg=TrainConfig(epochs=2)).state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # the template's own weights are untouched
    assert not torch.equal(digits.module.state_dict()["classifier.3.weight"], got["classifier.3.weight"])


# ------------------------------------------------------------------------------------------- the audit

@pytest.fixture(scope="module")
def audit(digits, digits_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    arts = [digits_artifact("w8a8"), digits_artifact("w4a8-dynamic")]
    res = audit_membership(digits, arts, seed=0, out=out, **SMALL)
    return res, out, arts


def test_audit_numbers_are_real_and_reproducible(audit, digits):
    res, _, arts = audit
    from secquant.models.digits import splits

    assert list(res["models"]) == ["fp32", "w8a8", "w4a8-dynamic"]
    s = splits()
    fp = res["models"]["fp32"]
    assert (fp["n_members"], fp["n_nonmembers"]) == (len(s["train_y"]), len(s["test_y"])) == (898, 899)
    assert fp["shadows"] == 4 and fp["seed"] == 0 and fp["artifact"] is None
    assert res["models"]["w8a8"]["artifact"] == str(arts[0]) and res["models"]["w8a8"]["recipe"] == "w8a8"
    # the loss attack's AUC is the AUC of -cross-entropy over members vs non-members, recomputed here
    with torch.no_grad():
        x = torch.cat([s["train_x"], s["test_x"]])
        y = torch.cat([s["train_y"], s["test_y"]])
        ce = torch.nn.functional.cross_entropy(digits.module(x).double(), y, reduction="none").numpy()
    member = np.r_[np.ones(898), np.zeros(899)]
    assert fp["loss"]["auc"] == pytest.approx(roc_auc_score(member, -ce), abs=1e-6)
    assert fp["loss"]["auc"] > 0.5  # the float model fits its members (100% train accuracy) better
    assert fp["accuracy_members"] == 1.0 and fp["accuracy_nonmembers"] > 0.95
    for m in res["models"].values():
        for a in ("loss", "lira_offline"):
            assert 0.0 <= m[a]["tpr_at_0.1pct_fpr"] <= m[a]["tpr_at_1pct_fpr"] <= 1.0
            assert 0.3 < m[a]["auc"] < 0.9
    assert res["variance"].startswith("global") and "zero false positives" in res["note"]
    # same seed -> identical numbers: test_cli_audit_privacy reruns this audit; another seed -> other shadows
    other = audit_membership(digits, arts[:1], seed=1, shadows=2, epochs=2)
    assert other["models"]["fp32"]["lira_offline"]["auc"] != fp["lira_offline"]["auc"]
    assert other["models"]["fp32"]["loss"] == fp["loss"]  # the loss attack needs no shadows


def test_audit_writes_json_plot_and_section(audit):
    res, out, _ = audit
    on_disk = json.loads((out / JSON_NAME).read_text())
    assert on_disk == json.loads(json.dumps(res))
    svg = (out / PLOT_NAME).read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "fp32 lira_offline" in svg
    fpr = res["roc"]["w8a8"]["lira_offline"]["fpr"]
    assert fpr[0] == 0.0 and fpr[-1] == 1.0 and fpr == sorted(fpr)
    sec = privacy_section(res)
    assert sec["title"] == "Privacy" and "<svg" in sec["html"] and "w4a8-dynamic" in sec["html"]
    assert sorted(p.name for p in out.iterdir()) == sorted([JSON_NAME, PLOT_NAME])  # no temp files left
    with pytest.raises(SecquantError, match="--overwrite"):
        audit_membership("builtin:digits", [], out=out, **SMALL)


def test_quantized_shadows_follow_the_target_recipe(digits):
    """A w2a8 shadow is quantized like a w2a8 target: its confidences differ from the float shadow's."""
    from secquant.models.digits import splits
    from secquant.recipes import get_preset

    s = splits()
    x, y = s["test_x"][:200], s["test_y"][:200]
    keep = keep_matrix(2, len(y), 0)
    targets = [TargetRecipe("fp32"), TargetRecipe("w8a8", get_preset("w8a8")), TargetRecipe("w2a8", get_preset("w2a8"))]
    phi = run_shadows(digits.module, x, y, keep, 0, targets, TrainConfig(epochs=3))
    assert phi.shape == (2, 3, 200)
    d8 = np.abs(phi[:, 1] - phi[:, 0]).mean()
    d2 = np.abs(phi[:, 2] - phi[:, 0]).mean()
    assert 0 < d8 < d2  # 8-bit is close to float, 2-bit far from it


def test_ray_local_matches_local_training(digits):
    """`--ray local`: shadows as Ray tasks in worker processes give bit-identical confidences."""
    ray = pytest.importorskip("ray")
    from secquant.models.digits import splits

    s = splits()
    x, y = s["train_x"][:300], s["train_y"][:300]
    keep = keep_matrix(2, len(y), 5)
    targets = [TargetRecipe("fp32")]
    here = run_shadows(digits.module, x, y, keep, 5, targets, TrainConfig(epochs=2))
    try:
        remote = run_shadows(digits.module, x, y, keep, 5, targets, TrainConfig(epochs=2), ray_address="local",
                             num_cpus=1)
    except SecquantError as e:  # pragma: no cover - depends on the box
        if "could not start" in str(e):
            pytest.skip(f"ray cannot start on this machine: {e}")
        raise
    assert not ray.is_initialized()  # the instance the audit started is shut down again
    assert here.shape == (2, 1, 300) and np.array_equal(here, remote)


# ------------------------------------------------------------------------------------------- refusals

def test_refusals(digits, tmp_path):
    import secquant
    from secquant.models import ModelHandle
    from secquant.models.digits import train_digits

    with pytest.raises(SecquantError, match="at least 2"):
        audit_membership(digits, [], shadows=1)
    # same architecture, other weights: once as builtin:digits (rebuilt from the manifest), once from a module
    retrained = ModelHandle(train_digits(epochs=1, seed=1), "builtin:digits", digits.rebuild,
                            digits.adapter)
    secquant.quantize(retrained, "w8a8", out=tmp_path / "other")
    other = secquant.quantize(retrained.module, "w8a16", out=tmp_path / "module")
    for bad in (tmp_path / "other", tmp_path / "module", other):
        with pytest.raises(ModelError, match="different model"):
            audit_membership(digits, [bad], **SMALL)
    # the same module's artifact is accepted (rebuilt on a copy of the float architecture)
    same = secquant.quantize(digits.module, "w8a16", out=tmp_path / "same")
    res = audit_membership(digits, [tmp_path / "same"], shadows=2, epochs=1)
    s = secquant.models.splits()
    acc = float((same(s["test_x"]).argmax(1) == s["test_y"]).double().mean())
    assert res["models"]["w8a16"]["accuracy_nonmembers"] == pytest.approx(acc)
    with pytest.raises(ModelError, match="member/non-member split"):
        audit_membership("tiny_factory:tiny", [], **SMALL)
    with pytest.raises(SecquantError, match="variance"):
        audit_membership(digits, [], variance="median", **SMALL)


# ------------------------------------------------------------------------------------------- CLI

def test_cli_audit_privacy(cli, audit, digits_artifact, tmp_path):
    res, _, _ = audit
    out = tmp_path / "report"
    r = cli("audit", "privacy", "--float", "builtin:digits", "--quantized", digits_artifact("w8a8"),
            "--quantized", digits_artifact("w4a8-dynamic"), "--shadows", "4", "--epochs", "2", "--seed", "0",
            "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "lira_offline" in r.stdout and "w4a8-dynamic" in r.stdout and "zero false positives" in r.stdout
    got = json.loads((out / JSON_NAME).read_text())
    # a second run with the same seed (through the CLI) reproduces the API's audit exactly, curves included
    assert got == json.loads(json.dumps(res))
    assert (out / PLOT_NAME).is_file()


def test_cli_user_errors(cli, assert_user_error, digits_artifact, tmp_path):
    out = tmp_path / "r"
    assert_user_error(cli("audit", "privacy", "--float", "builtin:digits", "--shadows", "1", "--out", out), out,
                      contains=("at least 2",))
    assert_user_error(cli("audit", "privacy", "--float", "tiny_factory:tiny", "--out", out), out,
                      contains=("split",))
    assert_user_error(cli("audit", "privacy", "--float", "builtin:digits", "--quantized", tmp_path / "missing",
                          "--out", out), out)
    assert_user_error(cli("audit", "privacy", "--float", "builtin:digits", "--ray", "my cluster",
                          "--shadows", "2", "--epochs", "1", "--out", out), out, contains=("--ray",))


def test_qat_targets_get_qat_shadows_like_secquant_qat(digits, tmp_path):
    """For a QAT artifact the shadows are retrained exactly as `secquant qat` retrained the target."""
    import secquant
    from secquant.models.digits import splits
    from secquant.audits.shadow import quantize_like

    qm = secquant.qat(digits, "w2a8", epochs=1, lr=2e-3, seed=3, out=tmp_path / "qat")
    t = TargetRecipe.from_manifest("w2a8+qat", qm.manifest.recipe, qm.manifest.training)
    assert t.qat == {"epochs": 1, "lr": 2e-3, "batch_size": 64, "seed": 3}
    s = splits()
    mine = quantize_like(digits.module, t, s["train_x"], s["train_y"]).state_dict()
    ref = qm.module.state_dict()
    assert mine.keys() == ref.keys()
    for k in ref:
        assert torch.equal(mine[k], ref[k]), k
    res = audit_membership(digits, [tmp_path / "qat"], shadows=2, epochs=1)
    assert list(res["models"]) == ["fp32", "w2a8+qat"] and res["models"]["w2a8+qat"]["qat"] is True
    with pytest.raises(SecquantError, match="cannot repeat"):
        TargetRecipe.from_manifest("x", qm.manifest.recipe, {**qm.manifest.training, "regularizer": "lipschitz"})
    # calibration the shadows cannot repeat is refused too (fail closed)
    cal = qm.manifest.calibration
    assert TargetRecipe.from_manifest("x", qm.manifest.recipe, None, cal).recipe.name == "w2a8"
    with pytest.raises(SecquantError, match="built-in calibration"):
        TargetRecipe.from_manifest("x", qm.manifest.recipe, None, cal.model_copy(update={"source": "mine.npy"}))
    # DP artifacts go to the DP audit (audit_privacy); data-free ones need the input shape to be repeated
    with pytest.raises(SecquantError, match="claims differential privacy"):
        TargetRecipe.from_manifest("x", qm.manifest.recipe, None, cal.model_copy(update={"data": "private"}))
    with pytest.raises(SecquantError, match="input shape"):
        TargetRecipe.from_manifest("x", qm.manifest.recipe, None, cal.model_copy(update={"data": "synthetic"}))
    syn = TargetRecipe.from_manifest("x", qm.manifest.recipe, None, cal.model_copy(update={"data": "synthetic"}),
                                     (1, 8, 8))
    assert syn.synthetic_shape == (1, 8, 8) and syn.qat is None
    with pytest.raises(SecquantError, match="cannot repeat"):
        TargetRecipe.from_manifest("x", qm.manifest.recipe, qm.manifest.training,
                                   cal.model_copy(update={"data": "synthetic"}), (1, 8, 8))


def test_synthetic_targets_get_synthetic_shadows_like_secquant_quantize(digits, tmp_path):
    """A data-free artifact is audited with shadows calibrated data-free on their own BatchNorm statistics,
    exactly as `secquant quantize --calib synthetic` calibrates (checked bitwise on the float model)."""
    import secquant
    from secquant.audits.shadow import quantize_like
    from secquant.recipes import get_preset

    r = get_preset("w8a8")
    r = r.model_copy(update={"calibration": r.calibration.model_copy(update={"num_samples": 32})})
    qm = secquant.quantize(digits, r, calib="synthetic", out=tmp_path / "syn")
    assert qm.manifest.calibration.data == "synthetic"
    t = TargetRecipe.from_manifest("s", qm.manifest.recipe, None, qm.manifest.calibration, (1, 8, 8))
    x0 = torch.zeros(0, 1, 8, 8)
    mine = quantize_like(digits.module, t, x0, torch.zeros(0, dtype=torch.long)).state_dict()
    ref = qm.module.state_dict()
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    res = audit_membership(digits, [tmp_path / "syn"], shadows=2, epochs=1)
    assert list(res["models"]) == ["fp32", "w8a8+synthetic"]


def test_audit_privacy_routes_dp_artifacts_to_the_dp_audit(digits, digits_artifact, tmp_path):
    """Ordinary artifacts get LiRA; a DP artifact gets the DP audit (and needs the entry points to repeat it)."""
    import secquant
    from secquant.models.digits import splits
    from secquant.audits.dp_audit import EntryPoints
    from secquant.audits.membership import audit_privacy
    from secquant.recipes import get_preset
    from safetensors.torch import save_file

    calib = tmp_path / "calib.safetensors"
    save_file({"inputs": splits()["train_x"][:100].contiguous()}, str(calib))
    r = get_preset("w8a8")
    r = r.model_copy(update={"calibration": r.calibration.model_copy(update={"num_samples": 32})})
    secquant.quantize(digits, r, calib=calib, dp_epsilon=2.0, out=tmp_path / "dp")
    with pytest.raises(SecquantError, match="entry_points"):
        audit_privacy(digits, [digits_artifact("w8a8"), tmp_path / "dp"], shadows=2, epochs=1)
    res = audit_privacy(digits, [digits_artifact("w8a8"), tmp_path / "dp"], shadows=2, epochs=1, data=calib,
                        canaries=2, entry_points=EntryPoints(secquant.quantize, secquant.qat), out=tmp_path / "rep")
    assert list(res["models"]) == ["fp32", "w8a8"] and list(res["dp_audit"]) == ["w8a8+dp"]
    assert res["dp_audit"]["w8a8+dp"]["replay"] == "pass" and res["dp_audit"]["w8a8+dp"]["claimed_epsilon"] == 2.0
    sec = privacy_section(res)
    assert "canary epsilon lower bound" in sec["html"] and "w8a8+dp" in sec["html"]
    on_disk = json.loads((tmp_path / "rep" / JSON_NAME).read_text())
    assert on_disk["dp_audit"] == json.loads(json.dumps(res["dp_audit"]))
