"""EfficientNet-Lite0 vs MobileNetV2, one run: CPU forward time per image at 224 px and float16 bundle size.

Prints per architecture the median seconds per image over ``--repeats`` timed batches (after warm-up
batches; both models timed alternately, so machine load hits them alike) in torch and, with
``--onnx``, in ONNX Runtime (the app's inference engine), the ratios Lite0 / MobileNetV2, and the size
of a float16 bundle of one 2-class member of each (its ``model.safetensors``).

    PYTHONPATH=$PWD python3 benchmarks/lite_vs_mobilenet.py --threads 1 --onnx
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
    parser.add_argument("--onnx", action="store_true", help="also time ONNX Runtime sessions of both models")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: create_model(name, 2).eval() for name in ARCHITECTURES}
    batch = torch.randn(args.batch_size, 3, 224, 224)
    times: dict[str, list[float]] = {name: [] for name in ARCHITECTURES}
    with torch.inference_mode():
        runners = {("torch", name): (lambda m=model: m(batch)) for name, model in models.items()}
    with tempfile.TemporaryDirectory() as folder:
        if args.onnx:
            runners.update({("onnx", name): onnx_runner(model, Path(folder) / f"{name}.onnx", batch, args.threads)
                            for name, model in models.items()})
        times = {key: [] for key in runners}
        with torch.inference_mode():
            for step in range(args.warmup + args.repeats):
                for key, run in runners.items():  # alternate, so load changes hit every model alike
                    start = time.perf_counter()
                    run()
                    if step >= args.warmup:
                        times[key].append((time.perf_counter() - start) / args.batch_size)
        figures: dict = {"threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats}
        for name, model in models.items():
            card = ModelCard.for_architecture(name, name, ["COVID", "NonCOVID"], "CT", weights_dtype="float16")
            path = save_bundle(model, card, Path(folder) / name)
            figures[name] = {f"{engine}_seconds_per_image": statistics.median(times[engine, n])
                             for engine, n in times if n == name}
            figures[name]["float16_bundle_bytes"] = (path / WEIGHTS_FILE).stat().st_size
    for name in ARCHITECTURES:
        speeds = "   ".join(f"{key.split('_')[0]} {value * 1000:6.1f} ms/image"
                            for key, value in figures[name].items() if key.endswith("_seconds_per_image"))
        print(f"{name:20} {speeds}   float16 bundle {figures[name]['float16_bundle_bytes'] / 1e6:5.2f} MB")
    for engine in sorted({engine for engine, _ in times}):
        key = f"{engine}_seconds_per_image"
        ratio = figures["efficientnet_lite0"][key] / figures["mobilenet_v2"][key]
        figures[f"lite0_over_mobilenet_v2_{engine}_time"] = ratio
        print(f"{engine} forward time ratio efficientnet_lite0 / mobilenet_v2: {ratio:.2f} "
              f"(224 px, batch {args.batch_size}, {args.threads} thread(s), median of {args.repeats})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def onnx_runner(model: torch.nn.Module, path: Path, batch: torch.Tensor, threads: int):
    """Export ``model`` (the TorchScript exporter, as covidscan's engine does) and return a call of its session."""
    import onnxruntime

    with torch.no_grad():
        torch.onnx.export(model, (batch,), str(path), input_names=["input"], output_names=["logits"],
                          opset_version=17, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"input": batch.numpy()}
    return lambda: session.run(None, feed)


if __name__ == "__main__":
    raise SystemExit(main())
