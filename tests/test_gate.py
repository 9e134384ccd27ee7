"""The input gate (OOD check) and prediction uncertainty: maths, bundle storage, predict contract."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import ct_dicom_bytes, encode, gradient_image, tiny_bundle

from covidscan.bundle import load_bundle
from covidscan.errors import ModelBundleError
from covidscan.gate import (GATE_FILE, NO_GATE_REASON, InputGate, fit_gate, fit_gate_out_of_fold, fit_member, load_gate,
                            member_disagreement, prediction_uncertainty, selective_summary, split_features, write_gate)
from covidscan.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


# --------------------------------------------------------------------------- maths
def _gaussian(n: int, cov: np.ndarray, mean: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


def test_member_distance_is_the_mahalanobis_distance_of_the_true_covariance():
    d = 6
    cov = np.diag([9.0, 4.0, 1.0, 0.25, 0.25, 0.25])
    mean = np.arange(d, dtype=float)
    member = fit_member(_gaussian(20000, cov, mean, seed=0), rank=3)  # the last 3 share one variance, as here
    points = _gaussian(50, cov, mean, seed=1)
    z = points - mean
    expected = np.sqrt((z ** 2 / np.diag(cov)).sum(axis=1) / d)
    np.testing.assert_allclose(member.distance(points), expected, rtol=0.05)


def test_fit_gate_passes_the_held_in_share_and_flags_far_points():
    d = 16
    cov = np.eye(d)
    train = [_gaussian(400, cov, np.zeros(d), seed=s) for s in (0, 1)]
    calibration = [_gaussian(200, cov, np.zeros(d), seed=s) for s in (2, 3)]
    gate = fit_gate(train, calibration, pass_rate=0.99, rank=8)
    _, flagged = gate.flagged(calibration)
    assert flagged.mean() <= 0.01
    assert gate.info["calibration_pass_rate"] >= 0.99
    far = [_gaussian(100, cov, np.full(d, 3.0), seed=s) for s in (4, 5)]
    scores, far_flagged = gate.flagged(far)
    assert far_flagged.all() and scores.min() > gate.threshold
    # Members' scores are normalised by their median in-distribution distance.
    assert np.median(gate.members[0].score(calibration[0])) == pytest.approx(1.0, abs=1e-9)


def test_out_of_fold_gate_sets_its_threshold_on_images_no_member_saw():
    d, folds = 12, 4
    cov = np.eye(d)
    pooled = _gaussian(800, cov, np.zeros(d), seed=0)
    fold_of = np.arange(len(pooled)) % folds
    # Two groups per member (the final layer and one tap): the tap's features are the same points scaled.
    fold_train = [[pooled[fold_of != k], 3 * pooled[fold_of != k]] for k in range(folds)]
    fold_holdout = [[pooled[fold_of == k], 3 * pooled[fold_of == k]] for k in range(folds)]
    gate = fit_gate_out_of_fold(fold_train, fold_holdout, pass_rate=0.95, rank=6, taps=["features.1"])
    assert len(gate.members) == folds and len(gate.taps) == 1 and len(gate.taps[0]) == folds
    assert gate.info["n_calibration"] == 800 and gate.info["calibration"].startswith("out-of-fold")
    # The threshold is the 95% quantile of each held-out point's score under its own fold's member.
    alone = []
    for k in range(folds):
        member = fit_member(fold_train[k][0], rank=6)
        member.scale = float(np.median(member.distance(fold_holdout[k][0])))
        np.testing.assert_allclose(gate.members[k].score(fold_holdout[k][0]), member.score(fold_holdout[k][0]), rtol=1e-6)
        tap = gate.taps[0][k]
        alone.append(np.maximum(member.score(fold_holdout[k][0]), tap.score(fold_holdout[k][1])))
    assert gate.threshold == pytest.approx(float(np.quantile(np.concatenate(alone), 0.95, method="higher")), rel=1e-6)
    fresh = _gaussian(2000, cov, np.zeros(d), seed=9)
    _, flagged = gate.flagged([fresh] * folds + [3 * fresh] * folds)
    assert flagged.mean() <= 0.05  # unseen in-distribution points pass at least at the target rate
    far = _gaussian(200, cov, np.full(d, 2.0), seed=10)
    assert gate.flagged([far] * folds + [3 * far] * folds)[1].all()
    with pytest.raises(ModelBundleError, match="feature set"):
        fit_gate_out_of_fold(fold_train, fold_holdout[:2], rank=6, taps=["features.1"])


def test_uncertainty_orders_sure_unsure_and_disagreeing_predictions():
    sure = np.array([[0.999, 0.001]])
    unsure = np.array([[0.5, 0.5]])
    assert prediction_uncertainty(sure)[0] < 0.02
    assert prediction_uncertainty(unsure)[0] == pytest.approx(1.0)
    mean = np.array([[0.8, 0.2]])
    agreeing = np.array([[[0.8, 0.2]], [[0.8, 0.2]]])
    disagreeing = np.array([[[0.99, 0.01]], [[0.61, 0.39]]])  # same mean, members apart
    assert prediction_uncertainty(mean, agreeing)[0] == pytest.approx(prediction_uncertainty(mean)[0])
    # Entropy of the mean = mean member entropy + Jensen-Shannon disagreement.
    mean_entropy = np.mean([prediction_uncertainty(m)[0] for m in disagreeing])
    assert prediction_uncertainty(mean, disagreeing)[0] == pytest.approx(
        mean_entropy + member_disagreement(disagreeing)[0])
    assert member_disagreement(disagreeing)[0] > member_disagreement(agreeing)[0] == 0.0


def test_selective_summary_accuracy_rises_when_the_uncertain_are_left_out():
    uncertainty = np.linspace(0, 1, 10)
    correct = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)  # the two least sure are wrong
    summary = selective_summary(uncertainty, correct, coverages=(1.0, 0.8))
    assert summary["accuracy"] == [0.8, 1.0]
    assert summary["uncertain_above"] == pytest.approx(uncertainty[8])


# --------------------------------------------------------------------------- storage
def _images(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(np.stack([gradient_image(64, 64, seed=int(s)) for s in rng.integers(0, 10_000, n)]))
    return base.permute(0, 3, 1, 2).contiguous()


@pytest.fixture()
def gated_bundle(tmp_path) -> Path:
    path = tiny_bundle(tmp_path / "bundle")
    bundle = load_bundle(path)
    card = bundle.card
    train, _ = split_features(bundle.model, _images(40, 0), card.mean, card.std)
    val, _ = split_features(bundle.model, _images(20, 1), card.mean, card.std)
    write_gate(path, fit_gate(train, val, rank=8), {"uncertainty": {"selective": {"uncertain_above": 0.4}}})
    return path


def test_gate_round_trips_through_the_bundle_and_keeps_the_weights(gated_bundle):
    card = json.loads((gated_bundle / "card.json").read_text())
    assert card["gate"]["sha256"] and card["gate"]["file"] == GATE_FILE
    bundle = load_bundle(gated_bundle)  # weights' checksum still matches
    assert isinstance(bundle.gate, InputGate) and bundle.gate.threshold == pytest.approx(card["gate"]["threshold"])
    features, _ = split_features(bundle.model, _images(5, 2), bundle.card.mean, bundle.card.std)
    again = load_gate(gated_bundle, card["gate"])
    np.testing.assert_allclose(bundle.gate.score(features), again.score(features))


def test_a_tampered_gate_is_refused(gated_bundle):
    gate_path = gated_bundle / GATE_FILE
    data = bytearray(gate_path.read_bytes())
    data[-3] ^= 0xFF
    gate_path.write_bytes(bytes(data))
    with pytest.raises(ModelBundleError, match="input gate.*checksum"):
        load_bundle(gated_bundle)


def test_a_missing_gate_file_is_refused(gated_bundle):
    (gated_bundle / GATE_FILE).unlink()
    with pytest.raises(ModelBundleError, match="gate file"):
        load_bundle(gated_bundle)


def test_a_bundle_without_a_gate_loads_and_says_so(tmp_path):
    predictor = Predictor(tiny_bundle(tmp_path / "plain"))
    assert predictor.bundle.gate is None
    record = predictor.predict_one(encode(gradient_image(80, 80), "PNG")).to_dict()
    assert record["ood"] == {"flagged": False, "score": None, "threshold": None, "reason": NO_GATE_REASON}
    assert 0.0 <= record["uncertainty"] <= 1.0


# --------------------------------------------------------------------------- predict contract
def test_predictions_carry_ood_and_uncertainty(gated_bundle):
    predictor = Predictor(gated_bundle)
    images = [encode(gradient_image(80, 80, seed=s), "PNG") for s in range(3)]
    records = [p.to_dict() for p in predictor.predict(images)]
    for record in records:
        assert {"label", "probabilities", "ood", "uncertainty"} <= set(record)
        assert set(record["ood"]) == {"flagged", "score", "threshold", "reason"}
        assert record["ood"]["threshold"] == pytest.approx(predictor.bundle.gate.threshold)
        assert record["ood"]["flagged"] == (record["ood"]["score"] > record["ood"]["threshold"])
    # Explaining gives the same OOD score and uncertainty as predicting.
    explained, _ = predictor.explain(images[0])
    assert explained.ood["score"] == pytest.approx(records[0]["ood"]["score"], rel=1e-4)
    assert explained.uncertainty == pytest.approx(records[0]["uncertainty"], abs=1e-5)
    noise = encode(np.random.default_rng(0).integers(0, 256, (80, 80, 3)).astype(np.uint8), "PNG")
    assert predictor.predict_one(noise).ood["score"] > records[0]["ood"]["score"]


# --------------------------------------------------------------------------- mid-network taps
TAPS = ["features.2"]  # tiny_cnn's second conv block (16 channels: 32 pooled features)


@pytest.fixture()
def tapped_bundle(tmp_path) -> Path:
    path = tiny_bundle(tmp_path / "tapped")
    bundle = load_bundle(path)
    train, _ = split_features(bundle.model, _images(40, 0), bundle.card.mean, bundle.card.std, taps=TAPS)
    val, _ = split_features(bundle.model, _images(20, 1), bundle.card.mean, bundle.card.std, taps=TAPS)
    write_gate(path, fit_gate(train, val, rank=8, taps=TAPS))
    return path


def test_a_tapped_gate_scores_the_largest_group_and_round_trips(tapped_bundle):
    card = json.loads((tapped_bundle / "card.json").read_text())
    assert card["gate"]["taps"] == TAPS and card["gate"]["combine"] == "max"
    bundle = load_bundle(tapped_bundle)
    assert bundle.gate.tap_names == TAPS and len(bundle.gate.taps) == 1
    features, _ = split_features(bundle.model, _images(6, 2), bundle.card.mean, bundle.card.std, taps=TAPS)
    assert [f.shape for f in features] == [(6, 32), (6, 32)]  # head input (32), then features.2 mean+std (2 x 16)
    groups = bundle.gate.group_scores(features)
    head_only = InputGate(members=bundle.gate.members, threshold=1.0)
    np.testing.assert_allclose(groups[0], head_only.score(features[:1]))
    np.testing.assert_allclose(bundle.gate.score(features), groups.max(axis=0))
    with pytest.raises(ModelBundleError, match="1 member"):
        bundle.gate.score(features[:1])  # the tap's features are missing


def test_a_taps_only_mean_gate_scores_the_mean_of_the_taps_and_round_trips(tmp_path):
    path = tiny_bundle(tmp_path / "mean")
    bundle = load_bundle(path)
    taps = ["features.2", "features.4"]
    train, _ = split_features(bundle.model, _images(40, 0), bundle.card.mean, bundle.card.std, taps=taps)
    val, _ = split_features(bundle.model, _images(20, 1), bundle.card.mean, bundle.card.std, taps=taps)
    with pytest.raises(ModelBundleError, match="needs taps"):
        fit_gate(train[:1], val[:1], rank=8, score_head=False)
    write_gate(path, fit_gate(train, val, rank=8, taps=taps, combine="mean", score_head=False, pass_rate=0.9))
    gate = load_bundle(path).gate
    assert (gate.combine, gate.score_head, gate.info["pass_rate_target"]) == ("mean", False, 0.9)
    features, _ = split_features(bundle.model, _images(6, 2), bundle.card.mean, bundle.card.std, taps=taps)
    np.testing.assert_allclose(gate.score(features), gate.group_scores(features)[1:].mean(axis=0))
    assert np.mean(gate.score(val) <= gate.threshold) >= 0.9


def test_predict_and_explain_score_a_tapped_gate_alike(tapped_bundle):
    predictor = Predictor(tapped_bundle)
    image = encode(gradient_image(80, 80, seed=4), "PNG")
    predicted = predictor.predict_one(image)
    explained, _ = predictor.explain(image)
    assert explained.ood["score"] == pytest.approx(predicted.ood["score"], rel=1e-4)
    features = predictor.forward([predictor.load(image)]).features
    assert [f.shape for f in features] == [(1, 32), (1, 32)]
    assert predicted.ood["score"] == pytest.approx(float(predictor.gate.score(features)[0]), rel=1e-6)


def test_a_gate_tapping_a_layer_the_model_lacks_is_refused(tapped_bundle):
    card_path = tapped_bundle / "card.json"
    card = json.loads(card_path.read_text())
    card["gate"]["taps"] = ["features.99"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelBundleError, match="features.99"):
        load_bundle(tapped_bundle)


def test_a_dicom_of_another_modality_is_flagged_with_that_reason(gated_bundle):
    prediction = Predictor(gated_bundle).predict_one(ct_dicom_bytes(modality="MR"))
    assert prediction.flagged
    assert "modality is MR" in prediction.ood["reason"]
    assert any("modality is MR" in warning for warning in prediction.warnings)  # the warning stays


# --------------------------------------------------------------------------- shipped models, real data
def _shipped(name: str) -> Path:
    path = REPO / "weights" / name
    if not (path / GATE_FILE).is_file():
        pytest.skip(f"{name} has no gate")
    return path


@pytest.mark.shared_data
def test_the_shipped_ct_model_flags_xrays_and_photos():
    # The fully fine-tuned CT model's penultimate features map X-rays among CT slices (AUROC 0.89);
    # its gate scores mid-network taps instead (features.8 and .13: X-ray AUROC 0.99).
    xrays = sorted((SHARED / "covid19-image-dataset-3class").rglob("*.png"))[:1] + \
        sorted((SHARED / "covid19-image-dataset-3class").rglob("*.jp*g"))[:1]
    if not xrays:
        pytest.skip("../shared/data/covid19-image-dataset-3class is absent")
    from gate_corpus import natural_images, other_modality_files

    predictor = Predictor(_shipped("ct-covid-mobilenet_v2"))
    assert predictor.bundle.gate.tap_names  # the shipped CT gate taps the middle of the network
    for prediction in predictor.predict([str(x) for x in xrays]):
        assert prediction.flagged and "outside what this model was trained on" in prediction.ood["reason"]
    more_xrays = predictor.predict(other_modality_files(SHARED, "CT", 12))
    assert sum(p.flagged for p in more_xrays) >= 11
    photos = predictor.predict(natural_images(6) + natural_images(6, grayscale=True, seed=1))
    assert sum(p.flagged for p in photos) >= 10


@pytest.mark.shared_data
def test_the_shipped_ct_model_passes_ct_slices():
    if not (SHARED / "covid-ct").is_dir():
        pytest.skip("../shared/data/covid-ct is absent")
    from covidscan.datasets import open_dataset

    predictor = Predictor(_shipped("ct-covid-mobilenet_v2"))
    val = open_dataset("covid-ct", SHARED / "covid-ct", split="val").items[:8]
    predictions = predictor.predict([item.path for item in val])
    assert sum(not p.flagged for p in predictions) >= 7
    assert all(p.ood["threshold"] == pytest.approx(predictor.bundle.gate.threshold) for p in predictions)


@pytest.mark.shared_data
def test_the_shipped_xray_model_flags_a_ct_slice():
    ct = sorted((SHARED / "covid-ct" / "CT_COVID").glob("*.png"))[:2]
    if not ct:
        pytest.skip("../shared/data/covid-ct is absent")
    predictor = Predictor(_shipped("xray-3class-mobilenet_v2"))
    assert all(p.flagged for p in predictor.predict([str(c) for c in ct]))


def test_cli_gate_fit_stores_the_taps_and_refuses_bad_tap_options(tmp_path, capsys):
    from covidscan.cli import main

    path = tiny_bundle(tmp_path / "cli")
    weights = (path / "model.safetensors").read_bytes()
    for label in ("COVID", "NonCOVID"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(12):
            (tmp_path / "data" / label / f"{i}.png").write_bytes(
                encode(gradient_image(64, 64, seed=i + (100 if label == "COVID" else 0)), "PNG"))
    base = ["gate", "fit", "--model", str(path), "--dataset", "folder", "--root", str(tmp_path / "data"),
            "--val-fraction", "0.25", "--split-seed", "0"]
    assert main([*base, "--taps-only"]) == 2
    assert "--taps-only needs at least one --tap" in capsys.readouterr().err
    assert main([*base, "--tap", "features.99"]) == 2
    assert "no layer 'features.99'" in capsys.readouterr().err
    assert main([*base, "--tap", "features.2", "--combine", "mean", "--taps-only", "--pass-rate", "0.9"]) == 0
    assert "taps features.2" in capsys.readouterr().out
    gate_field = json.loads((path / "card.json").read_text())["gate"]
    assert (gate_field["taps"], gate_field["combine"], gate_field["score_head"]) == (["features.2"], "mean", False)
    assert (path / "model.safetensors").read_bytes() == weights
    assert Predictor(path).predict_one(encode(gradient_image(64, 64, seed=5), "PNG")).ood["score"] > 0
