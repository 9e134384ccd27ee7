"""Launching a training job: check a configuration and its dataset, then submit the whole config.

The job runs ``covidscan train --config RUN_DIR/config.json`` (see
:meth:`covidscan.jobs.JobRunner.submit`), so every field of :class:`TrainConfig` reaches the job.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from covidscan.errors import DatasetError, JobError
from covidscan.training.config import TrainConfig

if TYPE_CHECKING:
    from covidscan.jobs import JobRecord, JobRunner


def check_launch(config: TrainConfig) -> TrainConfig:
    """Check a training configuration and its dataset before it is queued.

    Args:
        config: the options (e.g. from the Train page's form).

    Returns:
        A copy with the dataset folder as an absolute path (the job may run elsewhere).

    Raises:
        CovidscanError: an option out of range, missing ImageNet weights, or a dataset that cannot
            be trained on (no train or val split, a class without training images).
    """
    from covidscan.datasets import open_dataset
    from covidscan.models import get_spec, pretrained_available

    config.validate()
    if config.pretrained and not pretrained_available(config.arch):
        spec = get_spec(config.arch)
        reason = "has no ImageNet weights" if not spec.has_imagenet_weights else "has no ImageNet weights cached offline"
        raise JobError(f"{config.arch} {reason}: switch ImageNet initialisation off, or copy the checkpoint "
                       "into $TORCH_HOME/hub/checkpoints first.")
    train = open_dataset(config.dataset, config.root, config.train_split, **config.dataset_options)
    open_dataset(config.dataset, config.root, config.val_split, **config.dataset_options)
    empty = [name for name, count in train.class_counts().items() if count == 0]
    if len(train.classes) < 2 or empty:
        raise DatasetError("Training needs images of at least two classes in the train split"
                           + (f"; {', '.join(empty)} has none." if empty else "."))
    return dataclasses.replace(config, root=str(Path(config.root).expanduser().resolve()))


def submit_training(config: TrainConfig, runner: JobRunner | None = None, name: str | None = None) -> JobRecord:
    """:func:`check_launch` the config and queue it as a job (``covidscan train --config``).

    Args:
        config: the options.
        runner: the job runner (default: :func:`covidscan.jobs.get_runner`).
        name: the job's label.

    Returns:
        The job's record.
    """
    from covidscan.jobs import get_runner

    checked = check_launch(config)
    return (runner or get_runner()).submit(config=checked.to_dict(), name=name)
