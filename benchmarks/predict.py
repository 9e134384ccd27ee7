"""Predict latency vs the bare model forward pass, on CPU, for the default architecture.

Prints per-image latencies (median of interleaved repetitions, so machine noise hits both sides
alike) and the ratios the core issue targets: predict <= 1.5x forward, predict + Grad-CAM <= 3x,
and predict on ONNX Runtime (decode, preprocess, forward) <= 0.4x the bare torch forward.

    python benchmarks/predict.py [--arch mobilenet_v2] [--repeats 30] [--size 512]
    python benchmarks/predict.py --bundle weights/ct-covid-mobilenet_v2   # e.g. the shipped ensemble

With a gated bundle it also prints predict with / without the input gate (target <= 1.10), on the
torch and on the ONNX path: the "without" side is a copy of the bundle whose card has no gate, loaded
as a model of its own, so it neither hooks the gate's layers nor exports their features.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from covidscan.bundle import ModelCard, save_bundle
from covidscan.gate import GATE_FILE
from covidscan.models import DEFAULT_ARCHITECTURE, create_model
from covidscan.predictor import Predictor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic import encode, gradient_image  # noqa: E402


def ungated_copy(bundle_dir: Path, folder: Path) -> Path:
    """A copy of the bundle without its input gate (card field and file; no cached ONNX export)."""
    copy = folder / "ungated"
    shutil.copytree(bundle_dir, copy, ignore=shutil.ignore_patterns(".engine", GATE_FILE))
    card = json.loads((copy / "card.json").read_text())
    card.pop("gate", None)
    (copy / "card.json").write_text(json.dumps(card))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=DEFAULT_ARCHITECTURE)
    parser.add_argument("--bundle", help="measure this bundle (e.g. an ensemble) instead of a fresh --arch model")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--size", type=int, default=512, help="side of the PNG given to predict")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        if args.bundle:
            path = Path(args.bundle)
        else:
            card = ModelCard.for_architecture("bench", args.arch, ["COVID", "NonCOVID"], "CT")
            path = save_bundle(create_model(args.arch, 2).eval(), card, Path(folder) / "b")
        predictor = Predictor(path)
        onnx_predictor = Predictor(path, engine="onnx")
        ungated_path = ungated_copy(path, Path(folder))
        ungated, onnx_ungated = Predictor(ungated_path), Predictor(ungated_path, engine="onnx")
        measure(args, predictor, onnx_predictor, ungated, onnx_ungated)


def measure(args, predictor: Predictor, onnx_predictor: Predictor, ungated: Predictor, onnx_ungated: Predictor) -> None:
    card = predictor.card
    png = encode(gradient_image(args.size, args.size), "PNG")
    x = torch.randn(1, 3, card.input_size, card.input_size)
    model = predictor.model

    def forward():
        with torch.inference_mode():
            model(x)

    onnx_name = f"predict ({onnx_predictor.engine.name})"
    # Steps of one engine run back to back: an engine's idle worker threads keep spinning for a while
    # after a call (ONNX Runtime's and OpenMP's default), which slows whatever runs next on other
    # threads. Each gated/ungated pair swaps its order every repeat, so neither side always follows the other.
    steps = {
        "forward": forward,
        "predict": lambda: predictor.predict_one(png),
        "predict (no gate)": lambda: ungated.predict_one(png),
        "predict+gradcam": lambda: predictor.explain(png, method="gradcam"),
        "predict+gradcam++": lambda: predictor.explain(png, method="gradcam++"),
        onnx_name: lambda: onnx_predictor.predict_one(png),
        f"{onnx_name[:-1]}, no gate)": lambda: onnx_ungated.predict_one(png),
    }
    pairs = [("predict", "predict (no gate)"), (onnx_name, f"{onnx_name[:-1]}, no gate)")]
    for step in steps.values():  # warm-up: allocator, lazy imports, oneDNN kernels
        step(), step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.repeats):
        order = list(steps)
        for first, second in pairs if repeat % 2 else ():
            i, j = order.index(first), order.index(second)
            order[i], order[j] = second, first
        for name in order:
            step = steps[name]
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) * 1000 for name, values in times.items()}
    print(f"architecture {card.architecture_label}, input {card.input_size}px, PNG {args.size}x{args.size}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats (median ms per image)")
    for name, value in median.items():
        ratio = value / median["forward"]
        print(f"  {name:18s} {value:8.1f} ms   ratio to bare forward {ratio:5.2f}x")
    print(f"predict/forward = {median['predict'] / median['forward']:.2f} (target <= 1.5)")
    gate_note = "" if predictor.bundle.gate is not None else " (this bundle has no gate: both sides ungated)"
    print(f"predict with gate / without (torch) = {median['predict'] / median['predict (no gate)']:.3f} "
          f"(target <= 1.10){gate_note}")
    print(f"predict with gate / without ({onnx_predictor.engine.name}) = "
          f"{median[onnx_name] / median[f'{onnx_name[:-1]}, no gate)']:.3f} (target <= 1.10){gate_note}")
    print(f"predict+gradcam/forward = {median['predict+gradcam'] / median['forward']:.2f} (target <= 3.0)")
    print(f"{onnx_name}/forward = {median[onnx_name] / median['forward']:.2f} (target <= 0.4)")


if __name__ == "__main__":
    np.random.seed(0)
    main()
