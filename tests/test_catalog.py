"""covidscan.catalog: one list of models (shipped, promoted, finished training runs), lookup by name
or folder, promotion, and the `covidscan models` / `covidscan predict --model NAME` commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import encode, gradient_image, tiny_bundle

from covidscan import catalog
from covidscan.errors import JobError, ModelBundleError
from covidscan.jobs import JobRecord
from covidscan.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]


def finished_run(folder: Path, state: str = "succeeded", **bundle_options) -> Path:
    """A run folder as `covidscan train --out` leaves it: model/ and progress.json."""
    tiny_bundle(folder / "model", **bundle_options)
    (folder / "progress.json").write_text(json.dumps({"state": state}))
    return folder


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty weights, state and runs folders, wired through the environment as the app and CLI read them."""
    folders = {name: tmp_path / name for name in ("weights", "state", "runs")}
    for folder in folders.values():
        folder.mkdir()
    monkeypatch.setenv(catalog.WEIGHTS_ENV, str(folders["weights"]))
    monkeypatch.setenv("COVIDSCAN_STATE_DIR", str(folders["state"]))
    monkeypatch.setenv(catalog.RUNS_ENV, str(folders["runs"]))
    return folders


def test_every_source_is_listed_once_in_picker_order(places, tmp_path):
    tiny_bundle(places["weights"] / "xray-tiny", classes=("COVID", "Normal"), modality="X-ray")
    tiny_bundle(places["weights"] / "ct-tiny")
    (places["weights"] / "damaged").mkdir()
    (places["weights"] / "damaged" / "card.json").write_text("{not json")
    catalog.promote(finished_run(tmp_path / "elsewhere" / "run-7"), "ct-promoted")
    for name, state in (("run-done", "succeeded"), ("run-live", "running"), ("run-failed", "failed")):
        finished_run(places["runs"] / name, state)
    tiny_bundle(places["runs"] / "plain-bundle", modality="X-ray", classes=("COVID", "Normal"))
    (places["runs"] / "damaged").mkdir()
    (places["runs"] / "damaged" / "card.json").write_text("{not json")

    entries = catalog.available_models()
    sources = [(entry.name, entry.source) for entry in entries]
    assert sources[:3] == [("ct-tiny", "shipped"), ("xray-tiny", "shipped"), ("ct-promoted", "promoted")]
    assert sorted(sources[3:]) == [("plain-bundle", "training run"), ("run-done", "training run")]
    labels = {entry.name: entry.label for entry in entries}
    assert labels["ct-tiny"] == "ct-tiny (CT)" and labels["xray-tiny"] == "xray-tiny (X-ray)"
    assert labels["ct-promoted"] == "ct-promoted (CT, promoted)"
    assert labels["run-done"] == "run-done (CT, training run)"
    assert labels["plain-bundle"] == "plain-bundle (X-ray, training run)"
    done = next(entry for entry in entries if entry.name == "run-done")
    assert done.path == places["runs"] / "run-done" / "model"
    assert done.card.classes == ["COVID", "NonCOVID"]
    # Explicit folders win over the environment; missing folders list nothing.
    assert catalog.available_models(weights=tmp_path / "none", state_dir=tmp_path / "none",
                                    runs=tmp_path / "none") == []
    assert [e.name for e in catalog.shipped_models(places["weights"])] == ["ct-tiny", "xray-tiny"]


def test_records_keep_todays_keys_and_add_the_source(places):
    tiny_bundle(places["weights"] / "ct-tiny", metrics={"val": {"accuracy": 0.75}})
    [entry] = catalog.available_models()
    record = entry.to_dict()
    assert record == {"name": "ct-tiny", "path": str(places["weights"] / "ct-tiny"), "source": "shipped",
                      "modality": "CT", "classes": ["COVID", "NonCOVID"], "architecture": "tiny_cnn",
                      "ensemble_size": 1, "input_size": 64, "metrics": {"val": {"accuracy": 0.75}},
                      "description": ""}


def test_find_model_by_name_or_folder(places, tmp_path):
    tiny_bundle(places["weights"] / "ct-tiny")
    finished_run(places["runs"] / "ct-tiny")  # same name as the shipped one: the shipped one comes first
    by_name = catalog.find_model("ct-tiny")
    assert by_name.source == "shipped" and by_name.path == places["weights"] / "ct-tiny"
    by_path = catalog.find_model(str(places["runs"] / "ct-tiny" / "model"))
    assert by_path.source == "path" and by_path.name == "model"
    assert by_path.label == f"model (CT, {places['runs'] / 'ct-tiny' / 'model'})"

    with pytest.raises(ModelBundleError, match=r"No model bundle at nope, and no model of that name \(models: ct-tiny, ct-tiny"):
        catalog.find_model("nope")
    (tmp_path / "broken").mkdir()
    with pytest.raises(ModelBundleError, match="has no card.json"):
        catalog.find_model(tmp_path / "broken")
    # model_path passes any existing path on unread (load_bundle also reads .pt checkpoints and card.json).
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"")
    assert catalog.model_path(checkpoint) == checkpoint
    assert catalog.model_path(" ct-tiny ") == places["weights"] / "ct-tiny"


def test_promote_copies_a_finished_run_under_a_new_name(places, tmp_path):
    run_dir = finished_run(tmp_path / "run-1", classes=("Covid", "Normal"))
    record = JobRecord(id="run-1", name="ct run", status="succeeded", created="2026-01-02T10:00:00+00:00",
                       run_dir=str(run_dir), backend="local", args=[])
    path = catalog.promote(record, "ct-tiny.v1")
    assert path == places["state"] / "models" / "ct-tiny.v1"
    assert (run_dir / "model" / "card.json").is_file()  # the run keeps its own copy
    promoted = Predictor(path)
    assert promoted.card.name == "ct-tiny.v1" and promoted.classes == ["Covid", "Normal"]
    assert promoted.card.training["promoted_from"]["run"] == "run-1"
    assert promoted.card.training["promoted_from"]["name"] == "ct run"
    image = encode(gradient_image(80, 80), "PNG")
    original = Predictor(run_dir / "model").predict_one(image).probabilities
    assert promoted.predict_one(image).probabilities == pytest.approx(original)

    [entry] = catalog.promoted_models()
    assert entry.name == "ct-tiny.v1" and entry.path == path and entry.source == "promoted"
    with pytest.raises(JobError, match="exists already"):
        catalog.promote(record, "ct-tiny.v1")
    assert catalog.promote(record, "ct-tiny.v1", overwrite=True) == path
    for bad in ("", "../escape", "a b", "-dash-first", "x" * 65):
        with pytest.raises(JobError, match="A model name needs"):
            catalog.promote(record, bad)
    failed = JobRecord(**{**record.__dict__, "status": "failed"})
    with pytest.raises(JobError, match="Only a run that succeeded"):
        catalog.promote(failed, "other")
    with pytest.raises(JobError, match="this one is running"):
        catalog.promote(finished_run(tmp_path / "run-2", "running"), "other")
    assert [m.name for m in catalog.promoted_models()] == ["ct-tiny.v1"]


def run_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "covidscan", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=REPO, timeout=300)


def test_cli_lists_a_promoted_model_and_predicts_with_it_by_name(places, tmp_path):
    tiny_bundle(places["weights"] / "ct-tiny")
    catalog.promote(finished_run(tmp_path / "run-1", seed=3), "my-ct")
    finished_run(places["runs"] / "run-done", modality="X-ray", classes=("COVID", "Normal"))
    env = {catalog.WEIGHTS_ENV: str(places["weights"]), "COVIDSCAN_STATE_DIR": str(places["state"]),
           catalog.RUNS_ENV: str(places["runs"])}

    listed = run_cli("models", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    assert [(r["name"], r["source"]) for r in records] == [
        ("ct-tiny", "shipped"), ("my-ct", "promoted"), ("run-done", "training run")]
    assert records[1]["path"] == str(places["state"] / "models" / "my-ct")
    text = run_cli("models", env=env).stdout
    assert "my-ct: promoted, CT tiny_cnn 64px classes=COVID, NonCOVID" in text
    assert "run-done: training run, X-ray" in text

    image = tmp_path / "slice.png"
    image.write_bytes(encode(gradient_image(96, 96), "PNG"))
    by_name = run_cli("predict", "--model", "my-ct", "--json", image, env=env)
    assert by_name.returncode == 0, by_name.stderr
    by_path = run_cli("predict", "--model", records[1]["path"], "--json", image, env=env)
    assert json.loads(by_name.stdout) == json.loads(by_path.stdout)
    shipped = json.loads(run_cli("predict", "--model", "ct-tiny", "--json", image, env=env).stdout)
    assert shipped["probabilities"] != json.loads(by_name.stdout)["probabilities"]  # another model (seed)

    unknown = run_cli("predict", "--model", "no-such-model", image, env=env)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip() == ("covidscan: error: No model bundle at no-such-model, and no model of that "
                                      "name (models: ct-tiny, my-ct, run-done; `covidscan models` lists them).")
