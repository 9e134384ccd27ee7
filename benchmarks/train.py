"""Training throughput: covidscan's loop vs a bare PyTorch loop over pre-decoded tensors.

Both train the same architecture (same initialisation, batch size, image size, optimiser and number
of steps); the bare loop reads images that are already decoded, resized and normalised, so the
ratio ours/bare shows whether our data pipeline (decode once, cache uint8, augment per sample)
slows training down. Target: >= 0.9.

    python benchmarks/train.py                       # synthetic images, tiny_cnn at 64 px
    python benchmarks/train.py --arch mobilenet_v2 --image-size 224 --dataset covid-ct --root DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from covidscan.models import create_model, get_spec
from covidscan.training import TrainConfig, resolve_device, train


def synthetic_folder(root: Path, per_class: int, size: int) -> Path:
    """Two classes of noisy PNGs (bright vs dark square) at ``size`` x ``size`` pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(("COVID", "Normal")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size, size), dtype=np.uint8)
            pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 220 - 150 * k
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def bare_loop(arch: str, num_classes: int, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
              steps: int, lr: float, device: torch.device, seed: int) -> float:
    """Images/second of a plain loop over pre-normalised float tensors (shuffled like ours)."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    images, labels = images.to(device), labels.to(device)
    done, seen = 0, 0
    start = time.perf_counter()
    while done < steps:
        order = torch.randperm(len(labels), device=device)
        for first in range(0, len(labels) - batch_size + 1, batch_size):
            index = order[first:first + batch_size]
            loss = criterion(model(images[index]), labels[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            seen += len(index)
            done += 1
            if done >= steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny_cnn")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--augment", default="light", choices=("none", "light", "strong"))
    parser.add_argument("--dataset", default="folder")
    parser.add_argument("--root", help="dataset folder (default: 2 x 160 synthetic images)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else synthetic_folder(Path(tmp) / "data", 160, args.image_size + 16)
        config = TrainConfig(dataset=args.dataset, root=str(root), arch=args.arch, epochs=args.epochs,
                             image_size=args.image_size, batch_size=args.batch_size, augment=args.augment,
                             device=args.device, modality="X-ray", window=None, calibrate=False, schedule="constant")
        result = train(config, Path(tmp) / "run")
        # Skip the first epoch (warm-up) when there are more; count training time only (not validation).
        rows = result.history[1:] if len(result.history) > 1 else result.history
        ours = sum(r["train_images"] for r in rows) / sum(r["train_seconds"] for r in rows)
        steps = sum(r["train_images"] for r in rows) // args.batch_size

        from covidscan.datasets import open_dataset
        from covidscan.evaluation import load_split_images
        from covidscan.transforms import normalize

        data = open_dataset(args.dataset, root, "train")
        spec = get_spec(args.arch)
        pixels = normalize(load_split_images(data, args.image_size), spec.mean, spec.std)
        labels = torch.as_tensor(data.labels())
        device = resolve_device(args.device)
        bare_loop(args.arch, len(data.classes), pixels, labels, args.batch_size, 2, 1e-3, device, 0)  # warm-up
        bare = bare_loop(args.arch, len(data.classes), pixels, labels, args.batch_size, steps, 1e-3, device, 0)
    report = {"arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size, "augment": args.augment,
              "device": str(device), "ours_images_per_s": round(ours, 1), "bare_images_per_s": round(bare, 1),
              "ratio": round(ours / bare, 3), "epoch_seconds": [r["seconds"] for r in result.history]}
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
