"""End-to-end tests of `covidscan predict` and `covidscan models` in a real subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from synthetic import PHI, ct_dicom_bytes, encode, gradient_image, tiny_bundle


def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "covidscan", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    good = folder / "good.png"
    good.write_bytes(encode(gradient_image(128, 96), "PNG"))
    bad = folder / "notes.png"
    bad.write_bytes(b"this is a text file pretending to be a PNG" * 10)
    dicom = folder / "slice.dcm"
    dicom.write_bytes(ct_dicom_bytes())
    bundle = tiny_bundle(folder / "bundle")
    return {"good": good, "bad": bad, "dicom": dicom, "missing": folder / "missing.jpg", "bundle": bundle}


def test_predict_json_lines_in_order_and_carries_on_past_bad_files(inputs, tmp_path):
    files = [inputs["good"], inputs["bad"], inputs["missing"], inputs["dicom"]]
    result = run_cli("predict", "--model", inputs["bundle"], "--cam", "gradcam", "--out", tmp_path / "cams",
                     "--json", *files)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in records] == [str(f) for f in files]
    good, bad, missing, dicom = records
    assert set(good) == {"file", "label", "probabilities", "warnings", "ood", "uncertainty", "uncertain", "cam",
                         "cam_method", "cam_faithfulness", "cam_in_lungs"}
    assert good["cam_method"] == "gradcam" and good["cam_faithfulness"] is None
    assert good["ood"]["reason"] == "this model has no input gate" and 0 <= good["uncertainty"] <= 1
    assert good["label"] in ("COVID", "NonCOVID") and abs(sum(good["probabilities"].values()) - 1) < 1e-5
    assert set(bad) == {"file", "error"} and "not an image or DICOM file" in bad["error"]
    assert "File not found" in missing["error"]
    assert dicom["label"] in ("COVID", "NonCOVID")
    for record in (good, dicom):
        with Image.open(record["cam"]) as overlay:
            assert overlay.mode == "RGB"
    with Image.open(good["cam"]) as overlay:
        assert overlay.size == (128, 96)  # the original image's size, not the model's
    for value in PHI.values():
        assert value not in result.stdout


def test_predict_exit_zero_when_all_succeed_and_no_cam_files(inputs, tmp_path):
    result = run_cli("predict", "--model", inputs["bundle"], "--json", inputs["good"], inputs["dicom"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(r["cam"] is None for r in records)
    assert list(tmp_path.iterdir()) == []  # nothing written unless asked


def test_predict_gradcam_plus_plus_and_target_class(inputs, tmp_path):
    result = run_cli("predict", "--model", inputs["bundle"], "--cam", "gradcam++", "--target-class", "COVID",
                     "--out", tmp_path, "--json", inputs["good"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cam"].endswith("gradcampp.png")


def test_human_readable_output(inputs):
    result = run_cli("predict", "--model", inputs["bundle"], inputs["good"], inputs["bad"])
    assert result.returncode == 1
    assert "good.png: " in result.stdout and "notes.png: ERROR" in result.stdout


def test_bad_model_path_is_one_clear_line(inputs, tmp_path):
    result = run_cli("predict", "--model", tmp_path / "nope", "--json", inputs["good"])
    assert result.returncode == 2
    assert result.stderr.strip().startswith("covidscan: error: No model bundle at")
    assert "Traceback" not in result.stderr


def test_models_json_lists_shipped_bundles(tmp_path):
    tiny_bundle(tmp_path / "ct-tiny")
    tiny_bundle(tmp_path / "xray-tiny", classes=("COVID", "Normal", "Viral Pneumonia"), modality="X-ray")
    (tmp_path / "junk").mkdir()
    result = run_cli("models", "--json", env={"COVIDSCAN_WEIGHTS_DIR": str(tmp_path), "COVIDSCAN_STATE_DIR": str(tmp_path / "state"),
                                              "COVIDSCAN_RUNS_DIR": str(tmp_path / "runs")})
    assert result.returncode == 0, result.stderr
    models = json.loads(result.stdout)
    assert [m["name"] for m in models] == ["ct-tiny", "xray-tiny"]
    assert models[1]["modality"] == "X-ray" and models[1]["classes"] == ["COVID", "Normal", "Viral Pneumonia"]
    for model in models:
        assert {"name", "path", "modality", "classes", "architecture", "input_size", "metrics"} <= set(model)
        assert model["source"] == "shipped"
        assert run_cli("predict", "--model", model["path"], "--json", str(tmp_path / "none.png")).returncode == 1
