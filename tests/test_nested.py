"""Nested cross-validation (fold ensemble vs single model) end to end on a tiny synthetic set, and
the paired bootstrap of a metric difference on cases with a known answer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic import two_class_folder

from covidscan.cli import main
from covidscan.oof import read_oof_csv
from covidscan.errors import TrainingError
from covidscan.estimate import paired_differences
from covidscan.nested import nested_cv, recipe_from_card


@pytest.fixture(scope="module")
def cv_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-fold `covidscan cv` run of tiny_cnn over 2 x 16 pooled images (a test/ split left out)."""
    base = tmp_path_factory.mktemp("nested")
    root = base / "data"
    two_class_folder(root, {"train": 12, "val": 4, "test": 3}, size=40)
    code = main(["cv", "--dataset", "folder", "--root", str(root), "--arch", "tiny_cnn", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "8", "--device", "cpu", "--modality", "X-ray", "--seed", "3",
                 "--folds", "2", "--bootstrap", "100", "--monitor", "last", "--eval-size", "32", "--eval-size", "40",
                 "--out", str(base / "cv")])
    assert code == 0
    return base / "cv" / "model", root


def test_the_recipe_is_read_back_from_the_card(cv_bundle, tmp_path):
    from covidscan.bundle import read_card

    bundle, root = cv_bundle
    config, options = recipe_from_card(read_card(bundle), root=tmp_path)
    assert (config.arch, config.epochs, config.image_size, config.seed, config.monitor) == ("tiny_cnn", 1, 32, 3, "last")
    assert (options.folds, options.bootstrap, options.eval_sizes) == (2, 100, (32, 40))
    assert config.root == str(tmp_path) and config.command.startswith("covidscan cv --dataset folder")


def test_nested_cv_scores_every_outer_image_once_with_models_that_never_saw_it(cv_bundle, tmp_path):
    bundle, root = cv_bundle
    out = tmp_path / "nested"
    record = nested_cv(bundle, out, inner_folds=2)
    shipped, _ = read_oof_csv(bundle / "oof.csv")
    fold_of = {row.path: row.fold for row in shipped}
    for name in ("ensemble", "single"):
        rows, classes = read_oof_csv(out / f"oof-{name}.csv")
        assert classes == ["COVID", "Normal"]
        assert sorted(r.path for r in rows) == sorted(fold_of)  # every pooled image once, no test image
        assert all(fold_of[r.path] == r.fold for r in rows)
        est = record["estimates"][name]
        assert est["n"] == 32 and "nested cross-validation" in est["protocol"]
    for fold in (0, 1):
        held = {p for p, f in fold_of.items() if f == fold}
        inner = json.loads((out / f"outer-f{fold}" / "cv.json").read_text())
        assert inner["images"] == 32 - len(held) and inner["options"]["folds"] == 2
        # No inner fold model trained or chose anything on the outer fold it is scored on.
        for inner_fold in (0, 1):
            splits = json.loads((out / f"outer-f{fold}" / "splits" / f"r0-f{inner_fold}.json").read_text())["splits"]
            assert not held & set(splits)
        assert record["input_size_per_outer_fold"][f"f{fold}"] in (32, 40)
    # The single model is the bundle's own fold model: its logits are those the cv run stored at that size.
    single, _ = read_oof_csv(out / "oof-single.csv")
    for fold, size in record["input_size_per_outer_fold"].items():
        stored = {r.path: r.logits for r in read_oof_csv(bundle.parent / f"oof-{size}px.csv")[0]}
        mine = [r for r in single if f"f{r.fold}" == fold]
        assert mine and np.allclose([r.logits for r in mine], [stored[r.path] for r in mine], atol=2e-2)
    diff = record["ensemble_minus_single"]
    assert set(diff) >= {"accuracy", "macro_f1"}
    for name, value in diff.items():
        assert value["ci95"][0] <= value["difference"] <= value["ci95"][1]
        assert value["difference"] == pytest.approx(
            record["estimates"]["ensemble"][name] - record["estimates"]["single"][name])
    assert json.loads((out / "nested.json").read_text()) == record
    # A rerun resumes: finished inner runs of the same recipe are reused, not retrained.
    trained = (out / "outer-f1" / "model" / "model.safetensors").stat().st_mtime_ns
    again = nested_cv(bundle, out, inner_folds=2, outer_folds=[1, 0])
    assert (out / "outer-f1" / "model" / "model.safetensors").stat().st_mtime_ns == trained
    assert again == record
    for wrong in ([5, 0], [1]):
        with pytest.raises(TrainingError, match="at least two of"):
            nested_cv(bundle, out, inner_folds=2, outer_folds=wrong)


def test_cli_nested_prints_the_comparison_and_refuses_a_plain_model(cv_bundle, tmp_path, capsys):
    bundle, _ = cv_bundle
    assert main(["cv-nested", str(bundle), "--inner-folds", "2", "--out", str(tmp_path / "n")]) == 0
    printed = capsys.readouterr().out
    assert "fold ensemble" in printed and "single model" in printed and "macro_f1" in printed
    assert main(["cv-nested", str(bundle / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    assert "holds no oof.csv" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="at least 2 folds"):
        nested_cv(bundle, tmp_path / "k", inner_folds=1)


def test_paired_differences_have_known_answers():
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2
    perfect = np.eye(2)[labels]
    coin = np.full((200, 2), 0.5) + rng.normal(0, 0.01, (200, 2))
    coin /= coin.sum(axis=1, keepdims=True)
    groups = [f"g{i}" for i in range(200)]
    same = paired_differences(labels, perfect, perfect, groups, ["a", "b"])
    assert all(v["difference"] == 0 and v["ci95"] == [0, 0] for v in same.values())
    better = paired_differences(labels, perfect, coin, groups, ["a", "b"], samples=200)
    assert better["accuracy"]["difference"] == pytest.approx(1 - np.mean(coin.argmax(1) == labels))
    assert better["auc"]["ci95"][0] > 0.3 and better["auc"]["share_above_zero"] == 1.0
