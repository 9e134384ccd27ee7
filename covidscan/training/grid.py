"""Grid search: one training run per (lr, architecture, image size), ranked by the monitored metric."""
from __future__ import annotations

import copy
import csv
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from covidscan.training.config import TrainConfig
from covidscan.training.trainer import train
from covidscan.utils import log, sigterm_stops


def grid_search(base: TrainConfig, out_dir: str | os.PathLike, lrs: Sequence[float], archs: Sequence[str],
                image_sizes: Sequence[int], stop_event: threading.Event | None = None) -> list[dict]:
    """Train every (lr, arch, size) combination into ``out_dir/<run>`` and rank them by the monitor.

    One stop event covers the whole grid: SIGTERM (in the main thread) or setting ``stop_event``
    cancels the current run, and no later run starts.

    Returns:
        One dict per run (run, arch, lr, image_size, best_metric, best_epoch, state), best first;
        also written as ``out_dir/grid.csv``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with sigterm_stops(stop_event or threading.Event()) as stop_event:
        for arch in archs:
            for size in image_sizes:
                for lr in lrs:
                    if stop_event.is_set():
                        break
                    config = copy.deepcopy(base)
                    config.arch, config.lr, config.image_size, config.progressive_resize = arch, float(lr), int(size), None
                    name = f"{arch}-{size}px-lr{lr:g}"
                    log(f"Grid run {name}")
                    result = train(config, out_dir / name, stop_event=stop_event)
                    rows.append({"run": name, "arch": arch, "lr": float(lr), "image_size": int(size),
                                 "best_metric": result.best_metric, "best_epoch": result.best_epoch,
                                 "state": result.state})
    if stop_event.is_set():
        log("Grid search cancelled: the remaining runs were not started.")
    rows.sort(key=lambda r: -math.inf if r["best_metric"] is None else r["best_metric"], reverse=True)
    with open(out_dir / "grid.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["run"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
