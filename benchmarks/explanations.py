"""Explanation figures for the shipped CT model on COVID-CT val, from one run.

Prints: the mean share of the Grad-CAM map inside the automatic lung mask over the whole val split
(and how many slices fall under 0.5), then per CAM method the seconds per image, the ROAD
faithfulness score and the share inside the lungs, on the first ``--subset`` val images (the
one-forward-per-channel methods, ScoreCAM and AblationCAM, on the first ``--slow-subset``: on a CPU
one such map of the 3-member ensemble takes minutes).

    PYTHONPATH=$PWD python3 benchmarks/explanations.py --root ../shared/data/covid-ct
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from covidscan.cams import CAM_METHODS
from covidscan.datasets import open_dataset
from covidscan.predictor import Predictor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="weights/ct-covid-mobilenet_v2")
    parser.add_argument("--root", default="../shared/data/covid-ct")
    parser.add_argument("--lungs-subset", type=int, help="val images for the Grad-CAM share (default: all)")
    parser.add_argument("--subset", type=int, default=20, help="val images per fast method")
    parser.add_argument("--slow-subset", type=int, default=2, help="val images for ScoreCAM and AblationCAM")
    parser.add_argument("--methods", default=",".join(CAM_METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not os.path.isdir(args.root):
        print(f"No dataset at {args.root}; nothing to measure.")
        return 0
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    predictor = Predictor(args.model, device=args.device)
    data = open_dataset("covid-ct", args.root, split="val")
    items = data.items[:args.lungs_subset] if args.lungs_subset else data.items
    # Every other slice when subsetting, so both classes (listed COVID first) are in the subset.
    if args.lungs_subset:
        step = max(1, len(data.items) // args.lungs_subset)
        items = data.items[::step][:args.lungs_subset]
    images = [predictor.load(str(item.path)) for item in items]
    print(f"{predictor.card.name} on COVID-CT val: {len(images)} of {len(data.items)} slices, device {args.device}, "
          f"{torch.get_num_threads()} threads", flush=True)

    # 1. Grad-CAM inside the lungs over the whole split (no ROAD: the share is what is measured).
    started = time.perf_counter()
    shares = []
    for image in images:
        _, explanation = predictor.explain(image, method="gradcam")
        shares.append(explanation.in_lungs)
    elapsed = time.perf_counter() - started
    found = [s for s in shares if s is not None]
    figures: dict = {"n_val": len(images), "gradcam_in_lungs": {
        "mean": float(np.mean(found)) if found else None, "median": float(np.median(found)) if found else None,
        "slices_with_a_lung_mask": len(found), "slices_under_0_5": int(sum(s < 0.5 for s in found)),
        "seconds_per_image_with_mask": elapsed / len(images)}}
    g = figures["gradcam_in_lungs"]
    print(f"Grad-CAM inside the lungs: mean {g['mean']:.3f}, median {g['median']:.3f} over {len(found)} slices "
          f"with a lung mask ({len(images) - len(found)} without); {g['slices_under_0_5']} slices under 0.5; "
          f"{g['seconds_per_image_with_mask']:.2f} s/image (CAM + mask)", flush=True)

    # 2. Each method: time per map, ROAD and the share inside the lungs on a subset.
    figures["methods"] = {}
    print(f"\n{'method':12s} {'n':>3s} {'s/map':>8s} {'ROAD':>8s} {'top20 drop':>11s} {'in lungs':>9s} {'ROAD s':>7s}")
    for key in args.methods.split(","):
        spec = CAM_METHODS[key]
        count = args.slow_subset if spec.slow else args.subset
        subset = images[:count]
        map_seconds, road, drops, inside, road_seconds = [], [], [], [], []
        for image in subset:
            started = time.perf_counter()
            _, explanation = predictor.explain(image, method=key)
            map_seconds.append(time.perf_counter() - started)
            result = predictor.faithfulness(image, explanation.heatmap, explanation.target_class)
            road.append(result["score"])
            drops.append(result["top20_drop"])
            road_seconds.append(result["seconds"])
            if explanation.in_lungs is not None:
                inside.append(explanation.in_lungs)
        row = {"n": len(subset), "seconds_per_map": float(np.mean(map_seconds)), "road": float(np.mean(road)),
               "top20_drop": float(np.mean(drops)), "in_lungs": float(np.mean(inside)) if inside else None,
               "road_seconds": float(np.mean(road_seconds))}
        figures["methods"][key] = row
        print(f"{key:12s} {row['n']:3d} {row['seconds_per_map']:8.2f} {row['road']:+8.4f} {row['top20_drop']:+11.4f} "
              f"{row['in_lungs'] if row['in_lungs'] is not None else float('nan'):9.3f} {row['road_seconds']:7.2f}",
              flush=True)
    fast = figures["methods"].get("gradcam")
    if fast:
        for key, row in figures["methods"].items():
            print(f"  {key}: {row['seconds_per_map'] / fast['seconds_per_map']:.1f}x Grad-CAM's time per map")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
