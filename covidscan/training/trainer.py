"""Supervised transfer learning: data and model setup around the one :class:`~covidscan.training.loop.FitLoop`.

``train(config, run_dir)`` writes ``config.json`` (at start), ``metrics.csv`` (a row per epoch),
``progress.json`` (atomically, every few seconds and at every state change) and the best model
as a bundle in ``model/`` (atomically, so a crash never leaves half a bundle). SIGTERM, or setting
``stop_event``, stops at the next step and records the run as cancelled.

Recipe: ImageNet weights (optional), the backbone frozen for ``freeze_epochs`` then unfrozen with a
smaller (discriminative) learning rate, AdamW with a one-cycle schedule (or reduce-on-plateau),
augmentation presets, class balancing, early stopping on the monitored validation metric,
optional progressive resizing, bf16 autocast and channels-last on a GPU. Decoded images are
cached in memory as resized uint8 tensors so that decoding never bottlenecks training.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covidscan.datasets import open_dataset
from covidscan.errors import TrainingError
from covidscan.evaluation import compute_metrics, fit_temperature, load_split_images, predict_logits
from covidscan.models import create_model, get_spec, head_parameters
from covidscan.sources import describe_sources
from covidscan.training.callbacks import (
    BestCheckpoint, EarlyStopping, PlateauSchedule, RunProgress, RunWriter, StepSchedule, TailAverage, WeightEMA, fmt,
)
from covidscan.training.config import TrainConfig
from covidscan.training.data import (
    CachedImages, augmentation, batch_mixer, default_positive_class, load_matching_weights, train_loader,
)
from covidscan.training.frozen_prefix import FrozenPrefix
from covidscan.training.loop import Callback, Cancelled, FitLoop
from covidscan.transforms import model_input
from covidscan.utils import failure_recorded, log, resolve_device, seed_everything, sigterm_stops


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    state: str  # succeeded | cancelled | failed
    run_dir: Path
    bundle_path: Path | None
    best_metric: float | None
    best_epoch: int | None
    epochs_run: int
    history: list[dict]
    val_metrics: dict | None = None


class Trainer:
    """Data, model, loss and optimiser of one run; :meth:`fit` trains it with the :class:`FitLoop`.

    Args:
        config: the (validated) options.
        run_dir: where the bundle goes.
        writer: the run directory's writer; None for a run without one (the LR finder).
        stop_event: set it to stop at the next step.
    """

    def __init__(self, config: TrainConfig, run_dir: Path, writer: RunWriter | None,
                 stop_event: threading.Event) -> None:
        self.config = config
        self.run_dir = run_dir
        self.writer = writer
        self.stop_event = stop_event
        self.device = resolve_device(config.device)
        self.spec = get_spec(config.arch)
        self.sizes = config.resolved_sizes()
        self.prefix: FrozenPrefix | None = None

    def report(self, force: bool = False, **changes) -> None:
        """Update ``progress.json`` (when there is a run directory)."""
        if self.writer is not None:
            self.writer.update(force=force, **changes)

    # ---- setup
    def load_data(self) -> None:
        """Decode the train and val splits into uint8 caches."""
        config = self.config
        self.train_data = open_dataset(config.dataset, config.root, config.train_split, **config.dataset_options)
        self.val_data = open_dataset(config.dataset, config.root, config.val_split, **config.dataset_options)
        self.classes = list(self.train_data.classes)
        if len(self.classes) < 2:
            raise TrainingError("Training needs at least two classes.")
        self.window = config.window if config.modality == "CT" else None
        self.cache_size = max(self.sizes)
        started = time.monotonic()
        log(f"Decoding {len(self.train_data)} training and {len(self.val_data)} validation images ...")
        self.train_images = load_split_images(self.train_data, self.cache_size, self.window, crop=config.card_crop)
        self.val_cache: dict[int, torch.Tensor] = {}
        self.val_labels = self.val_data.labels()
        log(f"Cached images in {time.monotonic() - started:.1f}s; classes {self.train_data.class_counts()}")
        self.train_set = CachedImages(self.train_images, self.train_data.labels())

    def val_images(self, size: int) -> torch.Tensor:
        """The validation images at ``size`` (decoded once per size)."""
        if size not in self.val_cache:
            self.val_cache[size] = load_split_images(self.val_data, size, self.window, crop=self.config.card_crop)
        return self.val_cache[size]

    def build_model(self) -> None:
        """The model (head, backbone and frozen-prefix parameter groups) and the loss."""
        config = self.config
        self.model = create_model(config.arch, len(self.classes), pretrained=config.pretrained)
        if config.init_weights:
            load_matching_weights(self.model, config.init_weights)
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.head = head_parameters(self.model, config.arch)
        if config.frozen_blocks is not None:
            self.prefix = FrozenPrefix(self.model, config.arch, config.frozen_blocks, self.device,
                                       self.stop_event.is_set)
        excluded = {id(p) for p in self.head} | {id(p) for p in (self.prefix.parameters() if self.prefix else [])}
        self.backbone = [p for p in self.model.parameters() if id(p) not in excluded]
        counts = np.bincount(self.train_data.labels(), minlength=len(self.classes)).astype(np.float64)
        if (counts == 0).any():
            missing = [c for c, n in zip(self.classes, counts) if n == 0]
            raise TrainingError(f"The training split has no images of class {', '.join(missing)}.")
        weights = None
        if config.balance == "loss":
            weights = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32, device=self.device)
        self.criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
        self.mixer = batch_mixer(config.mix, config.mix_alpha, len(self.classes))
        self.class_counts = counts

    def batches(self, epoch: int):
        """The epoch's training batches: images from a loader, or cached prefix features."""
        config = self.config
        balanced = self.class_counts if config.balance == "sampler" else None
        if self.prefix is not None:
            return self.prefix.batches(epoch, self.train_set.labels, config.batch_size, config.seed, balanced)
        return train_loader(self.train_set, config.batch_size, config.seed, epoch, config.num_workers, balanced,
                            pin_memory=self.device.type == "cuda")

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Logits of a training batch (images or prefix features), its labels and size."""
        images, labels = batch
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        inputs = images.float() if self.prefix is not None else model_input(images, self.spec.mean, self.spec.std,
                                                                            self.device)
        if self.mixer is not None:  # soft labels from here on (the loss takes class probabilities)
            inputs, labels = self.mixer(inputs, labels)
        logits = self.prefix.tail(inputs) if self.prefix is not None else self.model(inputs)
        return logits, labels, len(labels)

    def steps_per_epoch(self) -> int:
        n = len(self.train_set)
        steps = n // self.config.batch_size if n > self.config.batch_size else 1
        if self.config.max_train_batches:
            steps = min(steps, self.config.max_train_batches)
        return max(1, steps)

    def size_for_epoch(self, epoch: int) -> int:
        stage = min(len(self.sizes) - 1, (epoch - 1) * len(self.sizes) // self.config.epochs)
        return self.sizes[stage]

    # ---- the run
    def fit(self) -> TrainResult:
        """Set up, train with the FitLoop and its callbacks, and save the calibrated best model."""
        config = self.config
        seed_everything(config.seed)
        self.load_data()
        seed_everything(config.seed)
        self.build_model()
        if self.prefix is not None:
            self.prefix.prepare(self.train_images, config.augment, self.sizes[-1], self.cache_size,
                                config.feature_views, config.seed, lambda message: self.report(message=message),
                                erasing=config.random_erasing)
        steps_per_epoch = self.steps_per_epoch()
        total_steps = steps_per_epoch * config.epochs
        optimiser = torch.optim.AdamW(
            [{"params": self.backbone, "lr": config.lr * config.backbone_lr_factor},
             {"params": self.head, "lr": config.lr}], weight_decay=config.weight_decay)
        checkpoint = BestCheckpoint(config.monitor, self.save_checkpoint)
        progress = RunProgress(self.writer, checkpoint)
        callbacks: list[Callback] = [EpochSetup(self)]
        if config.ema_decay:
            callbacks.append(WeightEMA(config.ema_decay))
        if config.average_last_epochs:
            callbacks.append(TailAverage(config.average_last_epochs))
        if self.prefix is not None:
            callbacks.append(self.prefix)
        if config.schedule == "onecycle" and total_steps >= 4:
            # Warm up over a quarter of the run (at least two steps, which OneCycleLR needs).
            callbacks.append(StepSchedule(torch.optim.lr_scheduler.OneCycleLR(
                optimiser, max_lr=[config.lr * config.backbone_lr_factor, config.lr], total_steps=total_steps,
                pct_start=max(0.25, 2.5 / total_steps)), total_steps))
        callbacks.append(checkpoint)
        if config.schedule == "plateau":
            callbacks.append(PlateauSchedule(torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimiser, mode="max", factor=0.3, patience=config.plateau_patience), checkpoint))
        callbacks += [progress, EarlyStopping(checkpoint, config.patience)]
        self.report(force=True, state="running", epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                    monitor=config.monitor, message="training")
        loop = FitLoop(self.model, optimiser, self.forward, self.criterion, self.batches, config.epochs,
                       steps_per_epoch, self.device, self.stop_event, evaluate=self.evaluate, callbacks=callbacks)
        loop.run()
        # Final bundle: the best weights, calibrated on val, with val metrics from the evaluation code.
        self.model.load_state_dict(checkpoint.best_state)
        final = self.finalise(checkpoint.best_state, checkpoint.best_size, checkpoint.best_epoch, loop.step)
        return TrainResult("succeeded", self.run_dir, self.run_dir / "model", checkpoint.best_metric,
                           checkpoint.best_epoch, len(progress.history), progress.history, final)

    def evaluate(self, epoch: int) -> dict:
        """Validation metrics of the epoch's model (``val_loss``, ``val_accuracy``, ``val_auc``, ``val_f1``)."""
        size = self.size_for_epoch(epoch)
        val = self.val_metrics(self.val_logits(size))
        return {"size": size, "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_auc": val["auc"],
                "val_f1": val["f1"], "summary": val["summary"]}

    def save_checkpoint(self, state: dict, loop: FitLoop) -> None:
        """Save a new best epoch as the run's bundle (uncalibrated until :meth:`finalise`)."""
        self.save(state, loop.logs["size"], {"val": loop.logs["summary"]}, loop.epoch, loop.step,
                  temperature=1.0, threshold=None)

    def val_logits(self, size: int) -> torch.Tensor:
        if self.prefix is not None:
            return self.prefix.logits(self.model, self.val_images(size), size)
        return predict_logits(self.model, self.val_images(size), self.spec.mean, self.spec.std, self.device)

    def val_metrics(self, logits: torch.Tensor, temperature: float = 1.0, threshold: float | None = None) -> dict:
        labels = torch.as_tensor(self.val_labels, dtype=torch.long)
        loss = float(nn.functional.cross_entropy(logits, labels))
        probs = torch.softmax(logits / temperature, dim=1).numpy()
        summary = compute_metrics(self.val_labels, probs, self.classes, self.positive_class(), threshold)
        f1 = summary["f1"] if len(self.classes) == 2 else summary["macro_f1"]
        return {"loss": loss, "accuracy": summary["accuracy"], "auc": summary["auc"], "f1": f1,
                "summary": _card_metrics(summary, loss)}

    def positive_class(self) -> str | None:
        return self.config.positive_class or default_positive_class(self.classes)

    def finalise(self, best_state: dict, size: int, best_epoch: int, step: int) -> dict:
        """Calibrate (temperature, optionally the threshold) on val and save the final bundle."""
        config = self.config
        logits = predict_logits(self.model, self.val_images(size), self.spec.mean, self.spec.std, self.device)
        temperature = fit_temperature(logits, self.val_labels) if config.calibrate else 1.0
        threshold = None
        positive = self.positive_class()
        if config.tune_threshold and len(self.classes) == 2 and positive:
            threshold = tune_threshold(self.val_labels, torch.softmax(logits / temperature, 1).numpy(),
                                       self.classes.index(positive))
        val = self.val_metrics(logits, temperature, threshold)
        self.save(best_state, size, {"val": val["summary"]}, best_epoch, step, temperature, threshold)
        log(f"Best epoch {best_epoch}: val accuracy {val['accuracy']:.4f}, AUC {fmt(val['auc'])}, "
            f"F1 {val['f1']:.4f}, temperature {temperature:.3f}, threshold {threshold}")
        return val["summary"]

    def save(self, state: dict, size: int, metrics: dict, epoch: int, step: int, temperature: float,
             threshold: float | None) -> None:
        from covidscan.bundle import ModelCard, save_bundle

        config = self.config
        model = create_model(config.arch, len(self.classes))
        model.load_state_dict(state)
        card = ModelCard.for_architecture(
            config.name or f"{config.arch}-{config.dataset}", config.arch, self.classes, config.modality,
            input_size=size, window=self.window if config.modality == "CT" else None, crop=config.card_crop,
            positive_class=self.positive_class(), threshold=threshold, temperature=float(temperature),
            description=config.description or f"{config.arch} trained on {config.dataset} ({', '.join(self.classes)}).",
            training={
                "command": config.command,
                "dataset": config.dataset,
                "data": {"root": Path(config.root).name, "train_split": config.train_split, "val_split": config.val_split,
                         "train_counts": self.train_data.class_counts(), "val_counts": self.val_data.class_counts(),
                         "options": config.dataset_options,
                         **({"sources": describe_sources(train=self.train_data, val=self.val_data)}
                            if len(self.train_data.sources) > 1 else {})},
                "seed": config.seed,
                "epoch": epoch,
                "step": step,
                "config": config.to_dict(),
                "device": str(self.device),
            },
            metrics=metrics,
        )
        save_bundle(model.eval(), card, self.run_dir / "model")


class EpochSetup(Callback):
    """Per-epoch state of a supervised run: the image size (progressive resizing) and backbone freezing."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.last_size: int | None = None

    def on_epoch_start(self, loop: FitLoop) -> None:
        trainer, config = self.trainer, self.trainer.config
        size = trainer.size_for_epoch(loop.epoch)
        if size != self.last_size and trainer.prefix is None:
            trainer.train_set.transform = augmentation(config.augment, size, trainer.cache_size, config.random_erasing)
            self.last_size = size
        frozen = loop.epoch <= config.freeze_epochs
        for parameter in trainer.backbone:
            parameter.requires_grad_(not frozen)
        if frozen:  # keep the frozen backbone's batch-norm statistics as they are
            head_ids = {id(p) for p in trainer.head}
            for module in loop.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and all(
                        id(p) not in head_ids for p in module.parameters()):
                    module.eval()


def tune_threshold(labels: Sequence[int], probs: np.ndarray, positive: int) -> float | None:
    """The positive-class probability threshold maximising accuracy (ties: closest to 0.5)."""
    scores = probs[:, positive]
    truth = np.asarray(labels) == positive
    candidates = np.unique(np.clip(scores, 1e-4, 1 - 1e-4))
    best, best_t = -1.0, 0.5
    for t in candidates:
        accuracy = float(((scores >= t) == truth).mean())
        if accuracy > best + 1e-12 or (abs(accuracy - best) <= 1e-12 and abs(t - 0.5) < abs(best_t - 0.5)):
            best, best_t = accuracy, float(t)
    return best_t


def _card_metrics(summary: dict, loss: float) -> dict:
    """The val metrics kept in a card: everything but the ROC curve points."""
    kept = {k: v for k, v in summary.items() if k != "roc"}
    kept["loss"] = loss
    return kept


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    progress_callback: Callable[[dict], None] | None = None,
    stop_event: threading.Event | None = None,
) -> TrainResult:
    """Train a model and write the run directory (config.json, metrics.csv, progress.json, model/).

    Args:
        config: the training options.
        run_dir: the run directory (created if needed).
        progress_callback: called with the progress record whenever it is written.
        stop_event: set it to stop at the next step (SIGTERM does the same when this runs in the
            main thread).

    Returns:
        The result; ``state`` is "succeeded" or "cancelled".

    Raises:
        CovidscanError: bad data or options (the run is recorded as failed).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = RunWriter(run_dir, progress_callback)
    writer.progress["monitor"] = config.monitor
    writer.progress["epochs"] = config.epochs

    def failed(message: str) -> None:
        writer.update(force=True, state="failed", eta_seconds=None, message=message)

    with sigterm_stops(stop_event or threading.Event()) as stop_event, failure_recorded(failed):
        try:
            config.validate()
            if config.command is None:
                config.command = "covidscan train (Python API)"
            resolved = {**config.to_dict(), "image_sizes": config.resolved_sizes(),
                        "resolved_device": str(resolve_device(config.device)), "python": sys.version.split()[0],
                        "torch": torch.__version__, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            writer.write_config(resolved)
            writer.update(force=True, state="running", message="loading data")
            result = Trainer(config, run_dir, writer, stop_event).fit()
            writer.update(force=True, state="succeeded", eta_seconds=0.0, best_metric=result.best_metric,
                          message=f"finished: best {config.monitor} {fmt(result.best_metric)} at epoch {result.best_epoch}")
            return result
        except Cancelled:
            log("Training cancelled.")
            writer.update(force=True, state="cancelled", eta_seconds=None, message="cancelled by the user")
            bundle = run_dir / "model"
            return TrainResult("cancelled", run_dir, bundle if bundle.is_dir() else None,
                               writer.progress.get("best_metric"), None, writer.progress.get("epoch", 0), [])
