"""Self-supervised (SimCLR) pretraining of a backbone on a split's unlabeled images.

On small sets such as COVID-CT (425 training slices), contrastive pretraining on the training
images themselves, starting from ImageNet weights, gave the largest gain in the literature
(Self-Trans, He et al. 2020). ``pretrain(config, out_path)`` decodes the split once into a uint8
cache, makes two augmented views of every image per step, and trains the backbone plus a
projection MLP with the NT-Xent loss (pytorch-metric-learning). It saves the backbone only, with the
tensor names of ``create_model(arch, num_classes)``, so ``covidscan train --init-weights FILE``
(:func:`covidscan.training.load_matching_weights`) copies every backbone tensor and leaves the new
classifier head alone. A ``<out>.json`` record next to the weights says how they were made.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from covidscan.datasets import DATASET_KINDS, open_dataset
from covidscan.errors import CovidscanError, TrainingError
from covidscan.evaluation import load_split_images
from covidscan.images import FILE_WINDOW, WINDOW_PRESETS
from covidscan.models import DEFAULT_ARCHITECTURE, create_model, get_head, get_spec, replace_head
from covidscan.training.callbacks import StepSchedule
from covidscan.training.config import CROP_CHOICES, as_card_crop, option
from covidscan.training.loop import Callback, Cancelled, FitLoop
from covidscan.utils import (
    atomic_write, atomic_write_text, log, resolve_device, seed_everything, sigterm_stops,
)
from covidscan.transforms import model_input

# The cache is a little larger than the crops so RandomResizedCrop has pixels to crop from.
CACHE_MARGIN = 1.15


@dataclass
class PretrainConfig:
    """Options of a contrastive pretraining run; saved in the ``<out>.json`` record."""

    dataset: str = option(help="dataset layout", choices=DATASET_KINDS)
    root: str = option(help="dataset folder")
    split: str = option("train", "split whose images are used; several joined by + (train+val: the images cv pools)")
    arch: str = option(DEFAULT_ARCHITECTURE, "architecture")
    # Self-Trans starts from ImageNet weights; on the command line it is the --pretrained flag.
    pretrained: bool = option(True, "start from ImageNet weights (recommended)", cli_default=False)
    epochs: int = option(50, "pretraining epochs")
    image_size: int = option(160, "view size in pixels")
    batch_size: int = option(64, "images per step; the loss sees two views of each (2 x batch_size)")
    lr: float = option(1e-3, "AdamW learning rate, cosine-decayed to zero over the run")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    temperature: float = option(0.2, "NT-Xent temperature")
    projection_dim: int = option(128, "output size of the projection head")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto, cpu or cuda")
    num_workers: int = option(0, "data-loader worker processes that make the augmented views")
    dataset_options: dict = option(default_factory=dict, help="open_dataset options (val_fraction, seed)", cli=False)
    max_batches: int | None = option(None, "cap steps per epoch (quick checks)")
    window: str | None = option("lung", "CT window for DICOM slices: lung, mediastinum, bone or file (ignored for "
                                "PNG/JPEG)")
    # Pretraining on what the fine-tuned model will see: cv passes its recipe's crop.
    crop: str = option("none", "CT: cut each slice to its lungs' bounding box (automatic lung mask) before the views "
                       "are made", choices=CROP_CHOICES)
    command: str | None = option(None, "the command that started the run", cli=False)

    def validate(self) -> None:
        """Raise TrainingError naming every option out of range."""
        problems = []
        try:
            spec = get_spec(self.arch)
        except CovidscanError as exc:
            problems.append(str(exc).rstrip("."))
            spec = None
        if spec is not None and self.pretrained and not spec.has_imagenet_weights:
            problems.append(f"'{self.arch}' has no ImageNet weights: leave pretrained off")
        checks = [
            (self.dataset in DATASET_KINDS, f"dataset must be one of {', '.join(DATASET_KINDS)}"),
            (bool(self.split), "a split is needed (e.g. train)"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 2, "batch size must be at least 2 (contrastive learning needs other images as negatives)"),
            (self.lr > 0, "the learning rate must be positive"),
            (self.weight_decay >= 0, "weight decay cannot be negative"),
            (self.temperature > 0, "the temperature must be positive"),
            (self.projection_dim >= 1, "the projection size must be at least 1"),
            (16 <= self.image_size <= 1024, "the image size must lie between 16 and 1024 px"),
            (self.max_batches is None or self.max_batches >= 1, "max batches must be at least 1"),
            (self.num_workers >= 0, "the number of loader workers cannot be negative"),
            (self.window is None or self.window in (*WINDOW_PRESETS, FILE_WINDOW),
             f"window must be one of {', '.join([*WINDOW_PRESETS, FILE_WINDOW])}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device must be auto, cpu or cuda"),
            (self.crop in CROP_CHOICES, f"crop must be one of {', '.join(CROP_CHOICES)}"),
        ]
        problems += [message for ok, message in checks if not ok]
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append("device cuda was asked for but no GPU is available")
        if problems:
            raise TrainingError("Invalid pretraining options: " + "; ".join(problems) + ".")

    def cache_size(self) -> int:
        return round(self.image_size * CACHE_MARGIN)


@dataclass
class PretrainResult:
    """What a finished (or stopped) pretraining run produced."""

    state: str  # succeeded | cancelled
    out_path: Path | None  # the backbone weights (None when cancelled)
    losses: list[float]  # mean NT-Xent loss per epoch
    seconds: list[float]  # wall time per epoch
    images: int  # images in the split
    steps: int = 0


def record_path(out_path: str | os.PathLike) -> Path:
    """The JSON record written next to the weights: ``<out>.json`` (e.g. ``ssl.safetensors.json``)."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".json")


def simclr_augmentation(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """SimCLR-style view of a uint8 3 x H x W image for grayscale scans (no hue or saturation)."""
    from torchvision.transforms import v2

    blur_kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, about a tenth of the image as in SimCLR
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomRotation(10)], p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.6, contrast=0.6)], p=0.8),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
    ])


class TwoViews(torch.utils.data.Dataset):
    """Cached uint8 images, each returned as two independently augmented views."""

    def __init__(self, images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return self.transform(image), self.transform(image)


def stacked_batches(pairs, batch_size: int):
    """Stack consecutive (view, view) pairs into batches of ``batch_size``; a ragged last batch is dropped."""
    firsts, seconds = [], []
    for first, second in pairs:
        firsts.append(first)
        seconds.append(second)
        if len(firsts) == batch_size:
            yield torch.stack(firsts), torch.stack(seconds)
            firsts, seconds = [], []


def build_contrastive_model(arch: str, pretrained: bool, projection_dim: int) -> tuple[nn.Module, str]:
    """``create_model(arch, 2, pretrained)`` with its classifier head replaced by a projection MLP.

    Returns:
        The model (pooled backbone features -> Linear -> ReLU -> Linear(projection_dim)) and the
        dotted name of the projection head (the architecture's head), whose tensors are left out when saving.
    """
    model = create_model(arch, num_classes=2, pretrained=pretrained)
    last_linear = [m for m in get_head(model, arch).modules() if isinstance(m, nn.Linear)][-1]
    features = last_linear.in_features
    projection = nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True), nn.Linear(features, projection_dim))
    replace_head(model, arch, projection)
    return model, get_spec(arch).head


def backbone_state(model: nn.Module, head: str) -> dict[str, torch.Tensor]:
    """The model's state dict without the projection head (contiguous CPU tensors, as safetensors wants)."""
    prefix = head + "."
    return {name: tensor.detach().to("cpu").contiguous().clone()
            for name, tensor in model.state_dict().items() if not name.startswith(prefix)}


class _PretrainProgress(Callback):
    """Reports every step and logs every epoch's mean NT-Xent loss."""

    def __init__(self, report: Callable[..., None], scheduler) -> None:
        self.report = report
        self.scheduler = scheduler
        self.losses: list[float] = []
        self.seconds: list[float] = []

    def on_step_end(self, loop: FitLoop) -> None:
        self.report(epoch=loop.epoch, step=loop.step, loss=loop.last_loss,
                    message=f"epoch {loop.epoch}/{loop.epochs}, step {loop.batch_index + 1}/{loop.steps_per_epoch}")

    def on_epoch_end(self, loop: FitLoop) -> None:
        self.losses.append(loop.epoch_loss)
        self.seconds.append(round(time.monotonic() - loop.epoch_started, 3))
        log(f"epoch {loop.epoch}/{loop.epochs} ntxent_loss {self.losses[-1]:.4f} "
            f"lr {self.scheduler.get_last_lr()[0]:.2e} ({self.seconds[-1]:.1f}s)")
        self.report(epoch=loop.epoch, step=loop.step, loss=self.losses[-1],
                    message=f"epoch {loop.epoch}/{loop.epochs} done")


def pretrain(
    config: PretrainConfig,
    out_path: str | os.PathLike,
    progress_callback: Callable[[dict], None] | None = None,
    stop_event: threading.Event | None = None,
) -> PretrainResult:
    """Contrastively pretrain ``config.arch`` on a split's images and save the backbone weights.

    Args:
        config: the pretraining options.
        out_path: the ``.safetensors`` file to write (its folder is created); ``<out>.json`` is
            written next to it.
        progress_callback: called after every step and at the end of every epoch with a dict
            (epoch, epochs, step, steps_per_epoch, loss, message).
        stop_event: set it to stop at the next step (SIGTERM does the same in the main thread);
            nothing is written then.

    Returns:
        The result; ``state`` is "succeeded" or "cancelled".

    Raises:
        CovidscanError: bad options, data or weights.
    """
    try:
        from pytorch_metric_learning.losses import NTXentLoss, SelfSupervisedLoss
    except ImportError:
        raise TrainingError("Pretraining needs the pytorch-metric-learning package: "
                            "pip install pytorch-metric-learning==2.9.0") from None

    config.validate()
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise TrainingError(f"The output file must end in .safetensors, not '{out_path.name}'.")
    if out_path.is_dir():
        raise TrainingError(f"{out_path} is a folder; give a file name ending in .safetensors.")
    with sigterm_stops(stop_event or threading.Event()) as stop_event:
        try:
            return _run(config, out_path, progress_callback, stop_event,
                        SelfSupervisedLoss(NTXentLoss(config.temperature)))
        except Cancelled:
            log("Pretraining cancelled; nothing was written.")
            return PretrainResult("cancelled", None, [], [], 0)


def _run(config: PretrainConfig, out_path: Path, progress_callback, stop_event: threading.Event,
         criterion: nn.Module) -> PretrainResult:
    device = resolve_device(config.device)
    spec = get_spec(config.arch)
    data = open_dataset(config.dataset, config.root, config.split, **config.dataset_options)
    if len(data) < 2:
        raise TrainingError(f"Contrastive pretraining needs at least 2 images; the {config.split} split has {len(data)}.")
    started = time.monotonic()
    log(f"Decoding {len(data)} {config.split} images (labels ignored) ...")
    images = load_split_images(data, config.cache_size(), config.window, crop=as_card_crop(config.crop))
    log(f"Cached {len(images)} images at {config.cache_size()} px in {time.monotonic() - started:.1f}s")

    seed_everything(config.seed)
    model, head = build_contrastive_model(config.arch, config.pretrained, config.projection_dim)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    views = TwoViews(images, simclr_augmentation(config.image_size))
    batch_size = min(config.batch_size, len(views))
    steps_per_epoch = len(views) // batch_size  # drop the ragged last batch: the loss depends on batch size
    if config.max_batches:
        steps_per_epoch = min(steps_per_epoch, config.max_batches)
    total_steps = steps_per_epoch * config.epochs
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total_steps)
    chance = math.log(2 * batch_size - 1)
    log(f"SimCLR pretraining of {config.arch} ({'ImageNet' if config.pretrained else 'random'} start) on {device}: "
        f"{config.epochs} epochs x {steps_per_epoch} steps of {batch_size} images ({2 * batch_size} views), "
        f"chance-level loss {chance:.3f}")

    def report(**record) -> None:
        if progress_callback is not None:
            progress_callback({"epochs": config.epochs, "steps_per_epoch": steps_per_epoch, **record})

    # One loader for the whole run: with workers it keeps them between epochs (starting them every
    # epoch costs more than an epoch of a few hundred images). It hands out single images, so all
    # workers share each batch's augmentation (a worker per batch would leave most of them idle on
    # a few batches an epoch); batches are stacked here, so pinning single images would not pin them.
    # Its generator, reseeded per epoch, draws that epoch's order (and the persistent workers' seeds
    # once), so a run is repeatable.
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(
        views, batch_size=None, sampler=torch.utils.data.RandomSampler(views, generator=generator),
        generator=generator, num_workers=config.num_workers, persistent_workers=config.num_workers > 0,
        prefetch_factor=2 * batch_size if config.num_workers else None)

    def batches(epoch: int):
        generator.manual_seed(config.seed * 1000 + epoch)
        return stacked_batches(loader, batch_size)

    def forward(batch) -> tuple[torch.Tensor, None, int]:
        first, second = batch
        return model(model_input(torch.cat([first, second]), spec.mean, spec.std, device)), None, len(first)

    def ntxent(embeddings: torch.Tensor, _targets) -> torch.Tensor:
        return criterion(*embeddings.chunk(2))

    progress = _PretrainProgress(report, scheduler)
    loop = FitLoop(model, optimiser, forward, ntxent, batches, config.epochs, steps_per_epoch, device, stop_event,
                   callbacks=[StepSchedule(scheduler, total_steps), progress],
                   non_finite_message="The contrastive loss became infinite or NaN: lower the learning rate.")
    loop.run()
    losses, seconds, step = progress.losses, progress.seconds, loop.step

    from safetensors.torch import save_file

    state = backbone_state(model, head)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "arch": config.arch,
                                                                            "method": "simclr"}))
    record = {
        "method": "SimCLR (NT-Xent) self-supervised pretraining; backbone only, projection head dropped",
        "command": config.command or "covidscan.pretrain.pretrain (Python API)",
        "config": asdict(config),
        "images": len(images),
        "class_counts": data.class_counts(),  # labels unused in training; recorded to describe the data
        "losses": losses,
        "seconds": seconds,
        "steps": step,
        "chance_loss": chance,
        "tensors": len(state),
        "device": str(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(record_path(out_path), json.dumps(record, indent=2, default=str) + "\n")
    log(f"Saved {len(state)} backbone tensors to {out_path} (record: {record_path(out_path).name})")
    return PretrainResult("succeeded", out_path, losses, seconds, len(images), step)
