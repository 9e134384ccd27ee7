"""Repeated cross-validation: each repeat's own estimate, and a fold ensemble's card gaining the
estimate of a repeated run of its recipe (only when that run's first repeat is its own folds)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from synthetic import tiny_train_config, two_class_folder

from covidscan.cli import main
from covidscan.cv import CVOptions, cross_validate
from covidscan.oof import OOF_FILE, estimate_from_bundle, oof_estimate, read_oof_csv
from covidscan.errors import TrainingError
from covidscan.repeats import REPEATS_FILE, attach_repeated_estimate
from covidscan.report import format_metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 3-fold run, the same run resumed with a second and a third repeat, and a run with other folds."""
    base = tmp_path_factory.mktemp("repeats")
    root = base / "data"
    two_class_folder(root, {"train": 8, "val": 3}, size=48)
    config = tiny_train_config(root, name="tiny-repeats")
    one, two, other = base / "one", base / "two", base / "other"
    assert cross_validate(config, CVOptions(folds=3, bootstrap=100), one).state == "succeeded"
    shutil.copytree(one, two)  # the rerun keeps repeat 0's fold runs and trains repeat 1 only
    trained = {p: p.stat().st_mtime_ns for p in two.glob("r0-f*/model/model.safetensors")}
    assert cross_validate(config, CVOptions(folds=3, repeats=2, bootstrap=100), two).state == "succeeded"
    assert len(trained) == 3 and trained == {p: p.stat().st_mtime_ns for p in two.glob("r0-f*/model/model.safetensors")}
    assert cross_validate(config, CVOptions(folds=2, repeats=2, seed=7, bootstrap=100), other).state == "succeeded"
    three = base / "three"
    shutil.copytree(two, three)
    assert cross_validate(config, CVOptions(folds=3, repeats=3, bootstrap=100), three).state == "succeeded"
    return {"one": one, "two": two, "other": other, "three": three}


def test_a_repeated_run_reports_each_repeat_alone(runs):
    rows, classes = read_oof_csv(runs["two"] / OOF_FILE)
    estimate = json.loads((runs["two"] / "model" / "card.json").read_text())["metrics"]["estimate"]
    assert estimate["n"] == 22 and len(rows) == 44 and [r["repeat"] for r in estimate["per_repeat"]] == [0, 1]
    for part in estimate["per_repeat"]:
        alone = oof_estimate([row for row in rows if row.repeat == part["repeat"]], classes, "COVID", "", 100)
        assert part["n"] == 22 and part["auc"] == alone["auc"] and part["ci95"] == alone["ci95"]
    # Repeat 0 of the resumed run is the first run's folds: the same out-of-fold logits.
    first, _ = read_oof_csv(runs["one"] / OOF_FILE)
    key = lambda row: (row.path, row.fold)  # noqa: E731
    assert sorted(first, key=key) == sorted((row for row in rows if row.repeat == 0), key=key)
    one_repeat = json.loads((runs["one"] / "model" / "card.json").read_text())["metrics"]["estimate"]
    assert "per_repeat" not in one_repeat
    assert estimate["protocol"].endswith("Figures are for 2 fold models per image (one per fold partition); the "
                                         "shipped ensemble averages all fold models.")
    assert one_repeat["protocol"].endswith("Figures are for one fold model; the shipped ensemble averages all fold models.")
    assert estimate["per_repeat"][0]["auc"] == one_repeat["auc"]


def test_the_repeated_estimate_is_recorded_in_the_ensembles_card_and_reproduces(runs, tmp_path, capsys):
    bundle = tmp_path / "model"
    shutil.copytree(runs["one"] / "model", bundle)
    weights = (bundle / "model.safetensors").read_bytes()
    assert main(["cv-repeats", str(bundle), str(runs["two"])]) == 0
    printed = capsys.readouterr().out
    assert "r0" in printed and "r1" in printed and "metrics.repeated_estimate" in printed
    card = json.loads((bundle / "card.json").read_text())
    repeated = card["metrics"]["repeated_estimate"]
    assert repeated["predictions"]["file"] == REPEATS_FILE and repeated["predictions"]["rows"] == 44
    assert repeated["protocol"].endswith("Figures are for 2 fold models per image (one per fold partition). The fold "
                                         "models of repeat 0 are this ensemble; the other repeats' (reshuffled folds, "
                                         "their own training seeds) are not shipped.")
    assert len(repeated["per_repeat"]) == 2
    assert card["metrics"]["estimate"] == json.loads((runs["one"] / "model" / "card.json").read_text())["metrics"]["estimate"]
    assert (bundle / "model.safetensors").read_bytes() == weights  # the weights are not touched
    assert estimate_from_bundle(bundle, "repeated_estimate") == repeated
    assert estimate_from_bundle(bundle) == card["metrics"]["estimate"]
    # The app's card line says how far the partition moves the figures.
    line = format_metrics(card["metrics"], short=True)[1]
    assert "2 fold partitions averaged" in line and "each partition alone: ROC AUC" in line and "95% intervals" in line


def test_a_run_of_other_folds_or_of_one_repeat_is_refused_and_the_card_is_kept(runs, tmp_path, capsys):
    bundle = tmp_path / "model"
    shutil.copytree(runs["one"] / "model", bundle)
    before = (bundle / "card.json").read_text()
    with pytest.raises(TrainingError, match="not the fold models"):
        attach_repeated_estimate(bundle, runs["other"])
    with pytest.raises(TrainingError, match="no fold partition beyond the model's own; run covidscan cv --repeats 2"):
        attach_repeated_estimate(bundle, runs["one"])
    assert main(["cv-repeats", str(bundle), str(tmp_path / "missing")]) != 0
    assert "holds no oof.csv" in capsys.readouterr().err
    assert (bundle / "card.json").read_text() == before and not (bundle / REPEATS_FILE).exists()


def test_an_ensemble_of_two_partitions_records_a_third(runs, tmp_path):
    # A model shipped with its recipe's two partitions (cv --repeats 2) quotes the spread over more.
    bundle = tmp_path / "model"
    shutil.copytree(runs["two"] / "model", bundle)
    with pytest.raises(TrainingError, match="run covidscan cv --repeats 3 or more"):
        attach_repeated_estimate(bundle, runs["two"])
    repeated = attach_repeated_estimate(bundle, runs["three"])
    assert [part["repeat"] for part in repeated["per_repeat"]] == [0, 1, 2] and repeated["predictions"]["rows"] == 66
    assert "Figures are for 3 fold models per image (one per fold partition). The fold models of repeats 0-1 are " \
           "this ensemble" in repeated["protocol"] and "averages all fold models" not in repeated["protocol"]
    assert estimate_from_bundle(bundle, "repeated_estimate") == repeated
