"""The training configuration, defined once: each field's default, help, choices and UI hints.

The ``covidscan train``/``lr-find``/``grid`` options (:mod:`covidscan.cli.fields`) and the Train
page's form are generated from these fields, and a run directory's ``config.json`` loads back
with :meth:`TrainConfig.from_dict` (extra keys that training records, such as ``image_sizes``, are
ignored). Field metadata keys: ``help``; ``choices``; ``advanced`` (the form shows it in its
"Advanced" expander); ``label`` (the form's label); ``min``/``max``/``step``/``format`` (number inputs); ``widget`` "radio" (radio buttons, not a select box);
``choices_hint`` (the form's options where the value is not restricted to them, e.g. cuda:1);
``cli`` False (no command-line option); ``form`` False (not in the form); ``show_default`` False (the
option's help does not name the default: the command line infers it).
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from covidscan.datasets import DATASET_KINDS
from covidscan.errors import TrainingError
from covidscan.models import DEFAULT_ARCHITECTURE, get_spec
from covidscan.preprocessing import CROPS

AUGMENT_PRESETS = ("none", "light", "strong")
BALANCE_MODES = ("none", "sampler", "loss")
# Batch mixing (torchvision's MixUp / CutMix): "mixup-cutmix" picks one of the two per batch.
MIX_MODES = ("none", "mixup", "cutmix", "mixup-cutmix")
# "last": no choice on val, the final epoch is kept (a small val split picks noise, not better epochs).
MONITORS = ("val_auc", "val_accuracy", "val_f1", "last")
SCHEDULES = ("onecycle", "plateau", "constant")
MODALITIES = ("CT", "X-ray")
# "none": the whole image; otherwise covidscan.preprocessing.CROPS (the card's ``crop``).
CROP_CHOICES = ("none", *CROPS)
DEVICES = ("auto", "cpu", "cuda")
# The modality a dataset layout implies; a class-per-folder dataset can hold either, so the user says.
DATASET_MODALITY: dict[str, str | None] = {"covid-ct": "CT", "ieee8023": "X-ray", "folder": None}
METRICS_HEADER = ["epoch", "step", "lr", "train_loss", "val_loss", "val_accuracy", "val_auc", "val_f1", "seconds"]
PROGRESS_EVERY_S = 2.0


def as_card_crop(choice: str) -> str | None:
    """The model card's ``crop`` for a :data:`CROP_CHOICES` option: None for the whole image."""
    return None if choice == "none" else choice


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **hints: Any) -> Any:
    """A dataclass field with its help text and UI hints in ``metadata`` (see the module doc)."""
    metadata = {"help": help, **hints}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def infer_modality(dataset: str) -> str | None:
    """The modality a dataset layout implies (covid-ct: CT, ieee8023: X-ray), None for a plain folder."""
    return DATASET_MODALITY.get(dataset)


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.json`` in the run directory."""

    dataset: str = option(help="dataset layout", choices=DATASET_KINDS, label="Dataset type")
    root: str = option(help="dataset folder", label="Dataset folder")
    arch: str = option(DEFAULT_ARCHITECTURE, "architecture", label="Architecture")
    pretrained: bool = option(False, "start from ImageNet weights", label="ImageNet initialisation")
    epochs: int = option(10, "training epochs", label="Epochs", min=1, max=500)
    image_size: int | None = option(None, "input size in pixels (default: the architecture's)",
                                    label="Image size (px)", min=16, max=1024, step=16)
    batch_size: int = option(32, "images per step", label="Batch size", min=1, max=1024)
    lr: float = option(1e-3, "peak learning rate of the head (one-cycle schedule)", label="Learning rate",
                       min=1e-7, max=1.0, step=1e-4, format="%.1e")
    backbone_lr_factor: float = option(0.1, "backbone lr = lr x this, once unfrozen", advanced=True,
                                       label="Backbone lr factor", min=0.0, max=1.0, step=0.05)
    weight_decay: float = option(1e-4, "AdamW weight decay", advanced=True, label="Weight decay", min=0.0, max=1.0,
                                 step=1e-4, format="%.1e")
    freeze_epochs: int = option(0, "epochs with the backbone frozen (only the new head learns)",
                                label="Freeze epochs", min=0, max=500)
    schedule: str = option("onecycle", "learning-rate schedule", choices=SCHEDULES, advanced=True, label="LR schedule")
    augment: str = option("light", "augmentation preset", choices=AUGMENT_PRESETS, label="Augmentation")
    balance: str = option("none", "class balancing", choices=BALANCE_MODES, label="Class balancing")
    monitor: str = option("val_auc", "validation metric that picks the best epoch (last: keep the final epoch)", choices=MONITORS,
                          advanced=True, label="Monitored metric")
    progressive_resize: list[int] | None = option(
        None, "comma-separated sizes, e.g. 128,224: epochs split evenly across sizes", advanced=True,
        label="Progressive resizing (sizes, comma-separated)")
    patience: int | None = option(None, "early stopping after this many epochs without improvement", advanced=True,
                                  label="Early-stopping patience (epochs)", min=1, max=500)
    plateau_patience: int = option(2, "plateau schedule: epochs without improvement before the lr drops",
                                   advanced=True, label="Plateau patience (epochs)", min=1, max=100)
    label_smoothing: float = option(0.0, "label smoothing of the loss", advanced=True, label="Label smoothing",
                                    min=0.0, max=0.5, step=0.05)
    random_erasing: float = option(0.0, "probability of erasing a random rectangle (2-33%) of each training image "
                                   "to black; 0: off", advanced=True, label="Random erasing (probability)",
                                   min=0.0, max=1.0, step=0.05)
    mix: str = option("none", "mix pairs of training images and their labels per batch (mixup, cutmix, "
                      "or either per batch)", choices=MIX_MODES, advanced=True, label="Batch mixing")
    mix_alpha: float = option(0.4, "batch mixing: the mixing weight is drawn from Beta(alpha, alpha)", advanced=True,
                              label="Mixing alpha", min=0.05, max=4.0, step=0.05)
    ema_decay: float = option(0.0, "keep an exponential moving average of the weights (decay per step, e.g. 0.9; "
                              "0: off): it is what is validated and saved", advanced=True,
                              label="Weight EMA decay (0: off)", min=0.0, max=0.999, step=0.01)
    average_last_epochs: int = option(0, "average the weights of the last N epochs (stochastic weight "
                                      "averaging over the schedule's tail; 0: off): the average is what the final "
                                      "epoch evaluates and saves", advanced=True,
                                      label="Average the last N epochs' weights (0: off)", min=0, max=500)
    seed: int = option(0, "random seed", advanced=True, label="Seed", min=0)
    device: str = option("auto", "auto, cpu or cuda", label="Device", choices_hint=DEVICES,
                        widget="radio")
    modality: str = option("CT", "CT or X-ray (stored in the model card); required for --dataset folder, "
                           "implied by covid-ct (CT) and ieee8023 (X-ray)", choices=MODALITIES, label="Modality",
                           show_default=False, widget="radio")
    window: str | None = option("lung", "CT window applied to DICOM slices", advanced=True, label="CT window")
    crop: str = option("none", "CT: cut each slice to its lungs' bounding box (automatic lung mask) before resizing, "
                       "in training and in every prediction (stored in the model card)", choices=CROP_CHOICES,
                       advanced=True, label="Crop (CT)")
    positive_class: str | None = option(None, "class whose sensitivity/specificity are reported (default: COVID)",
                                        advanced=True, label="Positive class")
    calibrate: bool = option(True, "fit a temperature on val and store it in the card", advanced=True,
                             label="Calibrate (temperature on val)")
    tune_threshold: bool = option(False, "choose the positive-class threshold on val", advanced=True,
                                  label="Tune the decision threshold on val")
    num_workers: int = option(0, "data-loader worker processes", advanced=True, label="Loader workers", min=0, max=64)
    max_train_batches: int | None = option(None, "cap batches per epoch (quick checks)", advanced=True,
                                           label="Max batches per epoch", min=1)
    train_split: str = option("train", "split to train on", advanced=True, label="Train split")
    val_split: str = option("val", "split to validate on", advanced=True, label="Validation split")
    dataset_options: dict = option(default_factory=dict, help="open_dataset options (val_fraction, seed)",
                                   cli=False, form=False)
    init_weights: str | None = option(None, "start from a bundle/.safetensors whose tensors fit (e.g. self-supervised)",
                                      advanced=True, label="Initial weights (file)")
    # CPU-friendly partial fine-tuning: keep the first ``frozen_blocks`` feature blocks frozen, compute
    # their outputs once for ``feature_views`` augmented views of every training image, and train only
    # the rest. The saved bundle is still a complete model; it just has an unchanged (ImageNet) prefix.
    frozen_blocks: int | None = option(None, "keep the first N feature blocks frozen and cache their outputs "
                                       "(fast on CPU)", advanced=True, label="Frozen blocks (cached features)", min=1)
    feature_views: int = option(4, "augmented views cached per image with --frozen-blocks", advanced=True,
                                label="Feature views", min=1, max=64)
    name: str | None = option(None, "model name in the card", label="Model name (in the model card)")
    description: str = option("", "model card description", advanced=True, label="Model card description")
    command: str | None = option(None, "the command that started the run", cli=False, form=False)

    def resolved_sizes(self) -> list[int]:
        """Image size per progressive-resizing stage (a single stage without it)."""
        if self.progressive_resize:
            return [int(s) for s in self.progressive_resize]
        return [int(self.image_size or get_spec(self.arch).input_size)]

    @property
    def card_crop(self) -> str | None:
        """The model card's ``crop``: None for the whole image."""
        return as_card_crop(self.crop)

    def validate(self) -> None:
        """Raise TrainingError for any option out of range."""
        get_spec(self.arch)
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.lr > 0, "the learning rate must be positive"),
            (0 <= self.freeze_epochs, "freeze epochs cannot be negative"),
            (0 <= self.ema_decay < 1, "the weight EMA decay must lie in [0, 1)"),
            (0 <= self.average_last_epochs <= self.epochs,
             "the number of epochs to average must lie between 0 and the number of epochs"),
            (not self.average_last_epochs or self.patience is None,
             "averaging the last epochs' weights needs every epoch to run: drop early stopping (patience)"),
            (self.augment in AUGMENT_PRESETS, f"augment must be one of {', '.join(AUGMENT_PRESETS)}"),
            (0 <= self.random_erasing <= 1, "the random-erasing probability must lie in [0, 1]"),
            (self.mix in MIX_MODES, f"mix must be one of {', '.join(MIX_MODES)}"),
            (self.mix_alpha > 0, "the mixing alpha must be positive"),
            (self.balance in BALANCE_MODES, f"balance must be one of {', '.join(BALANCE_MODES)}"),
            (self.monitor in MONITORS, f"monitor must be one of {', '.join(MONITORS)}"),
            (self.monitor != "last" or (self.patience is None and self.schedule != "plateau"),
             "monitor 'last' (keep the final epoch) leaves nothing for early stopping or a plateau schedule to watch"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.modality in MODALITIES, "modality must be CT or X-ray"),
            (self.crop in CROP_CHOICES, f"crop must be one of {', '.join(CROP_CHOICES)}"),
            (self.crop == "none" or self.modality == "CT", "the lung crop is for CT slices only (no lung mask for X-rays)"),
            (all(16 <= s <= 1024 for s in self.resolved_sizes()), "image sizes must lie between 16 and 1024 px"),
            (self.device in DEVICES or self.device.startswith("cuda:"), "device must be auto, cpu or cuda"),
        ]
        problems = [message for ok, message in checks if not ok]
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append("device cuda was asked for but no GPU is available")
        if self.frozen_blocks is not None and (self.progressive_resize and len(set(self.progressive_resize)) > 1):
            problems.append("frozen blocks (cached features) cannot be combined with progressive resizing")
        if self.frozen_blocks is not None and self.feature_views < 1:
            problems.append("feature views must be at least 1")
        if problems:
            raise TrainingError("Invalid training options: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``root`` as a string)."""
        data = asdict(self)
        data["root"] = str(self.root)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from :meth:`to_dict` or a run's ``config.json``; keys that are not fields are ignored.

        Raises:
            TrainingError: a required field (dataset, root) is missing.
        """
        return config_from_mapping(cls, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a ``config.json`` (as written in run directories or by the Train page)."""
        return cls.from_dict(read_config_file(path))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON (atomically) and return the path."""
        from covidscan.utils import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from a config file; TrainingError when it is missing or not a JSON object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TrainingError(f"Cannot read the config file {path}: {exc.strerror or exc}.") from None
    except ValueError as exc:
        raise TrainingError(f"The config file {path} is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise TrainingError(f"The config file {path} must hold a JSON object of options.")
    return data


def config_from_mapping(cls, data: dict[str, Any]):
    """``cls(**data)`` keeping only ``cls``'s fields; TrainingError naming missing required fields."""
    names = {f.name for f in fields(cls)}
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if data.get(name) in (None, "")]
    if missing:
        raise TrainingError(f"The configuration has no {', '.join(missing)}.")
    return cls(**{key: value for key, value in data.items() if key in names})
