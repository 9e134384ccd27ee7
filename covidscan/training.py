"""Training: transfer learning over the model registry, writing a run directory a UI can poll.

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

import copy
import csv
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from covidscan.datasets import open_dataset
from covidscan.errors import CovidscanError, TrainingError
from covidscan.evaluation import compute_metrics, fit_temperature, load_split_images, predict_logits
from covidscan.models import DEFAULT_ARCHITECTURE, create_model, get_spec, head_parameters
from covidscan.transforms import model_input

AUGMENT_PRESETS = ("none", "light", "strong")
BALANCE_MODES = ("none", "sampler", "loss")
MONITORS = ("val_auc", "val_accuracy", "val_f1")
SCHEDULES = ("onecycle", "plateau", "constant")
METRICS_HEADER = ["epoch", "step", "lr", "train_loss", "val_loss", "val_accuracy", "val_auc", "val_f1", "seconds"]
PROGRESS_EVERY_S = 2.0


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.json`` in the run directory."""

    dataset: str
    root: str
    arch: str = DEFAULT_ARCHITECTURE
    pretrained: bool = False
    epochs: int = 10
    image_size: int | None = None  # default: the architecture's input size
    batch_size: int = 32
    lr: float = 1e-3  # head learning rate (peak, for one-cycle)
    backbone_lr_factor: float = 0.1  # backbone lr = lr * factor once unfrozen
    weight_decay: float = 1e-4
    freeze_epochs: int = 0
    schedule: str = "onecycle"
    augment: str = "light"
    balance: str = "none"
    monitor: str = "val_auc"
    progressive_resize: list[int] | None = None  # e.g. [128, 224]: epochs split evenly across sizes
    patience: int | None = None  # early stopping: epochs without improvement
    plateau_patience: int = 2
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"
    modality: str = "CT"
    window: str | None = "lung"
    positive_class: str | None = None  # default: "COVID"-like class if any
    calibrate: bool = True  # fit a temperature on val and store it in the card
    tune_threshold: bool = False  # pick the positive-class threshold maximising val accuracy (binary)
    num_workers: int = 0
    max_train_batches: int | None = None
    train_split: str = "train"
    val_split: str = "val"
    dataset_options: dict = field(default_factory=dict)
    init_weights: str | None = None  # a .safetensors state dict (e.g. self-supervised) to start from
    # CPU-friendly partial fine-tuning: keep ``features[:frozen_blocks]`` frozen, compute its outputs once
    # for ``feature_views`` augmented views of every training image, and train only the rest. The saved
    # bundle is still a complete model; it just has an unchanged (ImageNet) prefix.
    frozen_blocks: int | None = None
    feature_views: int = 4
    name: str | None = None
    description: str = ""
    command: str | None = None

    def resolved_sizes(self) -> list[int]:
        """Image size per progressive-resizing stage (a single stage without it)."""
        if self.progressive_resize:
            return [int(s) for s in self.progressive_resize]
        return [int(self.image_size or get_spec(self.arch).input_size)]

    def validate(self) -> None:
        """Raise TrainingError for any option out of range."""
        get_spec(self.arch)
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.lr > 0, "the learning rate must be positive"),
            (0 <= self.freeze_epochs, "freeze epochs cannot be negative"),
            (self.augment in AUGMENT_PRESETS, f"augment must be one of {', '.join(AUGMENT_PRESETS)}"),
            (self.balance in BALANCE_MODES, f"balance must be one of {', '.join(BALANCE_MODES)}"),
            (self.monitor in MONITORS, f"monitor must be one of {', '.join(MONITORS)}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.modality in ("CT", "X-ray"), "modality must be CT or X-ray"),
            (all(16 <= s <= 1024 for s in self.resolved_sizes()), "image sizes must lie between 16 and 1024 px"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device must be auto, cpu or cuda"),
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


class Cancelled(Exception):
    """Raised inside the loop when a stop was requested."""


# ------------------------------------------------------------------------------------ data
class CachedImages(torch.utils.data.Dataset):
    """Decoded, resized uint8 images held in memory, augmented per sample on the fly."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int]) -> None:
        self.images = images
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def augmentation(preset: str, size: int, cached_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Per-image transform (uint8 3 x H x W in and out) for an augmentation preset."""
    from torchvision.transforms import v2

    if preset == "none":
        return None if size == cached_size else v2.Resize((size, size), antialias=True)
    if preset == "light":
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                           v2.RandomHorizontalFlip()])
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomRotation(10)], p=0.5),
        v2.ColorJitter(brightness=0.3, contrast=0.3),
    ])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and GPU) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_positive_class(classes: Sequence[str]) -> str | None:
    """The COVID class when there is one (e.g. COVID, Covid, COVID-19)."""
    for name in classes:
        if name.lower().startswith("covid"):
            return name
    return None


# ------------------------------------------------------------------------------- progress
class RunWriter:
    """Writes config.json, metrics.csv and progress.json of a run directory."""

    def __init__(self, run_dir: Path, callback: Callable[[dict], None] | None = None) -> None:
        self.run_dir = run_dir
        self.callback = callback
        self.progress: dict = {"state": "running", "epoch": 0, "epochs": 0, "step": 0, "steps_per_epoch": 0,
                               "best_metric": None, "monitor": "val_auc", "eta_seconds": None, "message": ""}
        self._last_write = 0.0

    def write_config(self, config: dict) -> None:
        _atomic_write(self.run_dir / "config.json", json.dumps(config, indent=2, default=str) + "\n")
        with open(self.run_dir / "metrics.csv", "w", newline="") as handle:
            csv.writer(handle).writerow(METRICS_HEADER)

    def append_metrics(self, row: dict) -> None:
        with open(self.run_dir / "metrics.csv", "a", newline="") as handle:
            csv.writer(handle).writerow(["" if row[k] is None else row[k] for k in METRICS_HEADER])

    def update(self, force: bool = False, **changes) -> None:
        """Merge ``changes``; write when forced (state changes) or every PROGRESS_EVERY_S seconds."""
        self.progress.update(changes)
        now = time.monotonic()
        if force or now - self._last_write >= PROGRESS_EVERY_S:
            self.progress["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            _atomic_write(self.run_dir / "progress.json", json.dumps(self.progress, indent=2) + "\n")
            self._last_write = now
            if self.callback is not None:
                self.callback(dict(self.progress))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------- training
class _Trainer:
    def __init__(self, config: TrainConfig, run_dir: Path, writer: RunWriter, stop_event: threading.Event) -> None:
        self.config = config
        self.run_dir = run_dir
        self.writer = writer
        self.stop_event = stop_event
        self.device = resolve_device(config.device)
        self.spec = get_spec(config.arch)
        self.sizes = config.resolved_sizes()

    # ---- setup
    def load_data(self) -> None:
        config = self.config
        self.train_data = open_dataset(config.dataset, config.root, config.train_split, **config.dataset_options)
        self.val_data = open_dataset(config.dataset, config.root, config.val_split, **config.dataset_options)
        self.classes = list(self.train_data.classes)
        if len(self.classes) < 2:
            raise TrainingError("Training needs at least two classes.")
        window = config.window if config.modality == "CT" else None
        self.window = window
        self.cache_size = max(self.sizes)
        started = time.monotonic()
        log(f"Decoding {len(self.train_data)} training and {len(self.val_data)} validation images ...")
        self.train_images = load_split_images(self.train_data, self.cache_size, window)
        self.val_cache: dict[int, torch.Tensor] = {}
        self.val_labels = self.val_data.labels()
        log(f"Cached images in {time.monotonic() - started:.1f}s; classes {self.train_data.class_counts()}")
        self.train_set = CachedImages(self.train_images, self.train_data.labels())

    def val_images(self, size: int) -> torch.Tensor:
        if size not in self.val_cache:
            self.val_cache[size] = load_split_images(self.val_data, size, self.window)
        return self.val_cache[size]

    def build_model(self) -> None:
        config = self.config
        self.model = create_model(config.arch, len(self.classes), pretrained=config.pretrained)
        if config.init_weights:
            load_matching_weights(self.model, config.init_weights)
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        head = head_parameters(self.model, config.arch)
        head_ids = {id(p) for p in head}
        self.prefix = None
        if config.frozen_blocks is not None:
            self.prefix = frozen_prefix(self.model, config.arch, config.frozen_blocks)
            for parameter in self.prefix.parameters():
                parameter.requires_grad_(False)
        prefix_ids = {id(p) for p in self.prefix.parameters()} if self.prefix is not None else set()
        self.backbone = [p for p in self.model.parameters() if id(p) not in head_ids | prefix_ids]
        self.head = head
        counts = np.bincount(self.train_data.labels(), minlength=len(self.classes)).astype(np.float64)
        if (counts == 0).any():
            missing = [c for c, n in zip(self.classes, counts) if n == 0]
            raise TrainingError(f"The training split has no images of class {', '.join(missing)}.")
        weights = None
        if config.balance == "loss":
            weights = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32, device=self.device)
        self.criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
        self.class_counts = counts

    def loader(self, epoch: int) -> torch.utils.data.DataLoader:
        config = self.config
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        sampler = None
        if config.balance == "sampler":
            per_item = (1.0 / self.class_counts)[np.array(self.train_data.labels())]
            sampler = torch.utils.data.WeightedRandomSampler(per_item.tolist(), len(per_item), generator=generator)
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
            generator=generator, num_workers=config.num_workers, drop_last=len(self.train_set) > config.batch_size,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            worker_init_fn=_seed_worker if config.num_workers else None,
        )

    def steps_per_epoch(self) -> int:
        n = len(self.train_set)
        steps = n // self.config.batch_size if n > self.config.batch_size else 1
        if self.config.max_train_batches:
            steps = min(steps, self.config.max_train_batches)
        return max(1, steps)

    def size_for_epoch(self, epoch: int) -> int:
        stage = min(len(self.sizes) - 1, (epoch - 1) * len(self.sizes) // self.config.epochs)
        return self.sizes[stage]

    def set_frozen(self, frozen: bool) -> None:
        for parameter in self.backbone:
            parameter.requires_grad_(not frozen)

    # ---- loop
    def run(self) -> TrainResult:
        config = self.config
        seed_everything(config.seed)
        self.load_data()
        seed_everything(config.seed)
        self.build_model()
        if self.prefix is not None:
            self.prepare_features()
        steps_per_epoch = self.steps_per_epoch()
        total_steps = steps_per_epoch * config.epochs
        optimiser = torch.optim.AdamW(
            [{"params": self.backbone, "lr": config.lr * config.backbone_lr_factor},
             {"params": self.head, "lr": config.lr}], weight_decay=config.weight_decay)
        scheduler = plateau = None
        if config.schedule == "onecycle" and total_steps >= 4:
            # Warm up over a quarter of the run (at least two steps, which OneCycleLR needs).
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimiser, max_lr=[config.lr * config.backbone_lr_factor, config.lr], total_steps=total_steps,
                pct_start=max(0.25, 2.5 / total_steps))
        elif config.schedule == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="max", factor=0.3,
                                                                 patience=config.plateau_patience)
        self.writer.update(force=True, state="running", epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                           monitor=config.monitor, message="training")
        use_amp = self.device.type == "cuda"
        best = best_loss = None
        best_epoch = None
        best_state = None
        bad_epochs = 0
        history: list[dict] = []
        step = 0
        epoch_times: list[float] = []
        last_size = None
        for epoch in range(1, config.epochs + 1):
            started = time.monotonic()
            size = self.size_for_epoch(epoch)
            if size != last_size and self.prefix is None:
                self.train_set.transform = augmentation(config.augment, size, self.cache_size)
                last_size = size
            frozen = epoch <= config.freeze_epochs
            self.set_frozen(frozen)
            self.model.train()
            if self.prefix is not None:
                self.prefix.eval()
            if frozen:  # keep the frozen backbone's batch-norm statistics as they are
                for module in self.model.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm) and all(
                            id(p) not in {id(h) for h in self.head} for p in module.parameters()):
                        module.eval()
            running, seen = 0.0, 0
            batches = self.feature_batches(epoch) if self.prefix is not None else self.loader(epoch)
            for batch_index, (images, labels) in enumerate(batches):
                if batch_index >= steps_per_epoch:
                    break
                if self.stop_event.is_set():
                    raise Cancelled()
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                    if self.prefix is not None:
                        logits = self.tail(images.float())
                    else:
                        logits = self.model(model_input(images, self.spec.mean, self.spec.std, self.device))
                loss = self.criterion(logits.float(), labels)
                if not torch.isfinite(loss):
                    raise TrainingError("The training loss became infinite or NaN: lower the learning rate.")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                if scheduler is not None and step < total_steps:
                    scheduler.step()
                step += 1
                running += loss.item() * len(labels)
                seen += len(labels)
                elapsed = time.monotonic() - started
                per_step = elapsed / (batch_index + 1)
                eta = per_step * (steps_per_epoch - batch_index - 1) + _mean_or(epoch_times, per_step * steps_per_epoch) * (config.epochs - epoch)
                self.writer.update(epoch=epoch, step=step, eta_seconds=round(eta, 1),
                                   message=f"epoch {epoch}/{config.epochs}, step {batch_index + 1}/{steps_per_epoch}")
            if self.stop_event.is_set():
                raise Cancelled()
            train_seconds = time.monotonic() - started
            val_logits = self.val_logits(size)
            val = self.val_metrics(val_logits)
            seconds = time.monotonic() - started
            epoch_times.append(seconds)
            row = {"epoch": epoch, "step": step, "lr": optimiser.param_groups[-1]["lr"],
                   "train_loss": running / max(seen, 1), "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                   "val_auc": val["auc"], "val_f1": val["f1"], "seconds": round(seconds, 3),
                   "train_seconds": round(train_seconds, 3), "train_images": seen}
            history.append(row)
            self.writer.append_metrics(row)
            metric = row[config.monitor]
            metric = -math.inf if metric is None else metric
            improved = best is None or metric > best + 1e-9 or (abs(metric - best) <= 1e-9 and val["loss"] < best_loss)
            log(f"epoch {epoch}/{config.epochs} size {size} train_loss {row['train_loss']:.4f} "
                f"val_loss {val['loss']:.4f} acc {val['accuracy']:.4f} auc {_fmt(val['auc'])} f1 {val['f1']:.4f} "
                f"({seconds:.1f}s){' *' if improved else ''}")
            if improved:
                best, best_loss, best_epoch, bad_epochs = metric, val["loss"], epoch, 0
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                best_size = size
                self.save(best_state, best_size, {"val": val["summary"]}, epoch, step, temperature=1.0, threshold=None)
            else:
                bad_epochs += 1
            if plateau is not None:
                plateau.step(metric)
            eta = _mean_or(epoch_times, 0.0) * (config.epochs - epoch)
            self.writer.update(force=True, epoch=epoch, step=step, best_metric=_finite(best), eta_seconds=round(eta, 1),
                               message=f"epoch {epoch}/{config.epochs} done")
            if config.patience and bad_epochs >= config.patience:
                log(f"Early stopping: no {config.monitor} improvement for {bad_epochs} epochs.")
                break
        # Final bundle: the best weights, calibrated on val, with val metrics from the evaluation code.
        self.model.load_state_dict(best_state)
        final = self.finalise(best_state, best_size, best_epoch, step)
        return TrainResult("succeeded", self.run_dir, self.run_dir / "model", _finite(best), best_epoch,
                           len(history), history, final)

    # ---- cached-feature partial fine-tuning
    def prepare_features(self) -> None:
        """Run the frozen prefix once over ``feature_views`` augmented views of each training image."""
        config = self.config
        size = self.sizes[-1]
        self.prefix.eval()
        views = []
        transform = augmentation(config.augment, size, self.cache_size)
        plain = augmentation("none", size, self.cache_size)
        generator_state = torch.get_rng_state()
        torch.manual_seed(config.seed)
        started = time.monotonic()
        total = config.feature_views * len(self.train_set)
        for view in range(config.feature_views):
            # View 0 is the plain image; the others are augmented.
            chosen = plain if (view == 0 or transform is None) else transform
            images = torch.stack([chosen(image) if chosen else image for image in self.train_images])
            views.append(self.prefix_features(images, done=view * len(images), total=total))
            log(f"Frozen-prefix features: view {view + 1}/{config.feature_views} "
                f"({time.monotonic() - started:.0f}s)")
        torch.set_rng_state(generator_state)
        self.train_features = torch.stack(views)  # views x N x C x H x W
        self.val_features: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def prefix_features(self, images_uint8: torch.Tensor, done: int = 0, total: int = 0) -> torch.Tensor:
        outputs = []
        for start in range(0, len(images_uint8), 32):
            if self.stop_event.is_set():
                raise Cancelled()
            batch = model_input(images_uint8[start:start + 32], self.spec.mean, self.spec.std, self.device)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                outputs.append(self.prefix(batch).to(torch.float16).cpu())
            if total:
                self.writer.update(message=f"preparing features {done + start + len(batch)}/{total}")
        return torch.cat(outputs)

    def tail(self, features: torch.Tensor) -> torch.Tensor:
        """The trainable rest of the network on prefix outputs (features -> pool -> classifier)."""
        rest = self.model.features[self.config.frozen_blocks:]
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(rest(features.to(self.device)), 1), 1)
        return self.model.classifier(pooled)

    def feature_batches(self, epoch: int):
        """Shuffled (or balanced) batches of cached features, one random view per image per epoch."""
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        n = len(self.train_set)
        labels = self.train_set.labels
        if self.config.balance == "sampler":
            per_item = torch.as_tensor((1.0 / self.class_counts)[labels.numpy()])
            order = torch.multinomial(per_item, n, replacement=True, generator=generator)
        else:
            order = torch.randperm(n, generator=generator)
        views = torch.randint(0, self.train_features.shape[0], (n,), generator=generator)
        batch = self.config.batch_size
        for start in range(0, n - batch + 1 if n > batch else 1, batch):
            index = order[start:start + batch]
            yield self.train_features[views[index], index], labels[index]

    def val_logits(self, size: int) -> torch.Tensor:
        if self.prefix is None:
            return predict_logits(self.model, self.val_images(size), self.spec.mean, self.spec.std, self.device)
        if size not in self.val_features:
            self.val_features[size] = self.prefix_features(self.val_images(size))
        self.model.eval()
        with torch.no_grad():
            return torch.cat([self.tail(chunk.float()).float().cpu() for chunk in self.val_features[size].split(64)])

    def val_metrics(self, logits: torch.Tensor, temperature: float = 1.0, threshold: float | None = None) -> dict:
        labels = torch.as_tensor(self.val_labels, dtype=torch.long)
        loss = float(nn.functional.cross_entropy(logits, labels))
        probs = torch.softmax(logits / temperature, dim=1).numpy()
        positive = self.positive_class()
        summary = compute_metrics(self.val_labels, probs, self.classes, positive, threshold)
        f1 = summary["f1"] if len(self.classes) == 2 else summary["macro_f1"]
        return {"loss": loss, "accuracy": summary["accuracy"], "auc": summary["auc"], "f1": f1,
                "summary": _card_metrics(summary, loss)}

    def positive_class(self) -> str | None:
        return self.config.positive_class or default_positive_class(self.classes)

    def finalise(self, best_state: dict, size: int, best_epoch: int, step: int) -> dict:
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
        log(f"Best epoch {best_epoch}: val accuracy {val['accuracy']:.4f}, AUC {_fmt(val['auc'])}, "
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
            input_size=size, window=self.window if config.modality == "CT" else None,
            positive_class=self.positive_class(), threshold=threshold, temperature=float(temperature),
            description=config.description or f"{config.arch} trained on {config.dataset} ({', '.join(self.classes)}).",
            training={
                "command": config.command,
                "dataset": config.dataset,
                "data": {"root": Path(config.root).name, "train_split": config.train_split, "val_split": config.val_split,
                         "train_counts": self.train_data.class_counts(), "val_counts": self.val_data.class_counts(),
                         "options": config.dataset_options},
                "seed": config.seed,
                "epoch": epoch,
                "step": step,
                "config": _public_config(config),
                "device": str(self.device),
            },
            metrics=metrics,
        )
        save_bundle(model.eval(), card, self.run_dir / "model")


def frozen_prefix(model: nn.Module, arch: str, blocks: int) -> nn.Sequential:
    """``model.features[:blocks]`` for architectures built as features -> pool -> classifier."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not hasattr(model, "classifier") or arch.startswith(("densenet", "vgg")):
        raise TrainingError(f"Frozen blocks (cached features) are not supported for {arch}; "
                            "use mobilenet_v2, efficientnet_b0 or tiny_cnn.")
    if not 0 < blocks < len(features):
        raise TrainingError(f"{arch} has {len(features)} feature blocks: frozen blocks must lie between 1 and "
                            f"{len(features) - 1}, not {blocks}.")
    return features[:blocks]


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


def _public_config(config: TrainConfig) -> dict:
    data = asdict(config)
    data["root"] = str(config.root)
    return data


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _mean_or(values: Sequence[float], default: float) -> float:
    return float(np.mean(values)) if values else default


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def load_matching_weights(model: nn.Module, path: str | os.PathLike) -> int:
    """Copy tensors of a safetensors state dict whose names and shapes match ``model``; returns how many."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise TrainingError(f"No weights file at {path} to start from.")
    state = load_file(str(path))
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise TrainingError(f"None of the weights in {path.name} fit a {type(model).__name__}.")
    model.load_state_dict(matched, strict=False)
    log(f"Initialised {len(matched)}/{len(own)} tensors from {path.name}")
    return len(matched)


# ------------------------------------------------------------------------------------ public API
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
    stop_event = stop_event or threading.Event()
    previous_handler = install_sigterm(stop_event)
    writer.progress["monitor"] = config.monitor
    writer.progress["epochs"] = config.epochs
    try:
        config.validate()
        if config.command is None:
            config.command = "covidscan train (Python API)"
        resolved = {**_public_config(config), "image_sizes": config.resolved_sizes(),
                    "resolved_device": str(resolve_device(config.device)), "python": sys.version.split()[0],
                    "torch": torch.__version__, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        writer.write_config(resolved)
        writer.update(force=True, state="running", message="loading data")
        trainer = _Trainer(config, run_dir, writer, stop_event)
        result = trainer.run()
        writer.update(force=True, state="succeeded", eta_seconds=0.0, best_metric=result.best_metric,
                      message=f"finished: best {config.monitor} {_fmt(result.best_metric)} at epoch {result.best_epoch}")
        return result
    except Cancelled:
        log("Training cancelled.")
        writer.update(force=True, state="cancelled", eta_seconds=None, message="cancelled by the user")
        bundle = run_dir / "model"
        return TrainResult("cancelled", run_dir, bundle if bundle.is_dir() else None,
                           writer.progress.get("best_metric"), None, writer.progress.get("epoch", 0), [])
    except CovidscanError as exc:
        writer.update(force=True, state="failed", eta_seconds=None, message=str(exc))
        raise
    except BaseException as exc:
        writer.update(force=True, state="failed", eta_seconds=None, message=f"unexpected error: {exc!r}")
        raise
    finally:
        restore_sigterm(previous_handler)


def install_sigterm(stop_event: threading.Event):
    """Make SIGTERM set ``stop_event`` (main thread only); returns the handler to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_event.set())
    return previous


def restore_sigterm(previous) -> None:
    """Put back the SIGTERM handler :func:`install_sigterm` replaced."""
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------ LR finder
@dataclass
class LRFinderResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float | None


def find_lr(config: TrainConfig, start_lr: float = 1e-6, end_lr: float = 1.0, num_steps: int = 60,
            stop_event: threading.Event | None = None) -> LRFinderResult:
    """Leslie Smith's LR range test: raise the lr exponentially and record the smoothed loss.

    Returns:
        The curve (lrs, smoothed losses) and the suggested lr: where the loss falls fastest
        (or a tenth of the lr at the minimum loss when the curve is flat).
    """
    config = copy.deepcopy(config)
    config.validate()
    trainer = _Trainer(config, Path("."), RunWriter(Path("."), None), stop_event or threading.Event())
    seed_everything(config.seed)
    trainer.load_data()
    trainer.build_model()
    size = trainer.sizes[-1]
    trainer.train_set.transform = augmentation(config.augment, size, trainer.cache_size)
    model, device = trainer.model, trainer.device
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=start_lr, weight_decay=config.weight_decay)
    factor = (end_lr / start_lr) ** (1 / max(num_steps - 1, 1))
    lrs, losses = [], []
    smoothed, best = 0.0, math.inf
    step = 0
    while step < num_steps:
        for images, labels in trainer.loader(step):
            if step >= num_steps or trainer.stop_event.is_set():
                break
            lr = start_lr * factor**step
            for group in optimiser.param_groups:
                group["lr"] = lr
            batch = model_input(images, trainer.spec.mean, trainer.spec.std, device)
            loss = trainer.criterion(model(batch).float(), labels.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            value = loss.item()
            if not math.isfinite(value):
                step = num_steps
                break
            smoothed = 0.9 * smoothed + 0.1 * value
            debiased = smoothed / (1 - 0.9 ** (step + 1))
            lrs.append(lr)
            losses.append(debiased)
            best = min(best, debiased)
            step += 1
            if debiased > 4 * best and step > 5:  # diverged
                step = num_steps
                break
        if trainer.stop_event.is_set():
            break
    return LRFinderResult(lrs, losses, suggest_lr(lrs, losses))


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """The lr of the steepest loss descent before the minimum (a tenth of the minimum's lr as fallback)."""
    if len(lrs) < 3:
        return None
    losses_a = np.asarray(losses)
    log_lrs = np.log10(np.asarray(lrs))
    minimum = int(np.argmin(losses_a))
    if minimum < 2:
        return float(lrs[minimum]) / 10
    # Skip the first tenth: the debiased moving average still wobbles there, and a wobble on a tiny lr
    # interval looks like the steepest descent of the whole curve.
    skip = min(max(1, len(lrs) // 10), minimum - 1)
    slopes = np.gradient(losses_a[: minimum + 1], log_lrs[: minimum + 1])[skip:]
    steepest = skip + int(np.argmin(slopes))
    return float(lrs[steepest]) if slopes[steepest - skip] < 0 else float(lrs[minimum]) / 10


# ------------------------------------------------------------------------------------ grid search
def grid_search(base: TrainConfig, out_dir: str | os.PathLike, lrs: Sequence[float], archs: Sequence[str],
                image_sizes: Sequence[int], stop_event: threading.Event | None = None) -> list[dict]:
    """Train every (lr, arch, size) combination into ``out_dir/<run>`` and rank them by the monitor.

    Returns:
        One dict per run (run, arch, lr, image_size, best_metric, best_epoch, state), best first;
        also written as ``out_dir/grid.csv``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in archs:
        for size in image_sizes:
            for lr in lrs:
                config = copy.deepcopy(base)
                config.arch, config.lr, config.image_size, config.progressive_resize = arch, float(lr), int(size), None
                name = f"{arch}-{size}px-lr{lr:g}"
                log(f"Grid run {name}")
                result = train(config, out_dir / name, stop_event=stop_event)
                rows.append({"run": name, "arch": arch, "lr": float(lr), "image_size": int(size),
                             "best_metric": result.best_metric, "best_epoch": result.best_epoch, "state": result.state})
                if result.state == "cancelled":
                    break
    rows.sort(key=lambda r: -math.inf if r["best_metric"] is None else r["best_metric"], reverse=True)
    with open(out_dir / "grid.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["run"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
