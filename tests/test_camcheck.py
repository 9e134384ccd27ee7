"""Tests of the dataset-level shortcut check (`covidscan evaluate --cam-check`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from synthetic import tiny_bundle
from test_lungs import phantom

from covidscan.camcheck import cam_check, outside_overlays
from covidscan.errors import CovidscanError
from covidscan.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    for k, name in enumerate(("COVID", "NonCOVID")):
        (root / name).mkdir()
        for i in range(5):
            Image.fromarray(phantom(size=128, seed=10 * k + i)[0]).save(root / name / f"{name}_{i}.png")
    return root


def test_cam_check_over_a_split_of_ct_phantoms(phantom_folder, tmp_path):
    bundle = tiny_bundle(tmp_path / "ct")
    done = subprocess.run([sys.executable, "-m", "covidscan", "evaluate", "--model", str(bundle), "--dataset",
                           "folder", "--root", str(phantom_folder), "--split", "val", "--cam-check", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    check = report["cam_check"]
    assert check["method"] == "gradcam" and check["n"] == report["n"] and check["n_with_mask"] == check["n"]
    assert 0.0 <= check["mean_in_lungs"] <= 1.0 and check["threshold"] == 0.5
    # The slices listed as outside are exactly those under the threshold, lowest first.
    predictor = Predictor(bundle)
    direct = cam_check(bundle, "folder", phantom_folder, "val", predictor=predictor)
    assert direct["mean_in_lungs"] == pytest.approx(check["mean_in_lungs"], abs=1e-6)
    shares = [row["in_lungs"] for row in direct["outside"]]
    assert shares == sorted(shares) and all(share < 0.5 for share in shares)
    pictures = outside_overlays(predictor, direct, limit=2, max_side=64)
    assert len(pictures) == min(2, len(direct["outside"]))
    assert all(max(picture.shape[:2]) <= 64 and "inside" in caption for caption, picture in pictures)


def test_cam_check_of_an_xray_model_says_why_there_is_no_share(phantom_folder, tmp_path):
    check = cam_check(tiny_bundle(tmp_path / "xray", modality="X-ray"), "folder", phantom_folder, "val")
    assert check["n"] == 0 and check["mean_in_lungs"] is None and "X-ray" in check["note"]
    with pytest.raises(CovidscanError, match="Unknown CAM method"):
        cam_check(tiny_bundle(tmp_path / "ct"), "folder", phantom_folder, "val", method="nope")


def test_run_cam_check_reads_the_runs_dataset(phantom_folder, tmp_path):
    from covidscan.camcheck import run_cam_check

    run = tmp_path / "run"
    tiny_bundle(run / "model")
    (run / "config.json").write_text(json.dumps({"dataset": "folder", "root": str(phantom_folder)}))
    check, predictor = run_cam_check(run, limit=1)
    assert check["n"] == 1 and check["method"] == "gradcam" and predictor.card.modality == "CT"
    (run / "config.json").write_text("{}")
    with pytest.raises(CovidscanError, match="does not say which dataset"):
        run_cam_check(run)
    with pytest.raises(CovidscanError, match="no saved model"):
        run_cam_check(tmp_path / "empty")
