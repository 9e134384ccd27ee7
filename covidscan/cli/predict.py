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
    parser.add_argument("--model", required=True, help="path of a model bundle")
    parser.add_argument("--cam", choices=("gradcam", "gradcam++"), help="also write a CAM overlay PNG per file")
    parser.add_argument("--out", default="cams", help="folder for CAM overlays (default: ./cams)")
    parser.add_argument("--target-class", help="class to explain (default: the predicted one)")
    parser.add_argument("--window", choices=[*WINDOW_PRESETS, FILE_WINDOW],
                        help="DICOM display window (default: the model card's for CT)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.errors import CovidscanError
    from covidscan.predictor import Predictor

    predictor = Predictor(args.model, device=args.device)
    out_dir = Path(args.out)
    failures = 0
    for index, file in enumerate(args.files):
        try:
            record = {"file": file, **_predict_file(predictor, file, index, args, out_dir)}
        except CovidscanError as exc:
            failures += 1
            record = {"file": file, "error": str(exc)}
        _emit(record, args.json)
    return 1 if failures else 0


def _predict_file(predictor, file: str, index: int, args, out_dir: Path) -> dict:
    image = predictor.load(file, window=args.window)
    if not args.cam:
        return {**predictor.predict_one(image).to_dict(), "cam": None}
    prediction, explanation = predictor.explain(image, method=args.cam, target_class=args.target_class)
    out_dir.mkdir(parents=True, exist_ok=True)
    cam_path = out_dir / f"{index:04d}_{_safe_stem(file)}_{args.cam.replace('++', 'pp')}.png"
    _write_png(cam_path, explanation.overlay)
    return {**prediction.to_dict(), "cam": str(cam_path)}


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
        if record["ood"]["flagged"]:
            extra = f"\n  NOT ASSESSED: {record['ood']['reason']}" + extra
        if record.get("uncertainty") is not None:
            extra += f"\n  uncertainty: {record['uncertainty']:.2f}" + (" (uncertain)" if record.get("uncertain") else "")
        cam = f"\n  CAM: {record['cam']}" if record["cam"] else ""
        print(f"{record['file']}: {record['label']} ({probs}){extra}{cam}", flush=True)
