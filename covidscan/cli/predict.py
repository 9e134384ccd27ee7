"""``covidscan predict``: classify files, one JSON line per input, carrying on past bad files."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from covidscan.images import FILE_WINDOW, WINDOW_PRESETS


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="classify image or DICOM files")
    parser.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                        help="a model name from `covidscan models`, or a bundle folder")
    parser.add_argument("--cam", choices=("gradcam", "gradcam++"), help="also write a CAM overlay PNG per file")
    parser.add_argument("--out", default="cams", help="folder for CAM overlays (default: ./cams)")
    parser.add_argument("--target-class", help="class to explain (default: the predicted one)")
    parser.add_argument("--window", choices=[*WINDOW_PRESETS, FILE_WINDOW],
                        help="DICOM display window (default: the model card's for CT)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--engine", choices=("auto", "onnx", "torch"), default="auto",
                        help="forward pass without --cam: ONNX Runtime (auto: when its cached export checks out) or torch")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.catalog import model_path
    from covidscan.errors import CovidscanError
    from covidscan.predictor import Predictor
    from covidscan.records import PREDICT_BATCH, error_record, predict_records

    # Grad-CAM needs torch's gradients; without it the forward pass runs on ONNX Runtime (no torch import).
    predictor = Predictor(model_path(args.model), device=args.device, engine="torch" if args.cam else args.engine)
    out_dir = Path(args.out)
    failures = 0
    if not args.cam:  # no gradients: classify in batches (one forward pass per batch)
        for start in range(0, len(args.files), PREDICT_BATCH):
            chunk = args.files[start:start + PREDICT_BATCH]
            for record in predict_records(predictor, [(file, file) for file in chunk], window=args.window):
                failures += "error" in record
                _emit(record, args.json)
        return 1 if failures else 0
    for index, file in enumerate(args.files):
        try:
            record = _explain_file(predictor, file, index, args, out_dir)
        except CovidscanError as exc:
            failures += 1
            record = error_record(file, exc)
        _emit(record, args.json)
    return 1 if failures else 0


def _explain_file(predictor, file: str, index: int, args, out_dir: Path) -> dict:
    from covidscan.records import prediction_record

    image = predictor.load(file, window=args.window)
    prediction, explanation = predictor.explain(image, method=args.cam, target_class=args.target_class)
    out_dir.mkdir(parents=True, exist_ok=True)
    cam_path = out_dir / f"{index:04d}_{_safe_stem(file)}_{args.cam.replace('++', 'pp')}.png"
    _write_png(cam_path, explanation.overlay)
    return prediction_record(file, prediction, cam=str(cam_path))


def _safe_stem(file: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(file).stem)[:80] or "image"


def _write_png(path: Path, rgb) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


def _emit(record: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record), flush=True)
    elif "error" in record:
        print(f"{record['file']}: ERROR {record['error']}", file=sys.stdout, flush=True)
    else:
        probs = ", ".join(f"{k} {v:.3f}" for k, v in record["probabilities"].items())
        extra = "".join(f"\n  warning: {w}" for w in record["warnings"])
        cam = f"\n  CAM: {record['cam']}" if record["cam"] else ""
        print(f"{record['file']}: {record['label']} ({probs}){extra}{cam}", flush=True)
