"""Small :class:`~covidscan.training.loop.Callback` s of a training run: run-directory writer with
progress and ETA, best checkpoint, early stopping, learning-rate schedules and weight averaging."""
from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from covidscan.training.config import METRICS_HEADER, PROGRESS_EVERY_S
from covidscan.training.loop import Callback, FitLoop
from covidscan.utils import atomic_write_text, log


class RunWriter:
    """Writes config.json, metrics.csv and progress.json of a run directory."""

    every_s: float = PROGRESS_EVERY_S  # progress.json is rewritten at most this often, unless forced

    def __init__(self, run_dir: Path, callback: Callable[[dict], None] | None = None) -> None:
        self.run_dir = run_dir
        self.callback = callback
        self.progress: dict = {"state": "running", "epoch": 0, "epochs": 0, "step": 0, "steps_per_epoch": 0,
                               "best_metric": None, "monitor": "val_auc", "eta_seconds": None, "message": ""}
        self._last_write = 0.0

    def write_config(self, config: dict) -> None:
        """Write ``config.json`` and start ``metrics.csv`` with its header."""
        atomic_write_text(self.run_dir / "config.json", json.dumps(config, indent=2, default=str) + "\n")
        with open(self.run_dir / "metrics.csv", "w", newline="") as handle:
            csv.writer(handle).writerow(METRICS_HEADER)

    def append_metrics(self, row: dict) -> None:
        """Append one epoch's row to ``metrics.csv``."""
        with open(self.run_dir / "metrics.csv", "a", newline="") as handle:
            csv.writer(handle).writerow(["" if row[k] is None else row[k] for k in METRICS_HEADER])

    def update(self, force: bool = False, **changes) -> None:
        """Merge ``changes``; write when forced (state changes) or every ``every_s`` seconds."""
        self.progress.update(changes)
        now = time.monotonic()
        if force or now - self._last_write >= self.every_s:
            self.progress["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            atomic_write_text(self.run_dir / "progress.json", json.dumps(self.progress, indent=2) + "\n")
            self._last_write = now
            if self.callback is not None:
                self.callback(dict(self.progress))


class BestCheckpoint(Callback):
    """Keeps the weights of the best epoch by ``monitor`` (ties: lower val loss) and saves each new best;
    with ``monitor="last"`` every epoch replaces the one before (the final epoch is kept).

    Reads ``loop.logs[monitor]``, ``loop.logs["val_loss"]`` and ``loop.logs["size"]``; sets
    ``loop.logs["improved"]``.
    """

    def __init__(self, monitor: str, save: Callable[[dict, FitLoop], None] | None = None) -> None:
        self.monitor = monitor
        self.save = save
        self.best: float | None = None
        self.best_loss: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.best_size: int | None = None
        self.bad_epochs = 0

    def on_epoch_end(self, loop: FitLoop) -> None:
        metric = loop.logs.get(self.monitor)
        metric = -math.inf if metric is None else metric
        loss = loop.logs.get("val_loss")
        improved = (self.monitor == "last" or self.best is None or metric > self.best + 1e-9
                    or (abs(metric - self.best) <= 1e-9 and loss < self.best_loss))
        loop.logs["improved"] = improved
        if not improved:
            self.bad_epochs += 1
            return
        self.best, self.best_loss, self.best_epoch, self.bad_epochs = metric, loss, loop.epoch, 0
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in loop.model.state_dict().items()}
        self.best_size = loop.logs.get("size")
        if self.save is not None:
            self.save(self.best_state, loop)

    @property
    def best_metric(self) -> float | None:
        """The best monitored value so far (None when there is none or it was not finite)."""
        return finite_or_none(self.best)


class WeightEMA(Callback):
    """Evaluates and keeps an exponential moving average of the weights instead of the raw ones.

    On a few hundred images one epoch's raw weights swing with the last batches (and at peak
    learning rate), so choosing an epoch on a small validation set picks noise; their average moves
    smoothly. The average (batch-norm buffers included) is swapped into ``loop.model`` before each
    evaluation, so the callbacks after it (best checkpoint, progress) see it, and the raw weights
    are swapped back before the next epoch's steps.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.average = None
        self.raw: dict | None = None

    def on_fit_start(self, loop: FitLoop) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.average = AveragedModel(loop.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)

    def on_step_end(self, loop: FitLoop) -> None:
        self.average.update_parameters(loop.model)

    def on_train_epoch_end(self, loop: FitLoop) -> None:
        self.raw = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}
        loop.model.load_state_dict(self.average.module.state_dict())

    def on_epoch_start(self, loop: FitLoop) -> None:
        if self.raw is not None:
            loop.model.load_state_dict(self.raw)
            self.raw = None


class TailAverage(Callback):
    """Averages the weights left at the end of each of the last ``epochs`` epochs, with equal weights, and
    evaluates and keeps that average at the final epoch (stochastic weight averaging over the annealing
    tail of the schedule, as in Izmailov et al. 2018).

    One run's final weights are one draw of a wide run-to-run spread on a few hundred images; the
    average of several epochs' weights sits nearer the middle of the region they explore. Each snapshot
    is what that epoch evaluates (the moving average when a :class:`WeightEMA` comes first in the
    callbacks). Batch-norm statistics are averaged like the weights rather than recomputed. Training
    must run every epoch (no early stopping) for the average to be built.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.average = None

    def on_train_epoch_end(self, loop: FitLoop) -> None:
        if loop.epoch <= loop.epochs - self.epochs:
            return
        if self.average is None:
            from torch.optim.swa_utils import AveragedModel, get_swa_avg_fn

            # The per-tensor average: torch's default on a GPU is a foreach kernel that refuses the
            # integer batch-norm counters (num_batches_tracked) among the buffers.
            self.average = AveragedModel(loop.model, avg_fn=get_swa_avg_fn(), use_buffers=True)
        self.average.update_parameters(loop.model)
        if loop.epoch == loop.epochs:
            loop.model.load_state_dict(self.average.module.state_dict())
            log(f"Weights averaged over the last {int(self.average.n_averaged)} epochs.")


class EarlyStopping(Callback):
    """Ends training after ``patience`` epochs without a new best (None: never)."""

    def __init__(self, checkpoint: BestCheckpoint, patience: int | None) -> None:
        self.checkpoint = checkpoint
        self.patience = patience

    def on_epoch_end(self, loop: FitLoop) -> None:
        if self.patience and self.checkpoint.bad_epochs >= self.patience:
            log(f"Early stopping: no {self.checkpoint.monitor} improvement for {self.checkpoint.bad_epochs} epochs.")
            loop.should_stop = True


class StepSchedule(Callback):
    """Steps a per-step lr scheduler (e.g. one-cycle, cosine) after every optimiser step, ``total_steps`` at most."""

    def __init__(self, scheduler, total_steps: int) -> None:
        self.scheduler = scheduler
        self.total_steps = total_steps

    def on_step_end(self, loop: FitLoop) -> None:
        if loop.step <= self.total_steps:
            self.scheduler.step()


class PlateauSchedule(Callback):
    """Steps ReduceLROnPlateau with the monitored metric at the end of every epoch."""

    def __init__(self, plateau: torch.optim.lr_scheduler.ReduceLROnPlateau, checkpoint: BestCheckpoint) -> None:
        self.plateau = plateau
        self.checkpoint = checkpoint

    def on_epoch_end(self, loop: FitLoop) -> None:
        metric = loop.logs.get(self.checkpoint.monitor)
        self.plateau.step(-math.inf if metric is None else metric)


class RunProgress(Callback):
    """Writes ``metrics.csv`` rows and ``progress.json`` (epoch, step, ETA, best) through a :class:`RunWriter`.

    The per-step ETA is the rest of this epoch at its pace so far plus the mean epoch time (validation
    included) for the epochs left.
    """

    def __init__(self, writer: RunWriter, checkpoint: BestCheckpoint | None = None) -> None:
        self.writer = writer
        self.checkpoint = checkpoint
        self.epoch_times: list[float] = []
        self.history: list[dict] = []  # the metrics rows written so far

    def on_step_end(self, loop: FitLoop) -> None:
        done = loop.batch_index + 1
        per_step = (time.monotonic() - loop.epoch_started) / done
        eta = (per_step * (loop.steps_per_epoch - done)
               + mean_or(self.epoch_times, per_step * loop.steps_per_epoch) * (loop.epochs - loop.epoch))
        self.writer.update(epoch=loop.epoch, step=loop.step, eta_seconds=round(eta, 1),
                           message=f"epoch {loop.epoch}/{loop.epochs}, step {done}/{loop.steps_per_epoch}")

    def on_epoch_end(self, loop: FitLoop) -> None:
        seconds = time.monotonic() - loop.epoch_started
        self.epoch_times.append(seconds)
        logs = loop.logs
        row = {"epoch": loop.epoch, "step": loop.step, "lr": loop.optimiser.param_groups[-1]["lr"],
               "train_loss": loop.epoch_loss, "val_loss": logs["val_loss"], "val_accuracy": logs["val_accuracy"],
               "val_auc": logs["val_auc"], "val_f1": logs["val_f1"], "seconds": round(seconds, 3),
               "train_seconds": round(loop.train_seconds, 3), "train_images": loop.epoch_samples}
        self.history.append(row)
        self.writer.append_metrics(row)
        log(f"epoch {loop.epoch}/{loop.epochs} size {logs.get('size')} train_loss {row['train_loss']:.4f} "
            f"val_loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} auc {fmt(row['val_auc'])} "
            f"f1 {row['val_f1']:.4f} ({seconds:.1f}s){' *' if logs.get('improved') else ''}")
        eta = mean_or(self.epoch_times, 0.0) * (loop.epochs - loop.epoch)
        best = self.checkpoint.best_metric if self.checkpoint is not None else None
        self.writer.update(force=True, epoch=loop.epoch, step=loop.step, best_metric=best, eta_seconds=round(eta, 1),
                           message=f"epoch {loop.epoch}/{loop.epochs} done")


def mean_or(values, default: float) -> float:
    """The mean of ``values``, or ``default`` when there are none."""
    return float(np.mean(values)) if values else default


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or None when it is missing or not finite."""
    return None if value is None or not math.isfinite(value) else float(value)


def fmt(value: float | None) -> str:
    """A metric to 4 decimals, or n/a."""
    return "n/a" if value is None else f"{value:.4f}"
