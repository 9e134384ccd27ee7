"""covidscan.mirror_check: a fold ensemble's held-out images rescored plain and mirror-averaged, paired."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic import tiny_train_config

from covidscan.bundle import load_bundle
from covidscan.cli import main
from covidscan.cv import CVOptions, cross_validate
from covidscan.evaluation import predict_logits
from covidscan.join import join_runs
from covidscan.mirror_check import MIRRORED_FILE, PLAIN_FILE, mirror_check
from covidscan.oof import OOF_FILE, compare_oof, read_oof_csv

# float16 weights (the default): cv scores each held-out fold with its fold model's weights rounded as
# the ensemble stores them, so plain rescoring by the stored members must reproduce oof.csv.
OPTIONS = dict(folds=2, bootstrap=100, weights_dtype="float16", gate_pass_rate=0.95)


@pytest.fixture(scope="module")
def runs(pooled_folder, tmp_path_factory) -> dict[str, Path]:
    """A 2-fold run over two fold partitions, and two one-partition runs joined into one model."""
    out = tmp_path_factory.mktemp("mirror")
    repeated = out / "repeated"
    assert cross_validate(tiny_train_config(pooled_folder, monitor="last"), CVOptions(**OPTIONS, repeats=2),
                          repeated).state == "succeeded"
    singles = [out / "lr-high", out / "lr-low"]
    for run, lr in zip(singles, (0.01, 0.003)):
        assert cross_validate(tiny_train_config(pooled_folder, lr=lr, monitor="last"), CVOptions(**OPTIONS),
                              run).state == "succeeded"
    join_runs(singles, out / "joined")
    return {"repeated": repeated / "model", "joined": out / "joined"}


@pytest.mark.parametrize("model", ["repeated", "joined"])
def test_each_held_out_image_is_rescored_by_the_member_that_never_saw_it(runs, model, pooled_folder, tmp_path):
    bundle_dir = runs[model]
    record = mirror_check(bundle_dir, pooled_folder, tmp_path, samples=100)
    stored, classes = read_oof_csv(bundle_dir / OOF_FILE)
    plain, plain_classes = read_oof_csv(tmp_path / PLAIN_FILE)
    mirrored, _ = read_oof_csv(tmp_path / MIRRORED_FILE)
    assert plain_classes == classes and len(stored) == len(plain) == len(mirrored) == 2 * 28  # 2 partitions / runs
    # Rows keep their image, repeat and fold; the plain logits are the stored ones (each row's member
    # found by its repeat and fold: another member would score it differently).
    assert [(r.path, r.repeat, r.fold) for r in plain] == [(r.path, r.repeat, r.fold) for r in stored]
    np.testing.assert_allclose([r.logits for r in plain], [r.logits for r in stored], rtol=0, atol=1e-6)
    # Mirrored: the member's logits on the image and its mirror averaged, as covidscan evaluate --tta does.
    bundle = load_bundle(bundle_dir)
    from covidscan.datasets import load_split_for

    data, _, images = load_split_for(bundle.card, "folder", pooled_folder, "train")
    row = next(r for r in mirrored if r.path.startswith("train/"))
    at = next(i for i, item in enumerate(data.items) if item.path == pooled_folder / row.path)
    # Members in order: partition (or joined run) r's fold f is member 2r + f in both models.
    member = bundle.model.members[2 * row.repeat + row.fold]
    expected = predict_logits(member, images[at:at + 1], bundle.card.mean, bundle.card.std, tta=True)[0]
    np.testing.assert_allclose(row.logits, expected.numpy(), atol=1e-4)
    assert not np.allclose([r.logits for r in mirrored], [r.logits for r in plain])
    # The comparison is cv-compare's of the two written files, mirrored minus plain.
    again = compare_oof(tmp_path / MIRRORED_FILE, tmp_path / PLAIN_FILE, samples=100)
    assert record == again and record["n"] == 28 and set(record["differences"]) >= {"auc", "accuracy", "macro_f1"}


def test_cli_prints_the_paired_table_and_refuses_what_it_cannot_rescore(runs, pooled_folder, tmp_path, capsys):
    out = tmp_path / "rescored"
    assert main(["cv-mirror", str(runs["repeated"]), "--root", str(pooled_folder), "--out", str(out),
                 "--bootstrap", "100"]) == 0
    printed = capsys.readouterr().out
    assert "28 images in" in printed and "mirrored - plain (95% paired interval)" in printed
    assert f"{out / MIRRORED_FILE}, {out / PLAIN_FILE}" in printed
    # A fold run's own model has no out-of-fold predictions to rescore.
    fold_model = runs["repeated"].parent / "r0-f0" / "model"
    assert main(["cv-mirror", str(fold_model), "--root", str(pooled_folder), "--out", str(tmp_path / "x")]) == 2
    assert "holds no out-of-fold predictions" in capsys.readouterr().err
    # The wrong dataset folder: a clear message, nothing written.
    assert main(["cv-mirror", str(runs["joined"]), "--root", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "Give the dataset folder the model was cross-validated on" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    assert main(["cv-mirror", str(runs["joined"]), "--root", str(pooled_folder), "--out", str(out),
                 "--bootstrap", "0"]) == 2
    assert "bootstrap" in capsys.readouterr().err
