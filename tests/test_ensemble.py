"""Tests for ensembles: building, calibrating, storing in half precision, predicting and Grad-CAM."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from synthetic import encode, gradient_image, tiny_bundle
from test_datasets import make_folder

from covidscan.bundle import ModelCard, load_bundle, read_card
from covidscan.ensemble import build_ensemble
from covidscan.errors import ModelBundleError
from covidscan.evaluation import evaluate_bundle
from covidscan.models import Ensemble
from covidscan.predictor import Predictor
from covidscan.report import training_data
from covidscan.transforms import preprocess

CLASSES = ("COVID", "NonCOVID")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    folder = tmp_path_factory.mktemp("members")
    data = {"root": "folder", "train_split": "train", "val_split": "val",
            "train_counts": {"COVID": 8, "NonCOVID": 8}, "val_counts": {"COVID": 2, "NonCOVID": 2}}
    return [tiny_bundle(folder / f"m{seed}", classes=CLASSES, seed=seed,
                        training={"seed": seed, "dataset": "folder", "data": data, "command": f"covidscan train --seed {seed}"})
            for seed in range(3)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data") / "folder", classes=CLASSES, per_class=10, size=64)


def member_logits(paths, batch):
    with torch.no_grad():
        return [load_bundle(p).model(batch) for p in paths]


def test_ensemble_averages_member_logits_and_records_val_metrics(members, data_root, tmp_path):
    card = build_ensemble(members, tmp_path / "ens", name="ens", dataset="folder", root=data_root,
                          weights_dtype="float32", command="covidscan ensemble ...")
    bundle = load_bundle(tmp_path / "ens")
    assert isinstance(bundle.model, Ensemble) and len(bundle.model.members) == 3
    assert card.ensemble_size == 3 and card.architecture_label == "ensemble of 3 tiny_cnn"
    batch = preprocess([gradient_image(64, 64, seed=s) for s in range(4)], 64, card.mean, card.std)
    with torch.no_grad():
        combined = bundle.model(batch)
    expected = torch.stack(member_logits(members, batch)).mean(dim=0)
    assert torch.allclose(combined, expected, atol=1e-6)

    # The card's val metrics are what `evaluate` measures on the same split with the saved bundle.
    report = evaluate_bundle(tmp_path / "ens", "folder", data_root, split="val")
    assert card.metrics["val"]["n"] == report["n"] == 4
    assert card.metrics["val"]["accuracy"] == pytest.approx(report["accuracy"])
    assert card.metrics["val"]["auc"] == pytest.approx(report["auc"])
    assert card.temperature != 1.0 and report["temperature"] == card.temperature
    records = card.training["ensemble_of"]
    assert [r["weights_sha256"] for r in records] == [read_card(p).weights_sha256 for p in members]
    assert [r["seed"] for r in records] == [0, 1, 2] and records[2]["command"] == "covidscan train --seed 2"
    # The members' training data carries over, so the card (and the app's report) can say what it was.
    assert training_data(card) == "folder: training 16, validation 4 images"
    assert all("auc" in r["metrics"]["val"] for r in records)


def test_half_precision_storage_halves_the_file_and_barely_moves_outputs(members, data_root, tmp_path):
    full = build_ensemble(members, tmp_path / "f32", name="f32", weights_dtype="float32")
    half = build_ensemble(members, tmp_path / "f16", name="f16", dataset="folder", root=data_root)
    assert full.weights_dtype == "float32" and half.weights_dtype == "float16"
    size32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    size16 = (tmp_path / "f16" / "model.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    batch = preprocess([gradient_image(64, 64, seed=s) for s in range(4)], 64, full.mean, full.std)
    with torch.no_grad():
        a = torch.softmax(load_bundle(tmp_path / "f32").model(batch), dim=1)
        b = torch.softmax(load_bundle(tmp_path / "f16").model(batch), dim=1)
    assert float((a - b).abs().max()) < 1e-2
    change = half.training["stored_weights_max_probability_change"]
    assert 0 <= change < 1e-2
    assert read_card(tmp_path / "f16").metrics["val"]["n"] == 4


def test_members_that_cannot_be_combined_are_refused(members, tmp_path):
    other_classes = tiny_bundle(tmp_path / "xray", classes=("Covid", "Normal", "Viral Pneumonia"))
    with pytest.raises(ModelBundleError, match="classes"):
        build_ensemble([members[0], other_classes], tmp_path / "bad", name="bad")
    other_size = tiny_bundle(tmp_path / "big", classes=CLASSES, input_size=96)
    with pytest.raises(ModelBundleError, match="input_size"):
        build_ensemble([members[0], other_size], tmp_path / "bad", name="bad")
    with pytest.raises(ModelBundleError, match="at least 2"):
        build_ensemble(members[:1], tmp_path / "bad", name="bad")
    build_ensemble(members[:2], tmp_path / "pair", name="pair")
    with pytest.raises(ModelBundleError, match="single models"):
        build_ensemble([tmp_path / "pair", members[2]], tmp_path / "bad", name="bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("value", [0, 17, "3", True, 2.5])
def test_card_rejects_a_bad_ensemble_size(value):
    data = ModelCard.for_architecture("x", "tiny_cnn", list(CLASSES), "CT").to_dict()
    data["ensemble_size"] = value
    with pytest.raises(ModelBundleError, match="ensemble_size"):
        ModelCard.from_dict(data)


def test_predictor_explains_an_ensemble_with_the_mean_of_its_members_maps(members, tmp_path):
    build_ensemble(members, tmp_path / "ens", name="ens", weights_dtype="float32")
    ensemble = Predictor(tmp_path / "ens")
    image = encode(gradient_image(64, 64, seed=7), "PNG")
    prediction, explanation = ensemble.explain(image, target_class="COVID")
    assert explanation.heatmap.shape == (64, 64)
    assert prediction.probabilities == pytest.approx(ensemble.predict_one(image).probabilities, abs=1e-6)

    # pytorch-grad-cam scales each layer's map to [0, 1], averages the layers, and scales again; the
    # gradient of the mean logit is each member's own gradient over 3, which the scaling cancels.
    # A lone member's map is also re-scaled after upsampling, hence the small tolerance.
    member_maps = [Predictor(p).explain(image, target_class="COVID")[1].heatmap for p in members]
    mean = np.mean(member_maps, axis=0)
    expected = (mean - mean.min()) / (mean.max() - mean.min() + 1e-7)
    assert np.abs(explanation.heatmap - expected).max() < 0.05
    # ... while any one member's map, or two members' mean, is far from it (measured: 0.48 and more).
    for partial in (*member_maps, np.mean(member_maps[:2], axis=0)):
        assert np.abs(explanation.heatmap - partial).max() > 0.2


def test_cli_builds_an_ensemble_and_models_lists_it(members, data_root, tmp_path):
    weights = tmp_path / "weights"
    run = subprocess.run(
        [sys.executable, "-m", "covidscan", "ensemble", "--members", *map(str, members[:2]),
         "--out", str(weights / "ct-ens"), "--dataset", "folder", "--root", str(data_root)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "ensemble of 2 tiny_cnn" in run.stdout and "val: accuracy" in run.stdout
    card = read_card(weights / "ct-ens")
    assert card.training["command"].startswith("covidscan ensemble --members")
    listed = subprocess.run([sys.executable, "-m", "covidscan", "models", "--json"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COVIDSCAN_WEIGHTS_DIR": str(weights)})
    assert json.loads(listed.stdout)[0]["ensemble_size"] == 2

    bad = subprocess.run([sys.executable, "-m", "covidscan", "ensemble", "--members", str(members[0]),
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "at least 2" in bad.stderr and "Traceback" not in bad.stderr
    half = subprocess.run([sys.executable, "-m", "covidscan", "ensemble", "--members", *map(str, members),
                           "--out", str(tmp_path / "x"), "--dataset", "folder"], capture_output=True, text=True,
                          timeout=60)
    assert half.returncode == 2 and "--root" in half.stderr and "Traceback" not in half.stderr


def test_cli_ensemble_gate_scores_the_taps_it_is_given(members, data_root, tmp_path):
    from covidscan.cli import main

    out = tmp_path / "tapped"
    assert main(["ensemble", "--members", *map(str, members[:2]), "--out", str(out), "--dataset", "folder",
                 "--root", str(data_root), "--gate-tap", "features.2", "--gate-taps-only",
                 "--gate-pass-rate", "0.9"]) == 0
    gate = read_card(out).gate
    assert gate["taps"] == ["features.2"] and gate["members"] == 2
    assert gate["calibration_pass_rate"] >= 0.9
    bundle = load_bundle(out)
    # The tap's group (one statistics set per member) is the only one scored.
    assert not bundle.gate.score_head and [len(group) for group in bundle.gate.taps] == [2]
    assert main(["ensemble", "--members", *map(str, members[:2]), "--out", str(tmp_path / "bad"), "--dataset", "folder",
                 "--root", str(data_root), "--gate-taps-only"]) == 2
    assert not (tmp_path / "bad").exists()
