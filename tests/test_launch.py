"""Launching a job: the whole TrainConfig goes to the job as RUN_DIR/config.json (``covidscan train --config``)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from covidscan.errors import DatasetError, JobError, TrainingError
from covidscan.jobs.local import LocalRunner
from covidscan.training import TrainConfig
from covidscan.training.launch import check_launch, submit_training
from jobs_helpers import make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "folder")


def tiny_config(root, **changes) -> TrainConfig:
    options = dict(dataset="folder", root=str(root), arch="tiny_cnn", epochs=2, image_size=64, batch_size=4,
                   device="cpu", seed=1)
    options.update(changes)
    return TrainConfig(**options)


def test_the_whole_config_reaches_the_job(data, tmp_path, monkeypatch):
    monkeypatch.setattr(LocalRunner, "start_queued", lambda self: None)  # keep it queued: no process here
    runner = LocalRunner(tmp_path / "state")
    config = tiny_config(data, lr=3e-4, schedule="plateau", patience=2, monitor="val_f1", label_smoothing=0.1,
                         progressive_resize=[48, 64], modality="X-ray", name="xr",
                         dataset_options={"val_fraction": 0.25})
    record = submit_training(config, runner, name="my run")
    launch = Path(record.run_dir) / "config.json"
    assert record.args == ["--config", str(launch)] and record.name == "my run"
    loaded = TrainConfig.load(launch)
    expected = dataclasses.replace(config, root=str(Path(data).resolve()))
    assert loaded == expected  # every field, not a chosen few
    assert json.loads(launch.read_text())["schedule"] == "plateau"


def test_launch_checks_refuse_bad_options_and_datasets(data, tmp_path):
    with pytest.raises(TrainingError, match="epochs must be at least 1"):
        check_launch(tiny_config(data, epochs=0))
    with pytest.raises(JobError, match="tiny_cnn has no ImageNet weights"):
        check_launch(tiny_config(data, pretrained=True))
    with pytest.raises(DatasetError, match="does not exist"):
        check_launch(tiny_config(tmp_path / "missing"))
    one_class = tmp_path / "one"
    shutil.copytree(data / "Covid", one_class / "Covid")
    with pytest.raises(DatasetError):
        check_launch(tiny_config(one_class))
