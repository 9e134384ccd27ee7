"""Training: transfer learning over the model registry, writing a run directory a UI can poll.

- :mod:`~covidscan.training.config`: :class:`TrainConfig` (defined once: defaults, help, choices, UI hints).
- :mod:`~covidscan.training.loop`: the one fit loop (:class:`FitLoop`) and its :class:`Callback` hooks.
- :mod:`~covidscan.training.callbacks`: run-directory writer and progress, best checkpoint, early stopping,
  learning-rate schedules.
- :mod:`~covidscan.training.trainer`: :func:`train` (data, model, calibration, bundle).
- :mod:`~covidscan.training.frozen_prefix`, :mod:`~covidscan.training.lr_finder`, :mod:`~covidscan.training.grid`.
"""
from __future__ import annotations

from covidscan.training.callbacks import RunWriter
from covidscan.training.config import (
    AUGMENT_PRESETS, BALANCE_MODES, DATASET_MODALITY, METRICS_HEADER, MODALITIES, MONITORS, PROGRESS_EVERY_S,
    SCHEDULES, TrainConfig, infer_modality,
)
from covidscan.training.data import CachedImages, augmentation, default_positive_class, load_matching_weights
from covidscan.training.frozen_prefix import FrozenPrefix
from covidscan.training.grid import grid_search
from covidscan.training.loop import Callback, Cancelled, FitLoop, NonFiniteLoss
from covidscan.training.lr_finder import LRFinderResult, find_lr, suggest_lr
from covidscan.training.trainer import Trainer, TrainResult, train, tune_threshold
from covidscan.utils import install_sigterm, log, resolve_device, restore_sigterm, seed_everything

__all__ = [
    "AUGMENT_PRESETS", "BALANCE_MODES", "DATASET_MODALITY", "METRICS_HEADER", "MODALITIES", "MONITORS",
    "PROGRESS_EVERY_S", "SCHEDULES", "CachedImages", "Callback", "Cancelled", "FitLoop", "FrozenPrefix",
    "LRFinderResult", "NonFiniteLoss", "RunWriter", "TrainConfig", "TrainResult", "Trainer", "augmentation",
    "default_positive_class", "find_lr", "grid_search", "infer_modality", "install_sigterm", "load_matching_weights",
    "log", "resolve_device", "restore_sigterm", "seed_everything", "suggest_lr", "train", "tune_threshold",
]
