"""The bundles shipped in weights/: they load, fit the size limit, and their cards tell the truth."""
from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import encode, gradient_image

from covidscan.bundle import load_bundle
from covidscan.evaluation import evaluate_bundle
from covidscan.predictor import Predictor
from covidscan.catalog import shipped_models

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# A download the hosted app and a fresh clone can afford: the CT model's 8 MobileNetV2 fold models of two
# cross-validation runs in half precision (36 MB) with their input gate, and room for no more.
MAX_BYTES = 45 * 1024 * 1024
# Where each shipped model's validation data lives in ../shared/data, and how its split was made.
VALIDATION = {
    "CT": ("covid-ct", "covid-ct", {}),
    "X-ray": ("folder", "covid19-image-dataset-3class", {"val_fraction": 0.2, "seed": 0}),
}

SHIPPED = shipped_models(REPO / "weights")


def test_one_ct_and_one_xray_model_are_shipped():
    assert sorted(model.card.modality for model in SHIPPED) == ["CT", "X-ray"]


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda m: m.name)
def test_shipped_bundle_loads_predicts_and_is_small_enough(shipped):
    assert sum(f.stat().st_size for f in shipped.path.iterdir()) <= MAX_BYTES
    bundle = load_bundle(shipped.path)  # checks the weights' checksum against the card
    card = bundle.card
    # A cross-validated model's card quotes its out-of-fold estimate; the others their validation split.
    quoted = card.metrics.get("estimate") or card.metrics["val"]
    assert quoted["n"] > 0 and 0 <= quoted["accuracy"] <= 1
    assert card.training["command"].startswith("covidscan ")
    prediction = Predictor(bundle).predict_one(encode(gradient_image(256, 256), "PNG"))
    assert set(prediction.probabilities) == set(card.classes)


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.parametrize("shipped", [m for m in SHIPPED if "val" in m.card.metrics], ids=lambda m: m.name)
def test_card_metrics_are_what_evaluate_measures_on_val(shipped):
    kind, folder, options = VALIDATION[shipped.card.modality]
    if not (SHARED / folder).is_dir():
        pytest.skip(f"{SHARED / folder} is absent")
    report = evaluate_bundle(shipped.path, kind, SHARED / folder, split="val", dataset_options=options)
    card_val = shipped.card.metrics["val"]
    assert report["n"] == card_val["n"]
    for key in ("accuracy", "auc", "macro_f1"):
        assert report[key] == pytest.approx(card_val[key], abs=1e-6), key
    assert report["confusion_matrix"] == card_val["confusion_matrix"]


CROSS_VALIDATED = [m for m in SHIPPED if "estimate" in m.card.metrics]


def test_every_shipped_model_quotes_a_cross_validated_estimate_and_a_gate_calibrated_on_unseen_images():
    # A small val split is no basis for the figures a clinician reads, nor for the gate's pass rate.
    assert CROSS_VALIDATED == SHIPPED
    for shipped in SHIPPED:
        card, gate = shipped.card, shipped.card.gate
        refit = card.training.get("refit")
        if refit:  # one model refitted on all images: its threshold from the watch carve it never trained on
            counts = refit["data"]
            assert card.ensemble_size == 1 and gate["fit"]["threshold_split"] == "val"
            assert gate["n_calibration"] == sum(counts["val_counts"].values())
            assert gate["n_train"] == sum(counts["train_counts"].values())
            assert gate["n_train"] + gate["n_calibration"] == card.metrics["estimate"]["n"]
        else:  # the fold ensemble: its threshold from the out-of-fold images, each under the member that never saw it
            # (joined runs or fold partitions: under each one's member that never saw it)
            from covidscan.oof import OOF_FILE, read_oof_csv

            held_out_by = len({row.repeat for row in read_oof_csv(shipped.path / OOF_FILE)[0]})
            assert held_out_by == len(card.training["cross_validation"].get("joined_runs") or [None]) * \
                card.training["cross_validation"]["repeats"]
            assert gate["fit"]["threshold_split"] == "out-of-fold"
            assert gate["n_calibration"] == held_out_by * card.metrics["estimate"]["n"]
        assert gate["calibration_pass_rate"] >= gate["pass_rate_target"] >= 0.95


@pytest.mark.parametrize("shipped", CROSS_VALIDATED, ids=lambda m: m.name)
def test_card_estimate_reproduces_from_its_stored_out_of_fold_predictions(shipped):
    from covidscan.oof import OOF_FILE, estimate_from_bundle, read_oof_csv

    stored = shipped.card.metrics["estimate"]
    rows, classes = read_oof_csv(shipped.path / OOF_FILE)
    assert classes == shipped.card.classes and len({r.path for r in rows}) == stored["n"]
    assert estimate_from_bundle(shipped.path) == stored  # every figure and interval, recomputed
    low, high = stored["ci95"]["macro_f1"]
    assert low < stored["macro_f1"] < high


@pytest.mark.parametrize("shipped", CROSS_VALIDATED, ids=lambda m: m.name)
def test_card_repeated_estimate_reproduces_and_its_first_partition_is_the_shipped_one(shipped):
    # How far a reshuffled fold partition moves the figures: a second repeat of the same recipe.
    from covidscan.oof import estimate_from_bundle

    from covidscan.oof import OOF_FILE, oof_estimate, read_oof_csv

    repeated, shipped_estimate = shipped.card.metrics["repeated_estimate"], shipped.card.metrics["estimate"]
    assert estimate_from_bundle(shipped.path, "repeated_estimate") == repeated
    # Repeats 0..J-1 are the shipped fold models (J joined runs, or 1); the others reshuffled partitions.
    runs = len({row.repeat for row in read_oof_csv(shipped.path / OOF_FILE)[0]})
    repeats = [part["repeat"] for part in repeated["per_repeat"]]
    assert len(repeats) >= 2 * runs and len(repeats) % runs == 0 and repeats == list(range(len(repeats)))
    assert repeated["n"] == shipped_estimate["n"]
    rows, classes = read_oof_csv(shipped.path / "oof-repeats.csv")
    first = oof_estimate([row for row in rows if row.repeat < runs], classes, shipped.card.positive_class, "",
                         shipped_estimate["bootstrap"]["samples"], shipped_estimate["bootstrap"]["seed"])
    for name in ("auc", "accuracy", "macro_f1", "sensitivity", "specificity"):
        assert first[name] == shipped_estimate[name] and first["ci95"][name] == shipped_estimate["ci95"][name]


@pytest.mark.parametrize("shipped", CROSS_VALIDATED, ids=lambda m: m.name)
def test_card_command_still_parses_into_the_recipe_it_trained_with(shipped):
    # cv-nested (and anyone retraining) reads the recipe back from the card: renaming a CLI option breaks that.
    from covidscan.nested import recipe_from_command

    recorded = shipped.card.training["cross_validation"]
    # A model joined from several runs (covidscan cv-join) records each run's cv command.
    runs = recorded.get("joined_runs") or [{"command": shipped.card.training["command"]}]
    for run in runs:
        config, options = recipe_from_command(run["command"], root="elsewhere")
        assert config.root == "elsewhere" and config.arch == shipped.card.architecture
        assert (options.folds, options.seed, options.inner_val_fraction) == (
            recorded["folds"], recorded["seed"], recorded["inner_val_fraction"])
        # A join records each run's training seed (joins of runs with other seeds): its command must say it.
        assert config.seed == run.get("training_seed", config.seed)
        assert list(options.eval_sizes) == list(recorded["eval_sizes"])
        assert list(options.gate_taps) == shipped.card.gate["taps"]
        assert config.monitor == "last" and config.ema_decay == 0.9
        # CT averages the weights of its last 8 epochs (out of fold it helped there; on X-ray it did not).
        assert config.average_last_epochs == (8 if shipped.card.modality == "CT" else 0)


def test_readme_paired_difference_of_the_ct_partitions_reproduces_from_the_stored_predictions():
    # README's CT recipe table: both partitions averaged minus the shipped one, "AUC −0.017 (−0.036 to +0.001)".
    from covidscan.oof import compare_oof

    ct = next(model for model in SHIPPED if model.card.modality == "CT")
    record = compare_oof(ct.path / "oof-repeats.csv", ct.path, samples=1000)
    assert record["n"] == 543 and record["groups"] == 231
    assert record["b"]["auc"] == pytest.approx(ct.card.metrics["estimate"]["auc"])
    auc = record["differences"]["auc"]
    quoted = f"AUC {auc['difference']:+.3f} ({auc['ci95'][0]:+.3f} to {auc['ci95'][1]:+.3f})".replace("-", "−")
    assert quoted in (REPO / "README.md").read_text()



def test_ct_decides_by_argmax_because_a_cross_fitted_threshold_loses_accuracy():
    # README: "the cross-fitted threshold loses accuracy: 0.796 against 0.816, paired −0.020 (−0.050 to +0.008)".
    from covidscan.oof import threshold_check

    ct = next(model for model in SHIPPED if model.card.modality == "CT")
    record = threshold_check(ct.path, samples=1000)
    assert ct.card.threshold is None and record["argmax"]["accuracy"] == pytest.approx(ct.card.metrics["estimate"]["accuracy"])
    accuracy = record["differences"]["accuracy"]
    assert accuracy["difference"] < 0
    quoted = (f"{record['threshold']['accuracy']:.3f} against {record['argmax']['accuracy']:.3f}, paired "
              f"{accuracy['difference']:+.3f} ({accuracy['ci95'][0]:+.3f} to {accuracy['ci95'][1]:+.3f})").replace("-", "−")
    assert quoted in " ".join((REPO / "README.md").read_text().split())


def test_readme_mirror_figure_of_the_shipped_xray_model_reproduces(tmp_path):
    # README: "on the shipped X-ray model macro F1 by +0.005 (−0.010 to +0.022)" (covidscan cv-mirror): not a
    # gain to ship.
    from covidscan.mirror_check import mirror_check

    xray = next(model for model in SHIPPED if model.card.modality == "X-ray")
    root = SHARED / VALIDATION["X-ray"][1]
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    record = mirror_check(xray.path, root, tmp_path, samples=1000)
    # Rescored plain at the card's size by the member that held each image out: the card's estimate.
    assert record["n"] == 243 and record["b"]["macro_f1"] == pytest.approx(xray.card.metrics["estimate"]["macro_f1"], abs=0.002)
    f1 = record["differences"]["macro_f1"]
    assert [f1["difference"], *f1["ci95"]] == pytest.approx([0.005, -0.010, 0.022], abs=0.0015)
    assert "on the shipped X-ray model macro F1 by +0.005 (−0.010 to +0.022)" in " ".join((REPO / "README.md").read_text().split())
