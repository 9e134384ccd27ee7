"""``covidscan predict``: classify files, one JSON line per input, carrying on past bad files.

A folder (searched recursively) or a .zip archive stands for the images inside it (covidscan.batch:
read in memory, with limits on count, size and depth).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from covidscan.cams import CAM_METHODS, COLORMAPS
from covidscan.images import FILE_WINDOW, WINDOW_PRESETS


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="classify image or DICOM files")
    parser.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                        help="a model name from `covidscan models`, or a bundle folder")
    parser.add_argument("--cam", choices=list(CAM_METHODS), metavar="METHOD",
                        help="also write a CAM overlay PNG per file; METHOD is one of: " + ", ".join(
                            f"{key} ({method.cost})" for key, method in CAM_METHODS.items()))
    parser.add_argument("--colormap", choices=list(COLORMAPS), default="jet",
                        help="overlay colours (viridis and cividis are colour-blind safe; default: jet)")
    parser.add_argument("--lung-outline", action="store_true", help="draw the automatic lung mask's outline (CT)")
    parser.add_argument("--faithfulness", action="store_true",
                        help="score each CAM with ROAD (cam_faithfulness; a few seconds per image on a CPU)")
    parser.add_argument("--csv", metavar="FILE", help="also write the batch's results as CSV")
    parser.add_argument("--out", default="cams", help="folder for CAM overlays (default: ./cams)")
    parser.add_argument("--target-class", help="class to explain (default: the predicted one)")
    parser.add_argument("--window", choices=[*WINDOW_PRESETS, FILE_WINDOW],
                        help="DICOM display window (default: the model card's for CT)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--engine", choices=("auto", "onnx", "torch"), default="auto",
                        help="forward pass without --cam: ONNX Runtime (auto: when its cached export checks out) or torch")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("files", nargs="+", metavar="FILE", help="image or DICOM files, folders, or .zip archives")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.batch import expand_inputs
    from covidscan.catalog import model_path
    from covidscan.errors import CovidscanError
    from covidscan.predictor import Predictor
    from covidscan.records import PREDICT_BATCH, error_record, predict_inputs, prediction_record
    from covidscan.report import CaseOutcome

    # Grad-CAM needs torch's gradients; without it the forward pass runs on ONNX Runtime (no torch import).
    predictor = Predictor(model_path(args.model), device=args.device, engine="torch" if args.cam else args.engine)
    out_dir = Path(args.out)
    failures = 0
    outcomes = []
    items = list(expand_inputs(args.files))  # folders and .zip archives become their images (read in memory)
    if not args.cam:  # no gradients: classify in batches (one forward pass per batch)
        for start in range(0, len(items), PREDICT_BATCH):
            chunk = items[start:start + PREDICT_BATCH]
            readable = [(item.name, item.data if item.data is not None else item.name) for item in chunk
                        if item.error is None]
            predicted = iter(predict_inputs(predictor, readable, window=args.window))
            for item in chunk:
                name, prediction, error = (item.name, None, item.error) if item.error is not None else next(predicted)
                record = prediction_record(name, prediction) if prediction is not None else {"file": name, "error": error}
                failures += "error" in record
                outcomes.append(CaseOutcome(name, prediction, error))
                _emit(record, args.json)
    explained = items if args.cam else []  # with --cam: one image at a time, each with its CAM
    for index, item in enumerate(explained):
        prediction = None
        try:
            if item.error is not None:
                raise CovidscanError(item.error)
            prediction, record = _explain_file(predictor, item.data if item.data is not None else item.name,
                                               item.name, index, args, out_dir)
        except CovidscanError as exc:
            failures += 1
            record = error_record(item.name, exc)
        outcomes.append(CaseOutcome(item.name, prediction, record.get("error"), cam_method=record.get("cam_method"),
                                    cam_in_lungs=record.get("cam_in_lungs"),
                                    cam_faithfulness=(record.get("cam_faithfulness") or {}).get("score")))
        _emit(record, args.json)
    if args.csv:
        from covidscan.report import results_csv

        Path(args.csv).write_bytes(results_csv(outcomes, predictor.classes, model_name=predictor.card.name,
                                               modality=predictor.card.modality))
    return 1 if failures else 0


def _explain_file(predictor, source, file: str, index: int, args, out_dir: Path):
    """The prediction and the record of one explained input (``source``: a path or the bytes read)."""
    from covidscan.records import prediction_record

    image = predictor.load(source, window=args.window)
    prediction, explanation = predictor.explain(image, method=args.cam, target_class=args.target_class,
                                                faithfulness=args.faithfulness, colormap=args.colormap,
                                                lung_outline=args.lung_outline)
    prediction.warnings.extend(explanation.warnings)
    out_dir.mkdir(parents=True, exist_ok=True)
    cam_path = out_dir / f"{index:04d}_{_safe_stem(file)}_{args.cam.replace('++', 'pp')}.png"
    _write_png(cam_path, explanation.overlay)
    return prediction, prediction_record(file, prediction, cam=str(cam_path), explanation=explanation)


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
