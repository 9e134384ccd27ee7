"""covidscan.join: several cross-validation runs' fold models shipped as one ensemble, measured out of fold."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from synthetic import tiny_train_config

from covidscan.bundle import load_bundle
from covidscan.cv import CVOptions, cross_validate
from covidscan.errors import TrainingError
from covidscan.join import join_runs
from covidscan.oof import OOF_FILE, average_oof, estimate_from_bundle, oof_estimate, read_oof_csv
from covidscan.predictor import Predictor

OPTIONS = dict(folds=2, bootstrap=100, eval_sizes=[32, 40], gate_pass_rate=0.95)


def _recipe(root, lr: float, seed: int = 0):
    return tiny_train_config(root, lr=lr, name="tiny", monitor="last", seed=seed)


@pytest.fixture(scope="module")
def two_runs(pooled_folder, tmp_path_factory) -> list[Path]:
    """Two recipes (learning rates, training seeds) on the same folds: what cv-join ships together."""
    out = tmp_path_factory.mktemp("runs")
    runs = [out / "lr-high", out / "lr-low"]
    for run, lr, seed in zip(runs, (0.01, 0.003), (0, 7)):
        assert cross_validate(_recipe(pooled_folder, lr, seed), CVOptions(**OPTIONS), run).state == "succeeded"
    return runs


def test_join_ships_every_fold_model_with_the_joined_out_of_fold_estimate(two_runs, pooled_folder, tmp_path):
    out = tmp_path / "joined"
    estimate = join_runs(two_runs, out, name="joined")
    bundle = load_bundle(out)
    card = bundle.card
    assert card.ensemble_size == 4 and card.name == "joined"  # 2 runs x 2 folds
    # The estimate is the runs averaged per image out of fold, and reproduces from the stored oof.csv.
    rows, classes = average_oof(two_runs)
    assert read_oof_csv(out / OOF_FILE) == (rows, classes)
    expected = oof_estimate(rows, classes, card.positive_class, estimate["protocol"], 100, 0)
    assert {k: expected[k] for k in ("auc", "accuracy", "ci95")} == {k: estimate[k] for k in ("auc", "accuracy", "ci95")}
    assert estimate_from_bundle(out) == card.metrics["estimate"] == estimate
    assert estimate["n"] == 28 and "2 cross-validation runs over the same images joined" in estimate["protocol"]
    # The app's card line: each run's own figures, not fold partitions (both runs share the folds).
    from covidscan.report import format_metrics

    assert estimate["runs"] == 2 and [part["repeat"] for part in estimate["per_repeat"]] == [0, 1]
    line = format_metrics(card.metrics, short=True)[0]
    assert "2 runs' models averaged" in line and "each run alone: ROC AUC" in line and "partition" not in line
    # One inference size for all members: the candidate every run scored with the best joined AUC.
    choice = card.training["cross_validation"]["input_size_choice"]
    assert choice["candidates"] == [32, 40] and card.input_size == choice["shipped"]
    best = max(choice["oof_score"].values())
    assert choice["oof_score"][str(card.input_size)] == best
    joined = card.training["cross_validation"]["joined_runs"]
    assert [run["run"] for run in joined] == ["lr-high", "lr-low"] and joined[0]["folds"] == ["r0-f0", "r0-f1"]
    assert [run["training_seed"] for run in joined] == [0, 7] == [
        json.loads((run / "cv.json").read_text())["train_config"]["seed"] for run in two_runs]
    # Members in run order: the ensemble's first models are the first run's fold models, weights unchanged
    # (but for the stored half precision).
    first_fold = load_bundle(two_runs[0] / "r0-f0" / "model").model
    member = bundle.model.members[0]
    for name, tensor in first_fold.state_dict().items():
        if tensor.is_floating_point():
            np.testing.assert_allclose(member.state_dict()[name].numpy(), tensor.numpy(), atol=2e-3, rtol=2e-3)
    # The gate: every member's statistics, the threshold from each held-out image under each run's fold model.
    gate = card.gate
    assert gate["members"] == 4 and gate["n_calibration"] == 2 * 28 and gate["fit"]["threshold_split"] == "out-of-fold"
    assert "each of the 2 runs" in gate["uncertainty"]["measured_on"]
    # Nested cross-validation re-runs one recipe; a joined model has several, and says so.
    from covidscan.nested import recipe_from_card

    with pytest.raises(TrainingError, match="joins several cross-validation runs"):
        recipe_from_card(card)
    image = next((pooled_folder / "train" / "COVID").iterdir())
    prediction = Predictor(out).predict_one(image)
    assert set(prediction.probabilities) == {"COVID", "Normal"} and prediction.ood["threshold"] == pytest.approx(gate["threshold"])


def test_cli_join_and_a_repeated_estimate_over_the_joined_runs(pooled_folder, tmp_path, capsys):
    """cv-join writes the bundle; cv-repeats then records the joined recipe on a reshuffled partition."""
    from covidscan.cli import main

    lrs = (0.01, 0.003)
    runs = [tmp_path / f"run-{lr}" for lr in lrs]
    for run, lr in zip(runs, lrs):
        assert cross_validate(_recipe(pooled_folder, lr), CVOptions(**OPTIONS), run).state == "succeeded"
    model = tmp_path / "model"
    assert main(["cv-join", *map(str, runs), "--out", str(model)]) == 0
    printed = capsys.readouterr().out
    assert "Out-of-fold estimate over 28 images" in printed and f"Ensemble of the 2 runs' fold models: {model}" in printed
    card = load_bundle(model).card
    assert card.training["command"].startswith("covidscan cv-join ")
    # Before the runs are repeated, there is nothing to add.
    assert main(["cv-repeats", str(model), *map(str, runs)]) == 2
    assert "no fold partition beyond the model's own; run covidscan cv --repeats 2" in capsys.readouterr().err
    single = tmp_path / "single-partition"
    shutil.copytree(runs[1], single)
    # Each run repeated on a reshuffled partition (its first partition's fold runs are kept, not retrained).
    for run, lr in zip(runs, lrs):
        config = _recipe(pooled_folder, lr)
        before = (run / "r0-f0" / "model" / "model.safetensors").stat().st_mtime_ns
        assert cross_validate(config, CVOptions(**{**OPTIONS, "repeats": 2}), run).state == "succeeded"
        assert (run / "r0-f0" / "model" / "model.safetensors").stat().st_mtime_ns == before
    # In the wrong order the first repeats are not the joined models: refused.
    assert main(["cv-repeats", str(model), str(runs[1]), str(runs[0])]) == 2
    assert "not the fold models" in capsys.readouterr().err
    assert main(["cv-repeats", str(model), *map(str, runs)]) == 0
    repeated = load_bundle(model).card.metrics["repeated_estimate"]
    assert estimate_from_bundle(model, "repeated_estimate") == repeated
    # Of 2 runs x 2 partitions: repeats 0 and 1 are the joined runs' first partition (the shipped models).
    assert [part["repeat"] for part in repeated["per_repeat"]] == [0, 1, 2, 3]
    rows, classes = read_oof_csv(model / "oof-repeats.csv")
    first = [row for row in rows if row.repeat < 2]
    assert read_oof_csv(model / OOF_FILE)[0] == first
    assert "Repeated: each joined run" in repeated["protocol"] and repeated["runs"] == 2
    from covidscan.report import format_metrics

    line = format_metrics(load_bundle(model).card.metrics, short=True)[1]
    assert "2 runs' models × 2 fold partitions averaged" in line and "each run and partition alone: ROC AUC" in line
    # The repeated runs joined as they stand: all 8 fold models shipped, 4 of them held each image out.
    both = tmp_path / "both-partitions"
    assert main(["cv-join", *map(str, runs), "--out", str(both)]) == 0
    capsys.readouterr()
    card = load_bundle(both).card
    estimate = card.metrics["estimate"]
    assert card.ensemble_size == 8 and estimate["n"] == 28
    assert ("averaged over the 4 fold models (one per run and fold partition, 2 partitions each)" in estimate["protocol"]
            and estimate["protocol"].endswith("Figures are for 4 fold models per image; the shipped ensemble averages "
                                              "all the runs' fold models.")
            and "one fold model;" not in estimate["protocol"] and "per fold partition" in card.gate["uncertainty"]["measured_on"])
    assert read_oof_csv(both / OOF_FILE) == read_oof_csv(model / "oof-repeats.csv")
    line = format_metrics(card.metrics, short=True)[0]
    assert "2 runs' models × 2 fold partitions averaged" in line
    # A run over one partition beside runs over two: refused, as the figures would count models unevenly.
    assert main(["cv-join", str(runs[0]), str(single), "--out", str(tmp_path / "uneven")]) == 2
    assert "different numbers of fold partitions (--repeats 1, 2)" in capsys.readouterr().err
    assert not (tmp_path / "uneven").exists()


def test_join_refuses_what_cannot_ship_together(two_runs, tmp_path, capsys):
    import json
    import shutil

    from covidscan.cli import main

    with pytest.raises(TrainingError, match="at least two"):
        join_runs(two_runs[:1], tmp_path / "one")
    with pytest.raises(TrainingError, match="not a finished covidscan cv folder"):
        join_runs([two_runs[0], tmp_path / "missing"], tmp_path / "x")
    # A run over other images (here: one image fewer) cannot be averaged image by image.
    fewer = tmp_path / "fewer"
    shutil.copytree(two_runs[1], fewer)
    (fewer / OOF_FILE).write_text("\n".join((two_runs[1] / OOF_FILE).read_text().splitlines()[:-1]) + "\n")
    assert main(["cv-join", str(two_runs[0]), str(fewer), "--out", str(tmp_path / "bad")]) == 2
    assert "same pooled images" in capsys.readouterr().err
    # A recipe for another modality prepares its images differently.
    ct = tmp_path / "ct"
    shutil.copytree(two_runs[1], ct)
    record = json.loads((ct / "cv.json").read_text())
    record["train_config"].update(modality="CT", window="lung")
    (ct / "cv.json").write_text(json.dumps(record))
    with pytest.raises(TrainingError, match="differ in modality, window"):
        join_runs([two_runs[0], ct], tmp_path / "bad2")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()
