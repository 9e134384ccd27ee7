"""SimCLR pretraining: a tiny_cnn run on a synthetic folder writes backbone weights + a record that
``load_matching_weights`` and ``train(init_weights=...)`` accept; seeded runs repeat; the loss falls
below chance; stops leave no file; bad input is a one-line CLI error."""
from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_datasets import make_folder

from covidscan.bundle import load_bundle
from covidscan.cli import main
from covidscan.errors import TrainingError
from covidscan.models import create_model, get_head, get_spec
from covidscan.pretrain import (
    PretrainConfig,
    backbone_state,
    build_contrastive_model,
    pretrain,
    record_path,
)
from covidscan.training import TrainConfig, load_matching_weights, train

TINY_HEAD = {"classifier.weight", "classifier.bias"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "two", per_class=12, size=40)


def tiny_config(root: Path, **changes) -> PretrainConfig:
    options = {"dataset": "folder", "root": str(root), "arch": "tiny_cnn", "pretrained": False, "epochs": 3,
               "image_size": 32, "batch_size": 8, "lr": 0.01, "device": "cpu", "window": None, "seed": 1}
    options.update(changes)
    return PretrainConfig(**options)


@pytest.fixture(scope="module")
def pretrained_file(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl") / "tiny.safetensors"
    return pretrain(tiny_config(folder), out), out


def test_run_writes_backbone_weights_and_record_and_learns(pretrained_file, folder):
    result, out = pretrained_file
    assert result.state == "succeeded" and result.out_path == out and out.is_file()
    assert result.images == 20  # the carved-out train split: 4 of the 24 images went to val
    assert len(result.losses) == len(result.seconds) == 3 and result.steps == 3 * 2
    assert all(math.isfinite(loss) for loss in result.losses)
    chance = math.log(2 * 8 - 1)  # NT-Xent of uninformative embeddings with 16 views per batch
    assert result.losses[-1] < result.losses[0] and result.losses[-1] < chance - 0.2
    record = json.loads(record_path(out).read_text())
    assert record_path(out).name == "tiny.safetensors.json"
    assert record["losses"] == result.losses and record["images"] == 20
    assert record["config"]["arch"] == "tiny_cnn" and record["config"]["temperature"] == 0.2
    assert record["command"] and record["chance_loss"] == pytest.approx(chance)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_pooled_train_and_val_images_are_all_used(folder, tmp_path):
    # Before cross-validation the pooled images (train+val, labels ignored) are the ones to pretrain on.
    result = pretrain(tiny_config(folder, split="train+val", epochs=1), tmp_path / "pooled.safetensors")
    assert result.state == "succeeded" and result.images == 24  # 20 train + the 4 carved out for val
    assert json.loads(record_path(result.out_path).read_text())["config"]["split"] == "train+val"


def test_saved_names_are_the_classifiers_minus_its_head(pretrained_file):
    _, out = pretrained_file
    saved = load_file(str(out))
    expected = create_model("tiny_cnn", 2).state_dict()
    assert set(saved) == set(expected) - TINY_HEAD
    assert all(saved[name].shape == expected[name].shape for name in saved)


def test_load_matching_weights_takes_every_backbone_tensor_and_keeps_the_head(pretrained_file):
    _, out = pretrained_file
    saved = load_file(str(out))
    model = create_model("tiny_cnn", 3)
    head_before = model.classifier.weight.detach().clone()
    assert load_matching_weights(model, out) == len(model.state_dict()) - len(TINY_HEAD)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    assert torch.equal(model.classifier.weight, head_before)


def test_fine_tuning_from_the_pretrained_backbone_writes_a_bundle(pretrained_file, folder, tmp_path):
    _, out = pretrained_file
    config = TrainConfig(dataset="folder", root=str(folder), arch="tiny_cnn", epochs=1, image_size=32, batch_size=8,
                         lr=0.01, device="cpu", modality="X-ray", window=None, seed=3, init_weights=str(out))
    result = train(config, tmp_path / "run")
    assert result.state == "succeeded"
    bundle = load_bundle(tmp_path / "run" / "model")
    assert bundle.card.training["config"]["init_weights"] == str(out)


def test_same_seed_same_losses(folder, tmp_path):
    first = pretrain(tiny_config(folder, epochs=2), tmp_path / "a.safetensors")
    second = pretrain(tiny_config(folder, epochs=2), tmp_path / "b.safetensors")
    other = pretrain(tiny_config(folder, epochs=2, seed=2), tmp_path / "c.safetensors")
    assert first.losses == second.losses
    assert other.losses != first.losses
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_loader_workers_keep_runs_repeatable(folder, tmp_path):
    # One loader with persistent workers serves every epoch; its seeded generator seeds the workers.
    first = pretrain(tiny_config(folder, epochs=2, num_workers=2), tmp_path / "a.safetensors")
    second = pretrain(tiny_config(folder, epochs=2, num_workers=2), tmp_path / "b.safetensors")
    assert first.state == "succeeded" and len(first.losses) == 2 and first.losses == second.losses
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_stop_event_after_the_first_step_writes_nothing(folder, tmp_path):
    stop = threading.Event()
    steps = []

    def on_progress(record: dict) -> None:
        steps.append(record["step"])
        stop.set()

    out = tmp_path / "stopped.safetensors"
    result = pretrain(tiny_config(folder), out, progress_callback=on_progress, stop_event=stop)
    assert result.state == "cancelled" and result.out_path is None and steps == [1]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_cleanly(folder, tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "terminated.safetensors"
    result = pretrain(tiny_config(folder), out, progress_callback=lambda record: os.kill(os.getpid(), signal.SIGTERM))
    assert result.state == "cancelled" and not out.exists() and not record_path(out).exists()
    assert signal.getsignal(signal.SIGTERM) == previous  # handler restored


@pytest.mark.parametrize("arch, head", [("mobilenet_v2", "classifier"), ("efficientnet_b0", "classifier"),
                                        ("resnet18", "fc"), ("tiny_cnn", "classifier")])
def test_projection_head_replaces_the_classifier_of_real_architectures(arch, head):
    classifier = create_model(arch, 2)
    assert get_spec(arch).head == head and get_head(classifier, arch) is getattr(classifier, head)
    model, name = build_contrastive_model(arch, pretrained=False, projection_dim=16)
    assert name == head
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 16)
    head_keys = {k for k in classifier.state_dict() if k.startswith(head + ".")}
    assert head_keys and set(backbone_state(model, name)) == set(classifier.state_dict()) - head_keys


def test_validate_names_every_problem():
    config = PretrainConfig(dataset="nope", root=".", arch="tiny_cnn", pretrained=True, epochs=0, batch_size=1,
                            temperature=0, image_size=8)
    with pytest.raises(TrainingError) as error:
        config.validate()
    message = str(error.value)
    for part in ("no ImageNet weights", "dataset must be one of", "epochs must be at least 1", "batch size",
                 "temperature must be positive", "image size"):
        assert part in message


def test_output_must_be_a_safetensors_file(folder, tmp_path):
    with pytest.raises(TrainingError, match=r"\.safetensors"):
        pretrain(tiny_config(folder), tmp_path / "weights.pt")


@pytest.mark.parametrize("change, expected", [
    ({"--root": "/no/such/folder"}, "does not exist"),
    ({"--arch": "alexnet"}, "Unknown architecture 'alexnet'"),
    ({"--epochs": "0"}, "epochs must be at least 1"),
])
def test_cli_bad_input_is_one_line_and_exit_2(folder, tmp_path, capsys, change, expected):
    options = {"--dataset": "folder", "--root": str(folder), "--arch": "tiny_cnn", "--epochs": "1",
               "--image-size": "32", "--batch-size": "8", "--device": "cpu", "--out": str(tmp_path / "w.safetensors")}
    options.update(change)
    argv = ["pretrain"] + [token for pair in options.items() for token in pair]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("covidscan: error:") and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w.safetensors").exists()


def test_cli_run_writes_the_weights(folder, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["pretrain", "--dataset", "folder", "--root", str(folder), "--arch", "tiny_cnn", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "8", "--device", "cpu", "--out", str(out)]) == 0
    assert out.is_file() and record_path(out).is_file()
    assert "--init-weights" in capsys.readouterr().out
