"""How well the input gate knows when not to answer, per category of foreign input.

For each shipped model (or ``--bundle``): the in-distribution pass rate on its own validation split,
then per category of out-of-distribution input the gate's AUROC (val images vs that category, by
gate score) and the share flagged (by the gate alone, and overall: gate or wrong DICOM modality).
Categories come from public offline sources only, never from a held-back test split:

- the other modality's images from ../shared/data (train + val; no test split is there),
- non-chest DICOMs bundled with pydicom (MR, US, NM, OT, ... test files that ship offline),
- natural photographs bundled with scikit-learn and matplotlib (random crops, colour and grayscale),
- documents rendered with PIL (text on paper), and noise images.

Also the selective-prediction summary on val (accuracy of the most certain images).

    python benchmarks/gate.py [--per-category 40] [--bundle weights/ct-covid-mobilenet_v2]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))

from gate_corpus import (document_images, natural_images, noise_images, other_modality_files,  # noqa: E402
                         pydicom_test_files)

VALIDATION = {
    "CT": ("covid-ct", SHARED / "covid-ct", {}),
    "X-ray": ("folder", SHARED / "covid19-image-dataset-3class", {"val_fraction": 0.2, "seed": 0}),
}


def _auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))], np.r_[in_scores, out_scores]))


def _predict_all(predictor, sources) -> list:
    from covidscan.errors import CovidscanError

    out = []
    for start in range(0, len(sources), 16):
        chunk = []
        for source in sources[start:start + 16]:
            try:
                chunk.append(predictor.load(source))
            except CovidscanError:
                continue
        out.extend(predictor.predict(chunk) if chunk else [])
    return out


def measure(bundle_path: Path, per_category: int) -> None:
    from covidscan.datasets import open_dataset
    from covidscan.gate import selective_sentence
    from covidscan.predictor import Predictor

    predictor = Predictor(bundle_path)
    card = predictor.card
    if predictor.bundle.gate is None:
        print(f"{card.name}: no input gate (run `covidscan gate fit`)")
        return
    kind, root, options = VALIDATION[card.modality]
    val = open_dataset(kind, root, split="val", **options)
    val_predictions = _predict_all(predictor, [item.path for item in val.items])
    val_scores = np.array([p.ood["score"] for p in val_predictions])
    print(f"\n{card.name} ({card.architecture_label}, {card.modality}); gate threshold {predictor.bundle.gate.threshold:.3f}")
    seen = " (seen in training by a cross-validated model)" if card.metrics.get("estimate") else ""
    print(f"  in-distribution {card.modality} val{seen}: {len(val_scores)} images, "
          f"{np.mean([not p.flagged for p in val_predictions]):.1%} pass")
    print(f"  calibration ({card.gate.get('fit', {}).get('threshold_split', 'val')} images): "
          f"{card.gate['calibration_pass_rate']:.1%} of {card.gate['n_calibration']} pass")
    categories = {
        "other modality": [Path(p) for p in other_modality_files(SHARED, card.modality, per_category)],
        "non-chest DICOM": [Path(p) for p in pydicom_test_files(exclude_modality=None)],
        "photo (colour)": natural_images(per_category, grayscale=False),
        "photo (grayscale)": natural_images(per_category, grayscale=True, seed=1),
        "document": document_images(per_category),
        "noise": noise_images(per_category),
    }
    print(f"  {'category':<20} {'n':>4} {'AUROC':>7} {'gate flags':>11} {'flagged':>8}")
    for name, sources in categories.items():
        predictions = _predict_all(predictor, sources)
        if not predictions:
            print(f"  {name:<20} {0:>4}    (no inputs available)")
            continue
        scores = np.array([p.ood["score"] for p in predictions])
        gate_flags = float((scores > predictor.bundle.gate.threshold).mean())
        flagged = float(np.mean([p.flagged for p in predictions]))
        print(f"  {name:<20} {len(scores):>4} {_auroc(val_scores, scores):>7.3f} {gate_flags:>11.1%} {flagged:>8.1%}")
    uncertainty = card.gate.get("uncertainty", {})
    selective = uncertainty.get("selective")
    if selective:
        pairs = ", ".join(f"{c:.0%}: {a:.3f}" for c, a in zip(selective["coverage"], selective["accuracy"]))
        print(f"  selective prediction on {uncertainty.get('measured_on', 'val')} (coverage: accuracy): {pairs}")
        print(f"  {uncertainty.get('summary') or selective_sentence(selective)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", help="bundle(s) to measure (default: the shipped ones)")
    parser.add_argument("--per-category", type=int, default=40, help="images per generated category")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    bundles = [Path(b) for b in args.bundle] if args.bundle else sorted((REPO / "weights").iterdir())
    for bundle in bundles:
        measure(bundle, args.per_category)


if __name__ == "__main__":
    main()
