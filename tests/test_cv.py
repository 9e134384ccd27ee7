"""Cross-validation end to end on a tiny synthetic set: OOF covers every pooled image once, the
fold models become a loadable ensemble whose card estimate reproduces from its stored oof.csv."""
from __future__ import annotations

import json

import pytest
from synthetic import tiny_train_config

from covidscan.bundle import load_bundle
from covidscan.cv import CVOptions, cross_validate
from covidscan.oof import OOF_FILE, estimate_from_bundle, read_oof_csv
from covidscan.datasets import open_dataset
from covidscan.errors import TrainingError
from covidscan.predictor import Predictor


def test_cv_writes_oof_for_every_pooled_image_once_and_a_loadable_ensemble(pooled_folder, tmp_path):
    out = tmp_path / "cv"
    seen = []
    result = cross_validate(tiny_train_config(pooled_folder), CVOptions(folds=3, bootstrap=100), out,
                            progress_callback=lambda record: seen.append((record["state"], record["fold"])))
    assert result.state == "succeeded" and result.folds_run == 3
    rows, classes = read_oof_csv(out / OOF_FILE)
    pooled = open_dataset("folder", pooled_folder)
    expected = {item.path.relative_to(pooled_folder).as_posix() for item in pooled.items if item.split in ("train", "val")}
    assert sorted(r.path for r in rows) == sorted(expected)  # every pooled image exactly once, no test image
    assert classes == ["COVID", "Normal"] and {r.fold for r in rows} == {0, 1, 2}
    # No image was in its own fold model's training or validation data.
    for fold in range(3):
        split = json.loads((out / "splits" / f"r0-f{fold}.json").read_text())["splits"]
        held = {r.path for r in rows if r.fold == fold}
        assert held == {p for p, s in split.items() if s == "holdout"}
        assert not held & {p for p, s in split.items() if s in ("train", "val")}
    assert {fold for state, fold in seen if state == "running"} >= {1, 2, 3} and seen[-1][0] == "succeeded"
    progress = json.loads((out / "progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["folds"] == 3

    bundle = load_bundle(result.bundle_path)
    card = bundle.card
    assert card.ensemble_size == 3 and card.classes == ["COVID", "Normal"]
    assert card.training["cross_validation"]["folds"] == 3 and card.training["data"]["pooled_splits"] == ["train", "val"]
    est = card.metrics["estimate"]
    assert est["n"] == 28 and 0 <= est["accuracy"] <= 1 and "5-fold" not in est["protocol"] and "3-fold" in est["protocol"]
    for name in ("auc", "accuracy", "macro_f1", "sensitivity", "specificity"):
        low, high = est["ci95"][name]
        assert 0 <= low <= est[name] <= high <= 1
    assert est["predictions"]["rows"] == 28
    # The card's estimate reproduces from the oof.csv stored in the bundle.
    assert estimate_from_bundle(result.bundle_path) == est
    # The input gate's threshold and uncertainty summary come from the out-of-fold images.
    gate = card.gate
    assert gate["n_calibration"] == 28 and gate["members"] == 3 and gate["fit"]["threshold_split"] == "out-of-fold"
    assert gate["calibration_pass_rate"] >= 0.99 and gate["uncertainty"]["selective"]["n"] == 28
    assert "out-of-fold images" in gate["uncertainty"]["summary"]
    assert bundle.gate is not None and len(bundle.gate.members) == 3
    prediction = Predictor(result.bundle_path).predict_one(pooled.items[0].path)
    assert prediction.ood["threshold"] == pytest.approx(gate["threshold"])


def test_cv_cancelled_before_the_first_fold_writes_no_model(pooled_folder, tmp_path):
    import threading

    stop = threading.Event()
    stop.set()
    result = cross_validate(tiny_train_config(pooled_folder, epochs=2), CVOptions(folds=2, bootstrap=100),
                            tmp_path / "cv", stop_event=stop)
    assert result.state == "cancelled" and result.bundle_path is None
    assert not (tmp_path / "cv" / "model").exists()
    assert json.loads((tmp_path / "cv" / "progress.json").read_text())["state"] == "cancelled"


def test_bad_cv_options_are_refused_with_a_message(pooled_folder, tmp_path):
    with pytest.raises(TrainingError, match="folds must be at least 2"):
        cross_validate(tiny_train_config(pooled_folder, epochs=2), CVOptions(folds=1), tmp_path / "cv")


def test_cli_cv_prints_the_estimate(pooled_folder, tmp_path, capsys):
    from covidscan.cli import main

    code = main(["cv", "--dataset", "folder", "--root", str(pooled_folder), "--arch", "tiny_cnn", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "8", "--device", "cpu", "--modality", "X-ray",
                 "--folds", "2", "--bootstrap", "100", "--monitor", "last", "--json", "--out", str(tmp_path / "cv")])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 28 and set(printed["ci95"]) >= {"accuracy", "auc"}
    assert "kept its final epoch" in printed["protocol"] and "chose its epoch" not in printed["protocol"]
    weights = (tmp_path / "cv" / "model" / "model.safetensors").read_bytes()
    # The gate is refitted out of fold with a tap; bad combinations are refused with a message.
    assert main(["gate", "fit", "--cv-dir", str(tmp_path / "cv"), "--model", str(tmp_path / "cv" / "model")]) == 2
    assert "either --cv-dir" in capsys.readouterr().err
    assert main(["gate", "fit", "--cv-dir", str(tmp_path / "cv"), "--tap", "features.99"]) == 2
    assert "no layer 'features.99'" in capsys.readouterr().err
    assert main(["gate", "fit", "--cv-dir", str(tmp_path / "cv"), "--tap", "features.2", "--combine", "mean",
                 "--pass-rate", "0.95"]) == 0
    assert "28 out-of-fold images pass (taps features.2)" in capsys.readouterr().out
    card = json.loads((tmp_path / "cv" / "model" / "card.json").read_text())
    assert card["gate"]["taps"] == ["features.2"] and card["gate"]["pass_rate_target"] == 0.95
    assert (tmp_path / "cv" / "model" / "model.safetensors").read_bytes() == weights
    assert load_bundle(tmp_path / "cv" / "model").gate.tap_names == ["features.2"]


def _rows(fold_quality: dict[int, float], seed: int) -> list:
    """OOF rows of 3 folds x 20 images whose logits separate the classes by ``fold_quality[fold]`` (0: noise)."""
    import numpy as np

    from covidscan.oof import OOFRow

    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(3):
        for i in range(20):
            label = i % 2
            margin = fold_quality[fold] * (1 if label == 0 else -1) + rng.normal()
            rows.append(OOFRow(f"f{fold}-{i}.png", f"g{fold}-{i}", label, 0, fold, [margin, 0.0]))
    return rows


def test_input_size_choice_is_cross_fitted_from_the_other_folds():
    from covidscan.cv import choose_input_size, ranking_score

    good, noise = _rows({0: 3.0, 1: 3.0, 2: 3.0}, 0), _rows({0: 0.0, 1: 0.0, 2: 0.0}, 1)
    assert ranking_score(good) > 0.9 > ranking_score(noise)
    chosen, shipped, record = choose_input_size({32: noise, 40: good})
    assert shipped == 40 and record["per_fold"] == {"r0-f0": 40, "r0-f1": 40, "r0-f2": 40}
    assert [r.path for r in chosen] == [r.path for r in good] and chosen == good
    # Size 40 separates only fold 0: fold 0's own rows must not choose it (the other folds prefer 32),
    # while folds 1 and 2 see fold 0's advantage among their "other folds" and take 40.
    mixed = _rows({0: 6.0, 1: 0.0, 2: 0.0}, 2)
    plain = _rows({0: 0.0, 1: 1.0, 2: 1.0}, 3)
    chosen, shipped, record = choose_input_size({32: plain, 40: mixed})
    assert record["per_fold"]["r0-f0"] == 32 and record["per_fold"]["r0-f1"] == record["per_fold"]["r0-f2"] == 40
    assert [r.logits for r in chosen if r.fold == 0] == [r.logits for r in plain if r.fold == 0]
    assert record["candidates"] == [32, 40] and set(record["oof_score"]) == {"32", "40"}


def test_cli_cv_with_candidate_sizes_ships_the_chosen_size(pooled_folder, tmp_path):
    from covidscan.cli import main

    out = tmp_path / "cv"
    assert main(["cv", "--dataset", "folder", "--root", str(pooled_folder), "--arch", "tiny_cnn", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "8", "--device", "cpu", "--modality", "X-ray",
                 "--folds", "2", "--bootstrap", "100", "--monitor", "last", "--eval-size", "32", "--eval-size", "40",
                 "--out", str(out)]) == 0
    card = load_bundle(out / "model").card
    choice = card.training["cross_validation"]["input_size_choice"]
    assert choice["candidates"] == [32, 40] and card.input_size == choice["shipped"] in (32, 40)
    assert "inference size chosen among 32/40 px" in card.metrics["estimate"]["protocol"]
    # oof.csv holds each fold's rows at its own cross-fitted size, and the estimate reproduces from it.
    rows, _ = read_oof_csv(out / OOF_FILE)
    for size in (32, 40):
        assert len(read_oof_csv(out / f"oof-{size}px.csv")[0]) == len(rows) == 28
    for fold in (0, 1):
        at_size = read_oof_csv(out / f"oof-{choice['per_fold'][f'r0-f{fold}']}px.csv")[0]
        assert [r.logits for r in rows if r.fold == fold] == [r.logits for r in at_size if r.fold == fold]
    assert estimate_from_bundle(out / "model") == card.metrics["estimate"]
    assert card.gate["n_calibration"] == 28  # the gate is fitted out of fold at the shipped size
    prediction = Predictor(out / "model").predict_one(next((pooled_folder / "train" / "COVID").iterdir()))
    assert set(prediction.probabilities) == {"COVID", "Normal"}


def test_cli_cv_pretrains_each_fold_on_its_own_training_images_only(pooled_folder, tmp_path, capsys):
    from safetensors.torch import load_file

    from covidscan.cli import main
    from covidscan.pretrain import record_path

    out = tmp_path / "cv"
    argv = ["cv", "--dataset", "folder", "--root", str(pooled_folder), "--arch", "tiny_cnn", "--epochs", "1",
            "--image-size", "32", "--batch-size", "8", "--device", "cpu", "--modality", "X-ray", "--folds", "2",
            "--bootstrap", "100", "--monitor", "last", "--ssl-epochs", "2", "--ssl-batch-size", "4", "--out", str(out)]
    assert main(argv) == 0
    rows, _ = read_oof_csv(out / OOF_FILE)
    for fold in (0, 1):
        weights = out / "ssl" / f"r0-f{fold}.safetensors"
        record = json.loads(record_path(weights).read_text())
        split = json.loads((out / "splits" / f"r0-f{fold}.json").read_text())["splits"]
        seen = [p for p, s in split.items() if s in ("train", "val")]
        # Pretrained on the fold's own train+val images, never on the images it is scored on.
        assert record["images"] == len(seen) and record["config"]["split"] == "train+val"
        assert record["config"]["epochs"] == 2 and record["config"]["batch_size"] == 4
        assert record["config"]["image_size"] == 32 and len(record["losses"]) == 2
        assert {r.path for r in rows if r.fold == fold} == {p for p, s in split.items() if s == "holdout"}
        fold_config = json.loads((out / f"r0-f{fold}" / "config.json").read_text())
        assert fold_config["init_weights"] == str(weights)
        pretrained = load_file(str(weights))
        assert pretrained and "classifier.weight" not in pretrained  # the backbone only
    card = load_bundle(out / "model").card
    assert card.training["cross_validation"]["ssl_epochs"] == 2
    assert "SimCLR-pretrained (2 epochs) on its own training folds' images" in card.metrics["estimate"]["protocol"]
    # A rerun with the same options keeps the pretrained backbones and fold runs; another SimCLR
    # option pretrains again.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "ssl").glob("*.safetensors")}
    models = {p: p.stat().st_mtime_ns for p in out.glob("r0-f*/model/model.safetensors")}
    assert main(argv) == 0
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "ssl").glob("*.safetensors")}
    assert models == {p: p.stat().st_mtime_ns for p in out.glob("r0-f*/model/model.safetensors")}
    assert main([*argv[:-2], "--ssl-temperature", "0.5", "--out", str(out)]) == 0
    assert json.loads(record_path(out / "ssl" / "r0-f0.safetensors").read_text())["config"]["temperature"] == 0.5
    capsys.readouterr()
    assert main([*argv[:-2], "--ssl-batch-size", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "SimCLR batch size must be at least 2" in capsys.readouterr().err


def test_average_oof_scores_the_runs_models_together(tmp_path, capsys):
    """Averaging runs is an ensemble of all their fold models: each image's calibrated probabilities
    averaged over the runs, usable by cv-compare; runs over other images are refused."""
    import numpy as np

    from covidscan.cli import main
    from covidscan.oof import (OOFRow, average_oof, compare_oof, cross_fitted_probabilities, oof_csv, oof_estimate,
                               per_image, read_oof_csv)

    classes = ["COVID", "NonCOVID"]
    good, other = _rows({0: 3.0, 1: 3.0, 2: 3.0}, 0), _rows({0: 1.0, 1: 1.0, 2: 1.0}, 1)
    (tmp_path / "good.csv").write_text(oof_csv(good, classes))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / OOF_FILE).write_text(oof_csv(list(reversed(other)), classes))  # matched by path
    rows, joined_classes = average_oof([tmp_path / "good.csv", tmp_path / "other"])
    assert joined_classes == classes and len(rows) == 120 and {row.repeat for row in rows} == {0, 1}
    paths, _, probs, _ = per_image(rows, cross_fitted_probabilities(rows))
    alone = []
    for run in (tmp_path / "good.csv", tmp_path / "other" / OOF_FILE):
        run_rows, _ = read_oof_csv(run)
        run_paths, _, run_probs, _ = per_image(run_rows, cross_fitted_probabilities(run_rows))
        alone.append(dict(zip(run_paths, run_probs)))
    np.testing.assert_allclose(probs, np.stack([(alone[0][p] + alone[1][p]) / 2 for p in paths]), rtol=1e-5)
    # A run averaged with itself answers what it answers alone.
    twice, _ = average_oof([tmp_path / "good.csv", tmp_path / "good.csv"])
    once, _ = read_oof_csv(tmp_path / "good.csv")
    assert oof_estimate(twice, classes, None, "x", 200)["auc"] == oof_estimate(once, classes, None, "x", 200)["auc"]
    # The command writes the joined rows, prints the estimate, and cv-compare takes the file.
    out = tmp_path / "runs" / "averaged.csv"
    assert main(["cv-average", str(tmp_path / "good.csv"), str(tmp_path / "other"), "--out", str(out),
                 "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    estimate = oof_estimate(rows, classes, None, "x", 200)
    assert "2 runs averaged per image: 60 images in 60 groups" in printed and f"auc                {estimate['auc']:.3f}" in printed
    assert read_oof_csv(out) == (rows, classes)
    assert compare_oof(out, tmp_path / "other", samples=200)["n"] == 60
    (tmp_path / "fewer.csv").write_text(oof_csv(good[:-1], classes))
    assert main(["cv-average", str(tmp_path / "good.csv"), str(tmp_path / "fewer.csv"), "--out", str(out)]) == 2
    assert "can be averaged" in capsys.readouterr().err
    assert main(["cv-average", str(tmp_path / "good.csv"), "--out", str(out)]) == 2
    assert "at least two runs" in capsys.readouterr().err
    assert main(["cv-average", str(tmp_path / "good.csv"), str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "No out-of-fold predictions" in capsys.readouterr().err
    relabelled = [OOFRow(r.path, r.group, 1 - r.label_index, r.repeat, r.fold, r.logits) for r in other]
    (tmp_path / "relabelled.csv").write_text(oof_csv(relabelled, classes))
    assert main(["cv-average", str(tmp_path / "good.csv"), str(tmp_path / "relabelled.csv"), "--out", str(out)]) == 2
    assert "label the same images differently" in capsys.readouterr().err


def test_compare_oof_pairs_the_same_images(tmp_path, capsys):
    from covidscan.cli import main
    from covidscan.oof import compare_oof, oof_csv

    classes = ["COVID", "NonCOVID"]
    good, noise = _rows({0: 3.0, 1: 3.0, 2: 3.0}, 0), _rows({0: 0.0, 1: 0.0, 2: 0.0}, 1)
    for name, rows in (("good", good), ("noise", noise)):
        (tmp_path / name).mkdir()
        (tmp_path / name / OOF_FILE).write_text(oof_csv(rows, classes))
    # The other run lists its images in another order: they are matched by path.
    (tmp_path / "shuffled.csv").write_text(oof_csv(list(reversed(good)), classes))
    same = compare_oof(tmp_path / "good", tmp_path / "shuffled.csv", samples=200)
    assert same["n"] == 60 and same["groups"] == 60
    assert all(d["difference"] == 0 and d["ci95"] == [0, 0] for d in same["differences"].values())
    better = compare_oof(tmp_path / "good", tmp_path / "noise", samples=200)
    auc = better["differences"]["auc"]
    assert auc["difference"] == pytest.approx(better["a"]["auc"] - better["b"]["auc"])
    assert 0 < auc["ci95"][0] <= auc["difference"] <= auc["ci95"][1] and auc["share_above_zero"] == 1.0
    assert better["a"]["auc"] > 0.9 and set(better["differences"]) >= {"auc", "accuracy", "sensitivity"}
    # Runs over other images cannot be paired: a one-line error, no traceback.
    (tmp_path / "fewer.csv").write_text(oof_csv(good[:-1], classes))
    assert main(["cv-compare", str(tmp_path / "good"), str(tmp_path / "fewer.csv")]) == 2
    assert "not of the same images" in capsys.readouterr().err
    assert main(["cv-compare", str(tmp_path / "good"), str(tmp_path / "missing")]) == 2
    assert "No out-of-fold predictions" in capsys.readouterr().err
    assert main(["cv-compare", str(tmp_path / "good"), str(tmp_path / "noise"), "--bootstrap", "0"]) == 2
    assert "at least 100 bootstrap samples" in capsys.readouterr().err
    assert main(["cv-compare", str(tmp_path / "good"), str(tmp_path / "noise"), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "60 images in 60 groups" in printed and f"  {auc['difference']:+.3f} (" in printed


def test_threshold_check_cross_fits_the_threshold_by_fold(tmp_path, capsys):
    """cv-threshold: each fold decided by the threshold best on the other folds, paired against argmax;
    a model that under-calls COVID gains from it, and the decisions are exactly p >= that fold's threshold."""
    import numpy as np

    from covidscan.cli import main
    from covidscan.oof import OOFRow, cross_fitted_probabilities, oof_csv, per_image, read_oof_csv, threshold_check
    from covidscan.training import tune_threshold

    classes = ["COVID", "NonCOVID"]
    rng = np.random.default_rng(0)
    # COVID's logit lowered by 1.5 for every image: argmax calls many COVID images NonCOVID.
    biased = [OOFRow(f"f{fold}-{i}.png", f"g{fold}-{i}", i % 2, 0, fold,
                     [2.0 * (1 if i % 2 == 0 else -1) - 1.5 + rng.normal(), 0.0]) for fold in range(3) for i in range(60)]
    (tmp_path / "biased.csv").write_text(oof_csv(biased, classes))
    record = threshold_check(tmp_path / "biased.csv", samples=200)
    assert record["n"] == 180 and record["positive_class"] == "COVID" and set(record["thresholds"]) == {0, 1, 2}
    paths, labels, probs, _ = per_image(biased, cross_fitted_probabilities(biased))
    fold = np.array([int(p[1]) for p in paths])
    decided = np.zeros(len(paths), dtype=int)
    for k, t in record["thresholds"].items():
        assert t == tune_threshold(labels[fold != k], probs[fold != k], 0)  # chosen without fold k's images
        assert t < 0.5
        decided[fold == k] = np.where(probs[fold == k, 0] >= t, 0, 1)
    assert record["threshold"]["accuracy"] == pytest.approx((decided == labels).mean())
    assert record["argmax"]["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean())
    gain = record["differences"]["accuracy"]
    assert gain["difference"] > 0.05 and gain["ci95"][0] > 0
    assert record["differences"]["sensitivity"]["difference"] > 0
    # The command prints the same; several partitions, three classes and a missing run get one-line errors.
    assert main(["cv-threshold", str(tmp_path / "biased.csv"), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "180 images in 180 groups" in printed and f"  {gain['difference']:+.3f} (" in printed
    reshuffled = biased + [OOFRow(r.path, r.group, r.label_index, 1, (r.fold + 1) % 3, r.logits) for r in biased]
    (tmp_path / "repeats.csv").write_text(oof_csv(reshuffled, classes))
    assert main(["cv-threshold", str(tmp_path / "repeats.csv")]) == 2
    assert "several fold partitions" in capsys.readouterr().err
    rows, _ = read_oof_csv(tmp_path / "biased.csv")
    (tmp_path / "three.csv").write_text(oof_csv([OOFRow(r.path, r.group, r.label_index, 0, r.fold, [*r.logits, 0.0])
                                                 for r in rows], ["Covid", "Normal", "Viral Pneumonia"]))
    assert main(["cv-threshold", str(tmp_path / "three.csv")]) == 2
    assert "two-class models; this run has 3 classes" in capsys.readouterr().err
    assert main(["cv-threshold", str(tmp_path / "missing")]) == 2
    assert "No out-of-fold predictions" in capsys.readouterr().err
