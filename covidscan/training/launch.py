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
    from covidscan.cv import CVOptions
    from covidscan.jobs import JobRecord, JobRunner


def check_launch(config: TrainConfig) -> TrainConfig:
    """Check a training configuration and its dataset before it is queued.

    Args:
        config: the options (e.g. from the Train page's form).

    Returns:
        A copy with the dataset folder as an absolute path (the job may run elsewhere).

    Raises:
        CovidscanError: an option out of range, ImageNet weights for an architecture without any, or a dataset that cannot
            be trained on (no train or val split, a class without training images).
    """
    from covidscan.datasets import open_dataset
    from covidscan.models import get_spec

    config.validate()
    # Weights not cached yet are downloaded by torchvision when the run starts; where that fails the
    # job fails saying how to import the file (covidscan.models). Only an architecture without any is refused.
    if config.pretrained and not get_spec(config.arch).has_imagenet_weights:
        raise JobError(f"{config.arch} has no ImageNet weights: switch ImageNet initialisation off.")
    train = open_dataset(config.dataset, config.root, config.train_split, **config.dataset_options)
    open_dataset(config.dataset, config.root, config.val_split, **config.dataset_options)
    empty = [name for name, count in train.class_counts().items() if count == 0]
    if len(train.classes) < 2 or empty:
        raise DatasetError("Training needs images of at least two classes in the train split"
                           + (f"; {', '.join(empty)} has none." if empty else "."))
    return dataclasses.replace(config, root=str(Path(config.root).expanduser().resolve()))


def submit_training(config: TrainConfig, runner: JobRunner | None = None, name: str | None = None,
                    cv: CVOptions | None = None) -> JobRecord:
    """:func:`check_launch` the config and queue it as a job (``covidscan train --config``).

    Args:
        config: the options.
        runner: the job runner (default: :func:`covidscan.jobs.get_runner`).
        name: the job's label.
        cv: cross-validate with these options instead (``covidscan cv --config``): one model per
            fold, an out-of-fold estimate with intervals, the fold models as one ensemble.

    Returns:
        The job's record.
    """
    from covidscan.cli.cv import cv_arguments
    from covidscan.jobs import get_runner

    checked = check_launch(config)
    if cv is not None:
        cv.validate()
    extra = ["cv", *cv_arguments(cv)] if cv is not None else []
    return (runner or get_runner()).submit(extra, config=checked.to_dict(), name=name)
