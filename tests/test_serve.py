"""The REST API: every endpoint through FastAPI's TestClient, and a real `covidscan serve` on loopback."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image
from streamlit_server import wait_healthy
from synthetic import PHI, ct_dicom_bytes, encode, gradient_image, tiny_bundle

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from covidscan.serve.app import create_app  # noqa: E402
from covidscan.serve.models import ModelRegistry, resolve_models  # noqa: E402

PREDICT_KEYS = {"file", "label", "probabilities", "warnings", "ood", "uncertainty", "uncertain", "cam",
                "cam_method", "cam_faithfulness", "cam_in_lungs"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    return {"ct": tiny_bundle(folder / "tiny-ct"), "xray": tiny_bundle(
        folder / "tiny-xray", classes=("COVID", "Normal", "Viral Pneumonia"), modality="X-ray", seed=1)}


@contextmanager
def make_client(bundles, **options):
    """A TestClient over both tiny models, entered (the app started) and with the models loaded."""
    registry = ModelRegistry({m.name: m for m in resolve_models([str(bundles["ct"]), str(bundles["xray"])])})
    with TestClient(create_app(registry, **options)) as client:
        assert registry.wait(120)
        yield client


@pytest.fixture(scope="module")
def client(bundles):
    with make_client(bundles) as test_client:
        yield test_client


def png(seed=0, width=96, height=80) -> bytes:
    return encode(gradient_image(width, height, seed=seed), "PNG")


def test_health_and_models(client, bundles):
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["models"] == ["tiny-ct", "tiny-xray"]
    models = client.get("/v1/models").json()
    assert [m["name"] for m in models] == ["tiny-ct", "tiny-xray"]
    assert models[1]["classes"] == ["COVID", "Normal", "Viral Pneumonia"] and models[1]["modality"] == "X-ray"
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_healthz_is_503_until_the_models_are_loaded(bundles):
    registry = ModelRegistry({m.name: m for m in resolve_models([str(bundles["ct"])])})
    with TestClient(create_app(registry, load_on_startup=False)) as test_client:
        assert test_client.get("/healthz").status_code == 503
        assert test_client.post("/v1/predict?model=tiny-ct", files=[("files", ("a.png", png()))]).status_code == 503
        registry.load_all()
        assert test_client.get("/healthz").status_code == 200


def test_predict_records_match_the_library_in_order_with_bad_files(client, bundles):
    from covidscan.predictor import Predictor

    files = [("files", ("first.png", png(0))), ("files", ("notes.png", b"not an image at all" * 20)),
             ("files", ("slice.dcm", ct_dicom_bytes())), ("files", ("third.jpg", encode(gradient_image(64, 64, 3), "JPEG")))]
    response = client.post("/v1/predict?model=tiny-ct", files=files)
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "tiny-ct"
    records = body["results"]
    assert [r["file"] for r in records] == ["first.png", "notes.png", "slice.dcm", "third.jpg"]
    assert set(records[1]) == {"file", "error"} and "not an image or DICOM file" in records[1]["error"]
    predictor = Predictor(bundles["ct"])
    for record, (_, (_, data)) in zip(records, files):
        if "error" in record:
            continue
        assert set(record) == PREDICT_KEYS
        expected = predictor.predict_one(data).probabilities
        assert all(abs(record["probabilities"][k] - v) < 1e-4 for k, v in expected.items())
    assert not any(value in response.text for value in PHI.values())


def test_explain_returns_pngs_at_the_image_size(client):
    response = client.post("/v1/explain?model=tiny-xray&method=gradcam%2B%2B&target_class=Normal&opacity=0.6",
                           files={"file": ("x.png", png(2, 120, 90))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert PREDICT_KEYS <= set(body) and body["cam_target_class"] == "Normal"
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert heatmap.size == overlay.size == (120, 90) and heatmap.mode == "L" and overlay.mode == "RGB"
    assert np.asarray(heatmap).std() > 0


@pytest.mark.parametrize("url, files, status", [
    ("/v1/predict?model=nope", [("files", ("a.png", png()))], 404),
    ("/v1/explain?model=nope", {"file": ("a.png", png())}, 404),
    ("/v1/predict", [("files", ("a.png", png()))], 422),  # no model named
    ("/v1/predict?model=tiny-ct", None, 422),  # no files
    ("/v1/explain?model=tiny-ct&method=nonsense", {"file": ("a.png", png())}, 422),
    ("/v1/explain?model=tiny-ct&target_class=Dragon", {"file": ("a.png", png())}, 422),
    ("/v1/explain?model=tiny-ct&opacity=3", {"file": ("a.png", png())}, 422),
    ("/v1/explain?model=tiny-ct", {"file": ("a.txt", b"hello" * 50)}, 422),
])
def test_errors_are_json_with_proper_status(client, url, files, status):
    response = client.post(url, files=files) if files is not None else client.post(url)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()


def test_too_many_and_too_large_files_are_413(bundles):
    with make_client(bundles, max_files=2, max_file_bytes=20_000) as limited:
        three = [("files", (f"{i}.png", png(i, 40, 40))) for i in range(3)]
        assert limited.post("/v1/predict?model=tiny-ct", files=three).status_code == 413
        big = encode(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8), "PNG")
        assert len(big) > 20_000
        response = limited.post("/v1/predict?model=tiny-ct", files=[("files", ("big.png", big))])
        assert response.status_code == 413 and "larger than" in response.json()["detail"]
        huge = b"0" * 200_000  # over the whole request's limit: refused before the body is parsed
        assert limited.post("/v1/predict?model=tiny-ct", files=[("files", ("h.png", huge))] * 2).status_code == 413


def test_api_key(bundles):
    with make_client(bundles, api_key="s3cret") as keyed:
        assert keyed.get("/v1/models").status_code == 401
        assert keyed.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
        assert keyed.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert keyed.get("/healthz").status_code == 200  # probes need no key


def test_unknown_model_name_is_refused_at_start():
    from covidscan.errors import ModelBundleError

    with pytest.raises(ModelBundleError, match="No model named"):
        resolve_models(["no-such-model-anywhere"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_real_uvicorn_server_agrees_with_the_cli(bundles, tmp_path):
    import httpx

    image = tmp_path / "scan.png"
    image.write_bytes(png(5, 100, 90))
    port = free_port()
    env = {**os.environ, "COVIDSCAN_API_KEY": "k3y"}
    server = subprocess.Popen([sys.executable, "-m", "covidscan", "serve", "--port", str(port), "--model",
                               str(bundles["ct"])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(f"{base}/healthz", server, timeout=120)
        headers = {"X-API-Key": "k3y"}
        assert httpx.post(f"{base}/v1/predict?model=tiny-ct", files=[("files", ("scan.png", image.read_bytes()))],
                          timeout=60).status_code == 401
        response = httpx.post(f"{base}/v1/predict?model=tiny-ct", headers=headers, timeout=60,
                              files=[("files", ("scan.png", image.read_bytes())), ("files", ("bad.png", b"x" * 100))])
        assert response.status_code == 200, response.text
        http_good, http_bad = response.json()["results"]
        cli = subprocess.run([sys.executable, "-m", "covidscan", "predict", "--model", str(bundles["ct"]), "--json",
                              str(image)], capture_output=True, text=True, timeout=300)
        cli_record = json.loads(cli.stdout.splitlines()[0])
        assert set(http_good) == set(cli_record) == PREDICT_KEYS and "error" in http_bad
        assert http_good["label"] == cli_record["label"]
        for name, value in cli_record["probabilities"].items():
            assert abs(http_good["probabilities"][name] - value) < 1e-3
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert "scan.png" not in output and "bad.png" not in output  # no file names in the server's log
