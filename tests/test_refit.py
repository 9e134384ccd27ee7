"""Cross-validation with --refit: the recipe trained once more on all pooled images is shipped alone,
with the fold models' out-of-fold estimate and a gate whose threshold comes from its watch carve;
a rerun into the same folder keeps the runs already finished."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic import tiny_train_config

from covidscan.bundle import load_bundle
from covidscan.cv import CVOptions, cross_validate
from covidscan.oof import OOF_FILE, cross_fitted_probabilities, estimate_from_bundle, per_image, read_oof_csv
from covidscan.datasets import open_dataset
from covidscan.errors import TrainingError
from covidscan.folds import dataset_groups
from covidscan.nested import nested_cv
from covidscan.predictor import Predictor
from covidscan.refit import check_sentence


def _started(run_dir: Path) -> int:
    """When the run's training last started (it writes config.json first, by rename: a new mtime)."""
    return (run_dir / "config.json").stat().st_mtime_ns


def test_refit_ships_one_model_trained_on_every_pooled_image_with_the_oof_estimate(pooled_folder, tmp_path):  # noqa: F811
    out = tmp_path / "cv"
    result = cross_validate(tiny_train_config(pooled_folder), CVOptions(folds=3, bootstrap=100, refit=True), out)
    assert result.state == "succeeded" and result.bundle_path == out / "model" and result.folds_run == 3
    bundle = load_bundle(out / "model")
    card = bundle.card
    assert card.ensemble_size == 1 and card.name == "tiny-cv" and card.threshold is None
    # The refit's weights, not a fold model's: it trained on train+val of the refit split.
    refit_split = json.loads((out / "splits" / "refit.json").read_text())["splits"]
    pooled = open_dataset("folder", pooled_folder)
    pooled_keys = {pooled.item_key(item) for item in pooled.items if item.split in ("train", "val")}
    assert set(refit_split) == pooled_keys and set(refit_split.values()) == {"train", "val"}  # no test image
    # The watch carve is grouped: no group has images on both sides.
    items = [item for item in pooled.items if item.split in ("train", "val")]
    pooled.items, pooled.raw_metadata = items, []
    sides: dict[str, set] = {}
    for item, group in zip(items, dataset_groups(pooled)):
        sides.setdefault(group, set()).add(refit_split[pooled.item_key(item)])
    assert all(len(side) == 1 for side in sides.values())
    carve = sum(split == "val" for split in refit_split.values())
    assert card.training["refit"]["data"]["val_counts"] and sum(card.training["refit"]["data"]["train_counts"].values()) == len(pooled_keys) - carve
    # The estimate is the fold models' out-of-fold one, reproducible from the stored predictions.
    rows, _ = read_oof_csv(out / "model" / OOF_FILE)
    assert {r.fold for r in rows} == {0, 1, 2} and len(rows) == len(pooled_keys)
    estimate = card.metrics["estimate"]
    assert estimate_from_bundle(out / "model") == estimate and "refitted once on all pooled images" in estimate["protocol"]
    # The refit is checked against the fold models on its carve, images out of sample for both.
    check = card.training["refit"]["watch_carve_check"]
    assert check == result.refit_check and check["n"] == carve and check["input_size"] == card.input_size
    paths, labels, probs, _ = per_image(rows, cross_fitted_probabilities(rows))
    carve_rows = [i for i, path in enumerate(paths) if refit_split[path] == "val"]
    fold_accuracy = float(np.mean(probs[carve_rows].argmax(axis=1) == labels[carve_rows]))
    assert check["fold_models"]["accuracy"] == pytest.approx(fold_accuracy)
    difference = check["refit_minus_fold_models"]["accuracy"]
    assert difference["difference"] == pytest.approx(check["refit"]["accuracy"] - fold_accuracy)
    assert difference["ci95"][0] <= difference["difference"] <= difference["ci95"][1]
    assert f"{carve}-image watch carve" in check_sentence(check)
    # The gate's threshold comes from the refit's own watch carve (images it never trained on).
    assert card.gate["n_calibration"] == carve and card.gate["fit"]["threshold_split"] == "val"
    assert card.gate["n_train"] == len(pooled_keys) - carve
    image = next(iter((pooled_folder / "test" / "COVID").glob("*.png")))
    prediction = Predictor(out / "model").predict_one(image.read_bytes())
    assert prediction.label in card.classes and prediction.ood["threshold"] == card.gate["threshold"]
    # Nested cross-validation compares fold models with a refit: a refit alone has no fold models to compare.
    with pytest.raises(TrainingError, match="one refitted model"):
        nested_cv(out / "model", tmp_path / "nested")


def test_a_rerun_keeps_finished_fold_runs_and_adds_the_refit(pooled_folder, tmp_path):  # noqa: F811
    out = tmp_path / "cv"
    config = tiny_train_config(pooled_folder)
    assert cross_validate(config, CVOptions(folds=3, bootstrap=100), out).state == "succeeded"
    assert load_bundle(out / "model").card.ensemble_size == 3
    started = {fold: _started(out / f"r0-f{fold}") for fold in range(3)}
    first_oof = (out / OOF_FILE).read_text()
    # Same recipe with --refit (and another description): the folds are kept, only the refit trains.
    again = cross_validate(tiny_train_config(pooled_folder, description="refitted"),
                           CVOptions(folds=3, bootstrap=100, refit=True), out)
    assert again.state == "succeeded"
    assert {fold: _started(out / f"r0-f{fold}") for fold in range(3)} == started
    assert (out / OOF_FILE).read_text() == first_oof and (out / "refit" / "model" / "card.json").is_file()
    assert load_bundle(out / "model").card.ensemble_size == 1
    # A changed recipe retrains every fold.
    changed = cross_validate(tiny_train_config(pooled_folder, lr=0.02), CVOptions(folds=3, bootstrap=100), out)
    assert changed.state == "succeeded"
    assert all(json.loads((out / f"r0-f{fold}" / "config.json").read_text())["lr"] == 0.02 for fold in range(3))
