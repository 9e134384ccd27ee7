"""covidscan.rescore: a fold ensemble's estimate restated from the members it stores."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from synthetic import tiny_train_config

from covidscan.bundle import CARD_FILE, load_bundle, save_bundle
from covidscan.cli import main
from covidscan.cv import CVOptions, cross_validate
from covidscan.oof import OOF_FILE, estimate_from_bundle, read_oof_csv
from covidscan.repeats import REPEATS_FILE, attach_repeated_estimate
from covidscan.join import join_runs
from covidscan.rescore import RESTATED_SENTENCE, fold_sizes, held_out_logits

# float32 out-of-fold logits, each fold at its cross-fitted size among 32 and 40 px.
OPTIONS = dict(folds=2, bootstrap=100, weights_dtype="float32", gate_pass_rate=0.95, eval_sizes=(32, 40))


def as_older_float16(bundle_dir: Path, out: Path) -> Path:
    """``bundle_dir`` as bundles were before cv scored at the stored precision: its out-of-fold
    logits from float32 fold models, its weights stored in float16."""
    bundle = load_bundle(bundle_dir)
    bundle.card.weights_dtype = "float16"
    gate = bundle.card.gate
    save_bundle(bundle.model, bundle.card, out)  # (a re-saved bundle drops its gate: put it back)
    for name in (OOF_FILE, REPEATS_FILE, gate["file"]):
        if (bundle_dir / name).is_file():
            shutil.copy(bundle_dir / name, out / name)
    data = json.loads((out / CARD_FILE).read_text())
    (out / CARD_FILE).write_text(json.dumps({**data, "gate": gate}))
    return out


@pytest.fixture(scope="module")
def older(pooled_folder, tmp_path_factory) -> dict[str, Path]:
    """An older float16 fold ensemble with a repeated estimate over 2 partitions, and an older join of two runs."""
    out = tmp_path_factory.mktemp("rescore")
    config = tiny_train_config(pooled_folder, monitor="last")
    assert cross_validate(config, CVOptions(**OPTIONS), out / "one").state == "succeeded"
    shutil.copytree(out / "one", out / "two")
    assert cross_validate(config, CVOptions(**OPTIONS, repeats=2), out / "two").state == "succeeded"
    attach_repeated_estimate(out / "one" / "model", out / "two")
    assert cross_validate(tiny_train_config(pooled_folder, monitor="last", lr=0.003), CVOptions(**OPTIONS),
                          out / "low").state == "succeeded"
    join_runs([out / "one", out / "low"], out / "joined")
    return {"single": as_older_float16(out / "one" / "model", out / "older"),
            "joined": as_older_float16(out / "joined", out / "older-joined")}


def test_the_estimate_is_restated_from_the_stored_members(older, pooled_folder, tmp_path, capsys):
    bundle = tmp_path / "model"
    shutil.copytree(older["single"], bundle)
    sizes = fold_sizes(load_bundle(bundle).card)
    assert set(sizes) == {(0, 0), (0, 1)} and set(sizes.values()) <= {32, 40}  # each fold at its cross-fitted size
    before_rows, _ = read_oof_csv(bundle / OOF_FILE)
    before_repeats, _ = read_oof_csv(bundle / REPEATS_FILE)
    stored = held_out_logits(bundle, pooled_folder, sizes=sizes).plain
    # float16 rounding moved the members' logits away from those the card was estimated from.
    assert np.abs(stored - [row.logits for row in before_rows]).max() > 1e-6

    assert main(["cv-rescore", str(bundle), "--root", str(pooled_folder)]) == 0
    printed = capsys.readouterr().out
    assert "logits moved by up to" in printed and "repeated estimate (28 images)" in printed

    rows, _ = read_oof_csv(bundle / OOF_FILE)
    assert [(r.path, r.repeat, r.fold) for r in rows] == [(r.path, r.repeat, r.fold) for r in before_rows]
    np.testing.assert_allclose([r.logits for r in rows], stored, rtol=0, atol=1e-6)
    card = json.loads((bundle / CARD_FILE).read_text())
    estimate, repeated = card["metrics"]["estimate"], card["metrics"]["repeated_estimate"]
    # Both estimates reproduce from the files they name, and say they were restated.
    assert estimate_from_bundle(bundle) == estimate
    assert estimate_from_bundle(bundle, "repeated_estimate") == repeated
    # The gate's accuracy-by-certainty summary is remade from the new rows (all images: the estimate's accuracy).
    assert card["gate"]["uncertainty"]["selective"]["accuracy"][0] == pytest.approx(estimate["accuracy"])
    assert load_bundle(bundle).gate is not None
    assert estimate["protocol"].count(RESTATED_SENTENCE) == 1 and repeated["protocol"].endswith(RESTATED_SENTENCE)
    # The repeated file's own partition takes the rescored rows; the other partition's stay as scored.
    repeat_rows, _ = read_oof_csv(bundle / REPEATS_FILE)
    assert [r for r in repeat_rows if r.repeat == 0] == rows
    assert [r for r in repeat_rows if r.repeat == 1] == [r for r in before_repeats if r.repeat == 1]
    # The weights are untouched, and a second restatement changes nothing.
    assert load_bundle(bundle).card.weights_sha256 == load_bundle(older["single"]).card.weights_sha256
    restated = card["training"]["cross_validation"]["restated_from_stored_weights"]
    assert restated["input_size_per_fold"] == {f"r{r}-f{f}": size for (r, f), size in sorted(sizes.items())}
    assert 1e-6 < restated["max_logit_change"] < 0.01
    files = {name: (bundle / name).read_bytes() for name in (CARD_FILE, OOF_FILE, REPEATS_FILE)}
    assert main(["cv-rescore", str(bundle), "--root", str(pooled_folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_logit_change"] < 1e-6
    assert files == {name: (bundle / name).read_bytes() for name in files}


def test_a_join_is_restated_at_each_runs_fold_sizes(older, pooled_folder, tmp_path, capsys):
    card = load_bundle(older["joined"]).card
    runs = card.training["cross_validation"]["joined_runs"]
    assert all(set(run["input_size_per_fold"]) == {"r0-f0", "r0-f1"} for run in runs)
    sizes = fold_sizes(card)  # run j's repeat r is oof.csv repeat 2r + j
    assert sizes == {(j, int(fold[-1])): size for j, run in enumerate(runs) for fold, size in run["input_size_per_fold"].items()}
    bundle = tmp_path / "model"
    shutil.copytree(older["joined"], bundle)
    assert main(["cv-rescore", str(bundle), "--root", str(pooled_folder)]) == 0
    rows, _ = read_oof_csv(bundle / OOF_FILE)
    np.testing.assert_allclose([r.logits for r in rows], held_out_logits(bundle, pooled_folder, sizes=sizes).plain,
                               rtol=0, atol=1e-6)
    assert estimate_from_bundle(bundle) == json.loads((bundle / CARD_FILE).read_text())["metrics"]["estimate"]
    capsys.readouterr()
    # A join written before joins recorded their runs' fold sizes: refused until the sizes are given.
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(older["joined"], unrecorded)
    data = json.loads((unrecorded / CARD_FILE).read_text())
    for run in data["training"]["cross_validation"]["joined_runs"]:
        del run["input_size_per_fold"]
    (unrecorded / CARD_FILE).write_text(json.dumps(data))
    assert main(["cv-rescore", str(unrecorded), "--root", str(pooled_folder)]) == 2
    assert "--fold-size" in capsys.readouterr().err
    given = [f"r{r}-f{f}={size}" for (r, f), size in sizes.items()]
    assert main(["cv-rescore", str(unrecorded), "--root", str(pooled_folder), *[f"--fold-size={g}" for g in given]]) == 0
    assert (unrecorded / OOF_FILE).read_bytes() == (bundle / OOF_FILE).read_bytes()
    assert main(["cv-rescore", str(unrecorded), "--root", str(pooled_folder), "--fold-size", "r0-f1:288"]) == 2
    assert "is not r<repeat>-f<fold>=<px>" in capsys.readouterr().err


def test_what_cannot_be_restated_gets_a_message_and_is_left_alone(older, pooled_folder, tmp_path, capsys):
    fold_model = older["single"].parent / "one" / "r0-f0" / "model"
    assert main(["cv-rescore", str(fold_model), "--root", str(pooled_folder)]) == 2
    assert "has no cross-validated estimate to restate" in capsys.readouterr().err
    bundle = tmp_path / "model"
    shutil.copytree(older["single"], bundle)
    files = {path.name: path.read_bytes() for path in bundle.iterdir()}
    assert main(["cv-rescore", str(bundle), "--root", str(tmp_path)]) == 2
    assert "Give the dataset folder the model was cross-validated on" in capsys.readouterr().err
    assert files == {path.name: path.read_bytes() for path in bundle.iterdir()}
