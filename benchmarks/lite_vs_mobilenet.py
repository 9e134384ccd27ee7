"""EfficientNet-Lite0 vs MobileNetV2, one run: CPU forward time per image at 224 px and float16 bundle size.

Prints per architecture the median seconds per image over ``--repeats`` timed batches (after warm-up
batches; both models timed alternately, so machine load hits them alike), the ratio Lite0 / MobileNetV2,
and the size of a float16 bundle of one 2-class member of each (its ``model.safetensors``).

    PYTHONPATH=$PWD python3 benchmarks/lite_vs_mobilenet.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from covidscan.bundle import WEIGHTS_FILE, ModelCard, save_bundle
from covidscan.models import create_model

ARCHITECTURES = ("efficientnet_lite0", "mobilenet_v2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10, help="timed batches per architecture")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (keep it low on a shared machine)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: create_model(name, 2).eval() for name in ARCHITECTURES}
    batch = torch.randn(args.batch_size, 3, 224, 224)
    times: dict[str, list[float]] = {name: [] for name in ARCHITECTURES}
    with torch.inference_mode():
        for step in range(args.warmup + args.repeats):
            for name, model in models.items():  # alternate, so load changes hit both
                start = time.perf_counter()
                model(batch)
                if step >= args.warmup:
                    times[name].append((time.perf_counter() - start) / args.batch_size)
    figures: dict = {"threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models.items():
            card = ModelCard.for_architecture(name, name, ["COVID", "NonCOVID"], "CT", weights_dtype="float16")
            path = save_bundle(model, card, Path(folder) / name)
            figures[name] = {"seconds_per_image": statistics.median(times[name]),
                             "float16_bundle_bytes": (path / WEIGHTS_FILE).stat().st_size}
    ratio = figures["efficientnet_lite0"]["seconds_per_image"] / figures["mobilenet_v2"]["seconds_per_image"]
    figures["lite0_over_mobilenet_v2_time"] = ratio
    for name in ARCHITECTURES:
        print(f"{name:20} {figures[name]['seconds_per_image'] * 1000:7.1f} ms/image   "
              f"float16 bundle {figures[name]['float16_bundle_bytes'] / 1e6:5.2f} MB")
    print(f"forward time ratio efficientnet_lite0 / mobilenet_v2: {ratio:.2f} "
          f"(224 px, batch {args.batch_size}, {args.threads} thread(s), median of {args.repeats})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
