"""Training: a 2-epoch tiny_cnn run on a synthetic 2-class folder writes the run-directory contract
and a loadable bundle; SIGTERM cancels cleanly; runs are reproducible; the LR finder is finite."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from covidscan import training
from covidscan.bundle import load_bundle
from covidscan.errors import TrainingError
from covidscan.predictor import Predictor
from covidscan.training import METRICS_HEADER, TrainConfig, find_lr, grid_search, train
from jobs_helpers import metrics_csv
from test_datasets import make_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "two", per_class=12, size=40)


def tiny_config(root: Path, **changes) -> TrainConfig:
    options = dict(dataset="folder", root=str(root), arch="tiny_cnn", epochs=2, image_size=32, batch_size=8,
                   lr=0.01, device="cpu", modality="X-ray", window=None, seed=3)
    options.update(changes)
    return TrainConfig(**options)


def test_two_epoch_run_writes_the_run_directory_and_a_loadable_bundle(folder, tmp_path):
    seen_states = []
    result = train(tiny_config(folder, augment="strong", balance="sampler"), tmp_path / "run",
                   progress_callback=lambda record: seen_states.append(record["state"]))
    run = tmp_path / "run"
    assert result.state == "succeeded" and result.epochs_run == 2
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "tiny_cnn" and config["image_sizes"] == [32] and config["seed"] == 3
    rows = metrics_csv(run)
    assert list(rows[0]) == METRICS_HEADER and [int(r["epoch"]) for r in rows] == [1, 2]
    assert int(rows[1]["step"]) == 2 * int(rows[0]["step"]) > 0
    assert all(math.isfinite(float(r["train_loss"])) and 0 <= float(r["val_accuracy"]) <= 1 for r in rows)
    progress = json.loads((run / "progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["epoch"] == 2 and progress["monitor"] == "val_auc"
    assert progress["steps_per_epoch"] == int(rows[0]["step"]) and "updated" in progress
    assert seen_states[0] == "running" and seen_states[-1] == "succeeded"
    bundle = load_bundle(run / "model")
    card = bundle.card
    assert card.classes == ["COVID", "Normal"] and card.input_size == 32 and card.modality == "X-ray"
    assert card.positive_class == "COVID" and card.training["seed"] == 3
    assert set(card.metrics) == {"val"} and card.metrics["val"]["n"] == 4
    assert card.metrics["val"]["accuracy"] == pytest.approx(result.val_metrics["accuracy"])
    prediction = Predictor(bundle).predict_one(next((folder / "COVID").iterdir()))
    assert set(prediction.probabilities) == {"COVID", "Normal"}
    assert not [p for p in run.iterdir() if p.name.startswith(".model")]  # no staging folders left


def test_same_seed_same_run(folder, tmp_path):
    first = train(tiny_config(folder, epochs=1), tmp_path / "a")
    second = train(tiny_config(folder, epochs=1), tmp_path / "b")
    assert [r["train_loss"] for r in metrics_csv(tmp_path / "a")] == [r["train_loss"] for r in metrics_csv(tmp_path / "b")]
    assert first.val_metrics["confusion_matrix"] == second.val_metrics["confusion_matrix"]


def test_learns_an_easy_task(folder, tmp_path):
    result = train(tiny_config(folder, epochs=6, augment="none", lr=0.03), tmp_path / "run")
    assert result.best_metric is not None and result.best_metric >= 0.9  # bright vs dark squares


def test_sigterm_mid_epoch_cancels_without_a_bundle(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(training.RunWriter, "every_s", 0.0)

    def kill_at_step_two(record):
        if record["state"] == "running" and record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    result = train(tiny_config(folder, batch_size=2), tmp_path / "run", progress_callback=kill_at_step_two)
    assert result.state == "cancelled"
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["state"] == "cancelled" and progress["step"] == 2
    assert not (tmp_path / "run" / "model").exists()
    assert metrics_csv(tmp_path / "run") == []  # the epoch never finished
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored


def test_cli_exit_status_130_on_sigterm(folder, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "covidscan", "train", "--dataset", "folder", "--root", str(folder),
               "--arch", "tiny_cnn", "--epochs", "200", "--image-size", "32", "--batch-size", "2",
               "--device", "cpu", "--modality", "X-ray", "--out", str(run)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = run / "progress.json"
        if progress.exists() and json.loads(progress.read_text()).get("step", 0) >= 1:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert json.loads((run / "progress.json").read_text())["state"] == "cancelled"
    assert not [p for p in run.iterdir() if p.name.startswith(".model")]
    if (run / "model").exists():  # a complete earlier best checkpoint may exist; never a partial one
        load_bundle(run / "model")


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "covidscan", "train", "--dataset", "folder", "--root",
                           str(tmp_path / "missing"), "--modality", "CT", "--out", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("covidscan: error:") and "does not exist" in done.stderr
    assert json.loads((tmp_path / "run" / "progress.json").read_text())["state"] == "failed"


def test_invalid_options_are_rejected(folder, tmp_path):
    with pytest.raises(TrainingError, match="augment must be one of"):
        train(tiny_config(folder, augment="extreme"), tmp_path / "run")
    with pytest.raises(TrainingError, match="EMA decay must lie in"):
        train(tiny_config(folder, ema_decay=1.0), tmp_path / "run")
    with pytest.raises(TrainingError, match="number of epochs to average"):
        train(tiny_config(folder, epochs=2, average_last_epochs=3), tmp_path / "run")
    with pytest.raises(TrainingError, match="needs every epoch to run"):
        train(tiny_config(folder, average_last_epochs=2, patience=3), tmp_path / "run")
    with pytest.raises(TrainingError, match="leaves nothing for early stopping"):
        train(tiny_config(folder, monitor="last", patience=3), tmp_path / "run")


def test_weight_ema_run_learns_and_saves_the_averaged_weights(folder, tmp_path):
    from covidscan.cli import main

    assert main(["train", "--dataset", "folder", "--root", str(folder), "--arch", "tiny_cnn", "--epochs", "6",
                 "--image-size", "32", "--batch-size", "8", "--lr", "0.03", "--augment", "none", "--device", "cpu",
                 "--modality", "X-ray", "--seed", "3", "--ema-decay", "0.5", "--monitor", "last",
                 "--out", str(tmp_path / "ema")]) == 0
    assert json.loads((tmp_path / "ema" / "config.json").read_text())["ema_decay"] == 0.5
    raw = train(tiny_config(folder, epochs=6, augment="none", lr=0.03), tmp_path / "raw")
    ema_card = load_bundle(tmp_path / "ema" / "model").card
    assert ema_card.training["config"]["ema_decay"] == 0.5 and ema_card.metrics["val"]["auc"] >= 0.9
    assert ema_card.training["epoch"] == 6  # monitor "last": the final epoch, not a val-chosen one
    ema_weights = load_bundle(tmp_path / "ema" / "model").model.state_dict()
    raw_weights = load_bundle(raw.bundle_path).model.state_dict()
    assert any(not torch.equal(ema_weights[k], raw_weights[k]) for k in raw_weights)  # same seed, other weights


def test_batch_mixer_mixes_images_and_labels_by_the_same_weight():
    from covidscan.training.data import batch_mixer

    assert batch_mixer("none", 0.4, 2) is None
    images = torch.stack([torch.full((3, 8, 8), 0.0), torch.full((3, 8, 8), 1.0)])
    labels = torch.tensor([0, 1])
    torch.manual_seed(0)
    mixed, soft = batch_mixer("mixup", 0.4, 2)(images, labels)
    assert soft.shape == (2, 2) and torch.allclose(soft.sum(dim=1), torch.ones(2))
    # Image 0 is mixed with image 1 (the batch rolled by one): its pixels equal its label's share of class 1.
    assert torch.allclose(mixed[0], torch.full((3, 8, 8), float(soft[0, 1])), atol=1e-6)
    assert 0 < float(soft[0, 1]) < 1
    torch.manual_seed(0)
    cut, cut_soft = batch_mixer("cutmix", 1.0, 2)(images, labels)
    # CutMix pastes a box: the label weight of class 1 is the pasted area's share of image 0.
    assert float(cut[0].mean()) == pytest.approx(float(cut_soft[0, 1]), abs=1e-6)
    assert set(cut[0].unique().tolist()) <= {0.0, 1.0}


def test_random_erasing_blacks_out_a_rectangle_of_each_image():
    from covidscan.training.data import augmentation

    assert augmentation("none", 32, 32) is None and augmentation("none", 32, 32, erasing=0.0) is None
    erase = augmentation("none", 32, 32, erasing=1.0)
    torch.manual_seed(0)
    for _ in range(20):
        out = erase(torch.full((3, 32, 32), 200, dtype=torch.uint8))
        assert out.dtype == torch.uint8 and set(out.unique().tolist()) == {0, 200}
        black = (out == 0).all(dim=0)
        rows, cols = black.any(dim=1).nonzero(), black.any(dim=0).nonzero()
        # one rectangle: every pixel inside the box spanned by the black pixels is black
        assert bool(black[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all())
        assert 0.02 * 1024 * 0.5 <= int(black.sum()) <= 0.33 * 1024 * 1.5
    strong = augmentation("strong", 32, 40, erasing=0.5)
    assert strong(torch.full((3, 40, 40), 200, dtype=torch.uint8)).shape == (3, 32, 32)
    with pytest.raises(TrainingError, match="random-erasing probability"):
        TrainConfig(dataset="folder", root="x", random_erasing=1.5).validate()


def test_mixup_cutmix_run_learns_and_records_the_option(folder, tmp_path):
    from covidscan.cli import main

    assert main(["train", "--dataset", "folder", "--root", str(folder), "--arch", "tiny_cnn", "--epochs", "6",
                 "--image-size", "32", "--batch-size", "8", "--lr", "0.03", "--augment", "none", "--device", "cpu",
                 "--modality", "X-ray", "--seed", "3", "--mix", "mixup-cutmix", "--mix-alpha", "0.4",
                 "--random-erasing", "0.25",
                 "--out", str(tmp_path / "mix")]) == 0
    card = load_bundle(tmp_path / "mix" / "model").card
    assert card.training["config"]["mix"] == "mixup-cutmix" and card.training["config"]["mix_alpha"] == 0.4
    assert card.training["config"]["random_erasing"] == 0.25
    assert card.metrics["val"]["auc"] >= 0.9  # bright vs dark squares are still learnt from mixed, erased batches
    plain = [r["train_loss"] for r in metrics_csv(tmp_path / "mix")]
    raw = train(tiny_config(folder, epochs=6, augment="none", lr=0.03), tmp_path / "raw")
    assert raw.state == "succeeded" and plain != [r["train_loss"] for r in metrics_csv(tmp_path / "raw")]
    with pytest.raises(TrainingError, match="mix must be one of"):
        train(tiny_config(folder, mix="blend"), tmp_path / "bad")


def test_progressive_resize_and_freeze(folder, tmp_path):
    result = train(tiny_config(folder, epochs=2, progressive_resize=[24, 32], freeze_epochs=1,
                               schedule="plateau", tune_threshold=True), tmp_path / "run")
    card = load_bundle(tmp_path / "run" / "model").card
    assert card.input_size == 32 and result.epochs_run == 2
    assert card.threshold is None or 0 < card.threshold < 1


def test_lr_finder_returns_a_finite_increasing_curve(folder):
    curve = find_lr(tiny_config(folder), start_lr=1e-5, end_lr=1.0, num_steps=20)
    assert len(curve.lrs) >= 6 and len(curve.lrs) == len(curve.losses)
    assert all(b > a for a, b in zip(curve.lrs, curve.lrs[1:]))
    assert all(math.isfinite(loss) for loss in curve.losses)
    assert curve.suggestion is not None and 1e-5 <= curve.suggestion <= 1.0


def test_grid_search_ranks_runs(folder, tmp_path):
    rows = grid_search(tiny_config(folder, epochs=1), tmp_path / "grid", lrs=[0.01, 0.001], archs=["tiny_cnn"],
                       image_sizes=[32])
    assert len(rows) == 2 and {r["lr"] for r in rows} == {0.01, 0.001}
    metrics = [r["best_metric"] for r in rows]
    assert metrics == sorted(metrics, reverse=True)
    assert (tmp_path / "grid" / "grid.csv").read_text().count("\n") == 3


def test_tail_average_run_saves_the_averaged_weights_of_its_last_epochs(folder, tmp_path):
    from covidscan.cli import main

    common = ["train", "--dataset", "folder", "--root", str(folder), "--arch", "tiny_cnn", "--epochs", "5",
              "--image-size", "32", "--batch-size", "8", "--lr", "0.03", "--augment", "none", "--device", "cpu",
              "--modality", "X-ray", "--seed", "3", "--monitor", "last"]
    assert main(common + ["--average-last-epochs", "3", "--out", str(tmp_path / "averaged")]) == 0
    assert main(common + ["--out", str(tmp_path / "final")]) == 0
    averaged = load_bundle(tmp_path / "averaged" / "model")
    assert averaged.card.training["config"]["average_last_epochs"] == 3 and averaged.card.training["epoch"] == 5
    assert averaged.card.metrics["val"]["auc"] >= 0.9  # the average of a learning run still separates the classes
    final = load_bundle(tmp_path / "final" / "model").model.state_dict()
    assert any(not torch.equal(averaged.model.state_dict()[k], final[k]) for k in final)
