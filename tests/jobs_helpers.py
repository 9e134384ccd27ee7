"""Shared pieces of the job runner and training tests: a tiny dataset, real `covidscan train`
arguments, and a run directory's metrics.csv read as raw text."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_dataset(root: Path, per_class: int = 8, size: int = 64) -> Path:
    """Two classes of noisy grey PNGs (dark "Covid", bright "Normal"), one folder per class."""
    rng = np.random.default_rng(0)
    for name, mean in (("Covid", 70), ("Normal", 180)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = np.clip(rng.normal(mean, 25, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name.lower()}_{index}.png")
    return root


def metrics_csv(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/metrics.csv`` as written (strings), independent of the package's parser."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def train_args(data: Path, epochs: int = 1) -> list[str]:
    """A real, small `covidscan train` command line (the runner adds --out)."""
    return ["--dataset", "folder", "--modality", "X-ray", "--root", str(data), "--arch", "tiny_cnn", "--epochs", str(epochs),
            "--image-size", "64", "--batch-size", "4"]


def wait_until(predicate, timeout: float, poll: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def assert_usable_bundle(model_dir: Path, image: Path) -> None:
    """The bundle loads and predicts a probability for every class of the dataset."""
    from covidscan.predictor import Predictor

    predictor = Predictor(model_dir)
    assert predictor.classes == ["Covid", "Normal"]
    prediction = predictor.predict_one(image)
    assert set(prediction.probabilities) == {"Covid", "Normal"}
    assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-4
