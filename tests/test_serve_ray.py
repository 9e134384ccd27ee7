"""`covidscan serve --ray-address`: the REST API as a Ray Serve deployment on a local Ray head.

The test starts its own Ray head on 127.0.0.1 (free ports, 2 CPUs, no GPU) and stops only it.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from streamlit_server import wait_healthy
from synthetic import encode, gradient_image, tiny_bundle

pytest.importorskip("ray.serve", reason="Ray Serve is optional: pip install 'covidscan[ray]'")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head (GCS on a free loopback port, 2 CPUs); yields its address, stopped (only it) afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets fit in 107 characters
    gcs_port = _free_port()
    command = [shutil.which("ray") or "ray", "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--include-dashboard=false",
               f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
               "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}"]
    log = open(Path(temp_dir) / "head.log", "wb")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"127.0.0.1:{gcs_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            probe = subprocess.run([shutil.which("ray") or "ray", "status", f"--address={address}"],
                                   capture_output=True, text=True, env=env)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(1)
        yield address
    finally:
        _stop(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_serve_deployment_answers_like_uvicorn(ray_head, tmp_path):
    from covidscan.predictor import Predictor

    bundle = tiny_bundle(tmp_path / "tiny-ct")
    png = encode(gradient_image(90, 80, seed=3), "PNG")
    port = _free_port()
    env = {**os.environ, "COVIDSCAN_API_KEY": "r4y", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "covidscan", "serve", "--ray-address", ray_head, "--port",
                               str(port), "--model", str(bundle), "--replicas", "1", "--cpus-per-replica", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/healthz", server, timeout=300)
        headers = {"X-API-Key": "r4y"}
        assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
        assert [m["name"] for m in httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json()] == ["tiny-ct"]
        response = httpx.post(f"{base}/v1/predict?model=tiny-ct", headers=headers, timeout=120,
                              files=[("files", ("a.png", png)), ("files", ("b.png", b"nope" * 40))])
        assert response.status_code == 200, response.text
        good, bad = response.json()["results"]
        expected = Predictor(bundle).predict_one(png).probabilities
        assert max(abs(good["probabilities"][k] - v) for k, v in expected.items()) < 1e-3
        assert set(bad) == {"file", "error"}
        assert httpx.post(f"{base}/v1/predict?model=nope", headers=headers, timeout=30,
                          files=[("files", ("a.png", png))]).status_code == 404
    finally:
        _stop(server, signal.SIGINT)


def test_config_file_builder_makes_an_autoscaling_application():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from covidscan.serve.ray_app import app_builder

    app = call_user_app_builder_with_args_if_necessary(
        app_builder, {"models": ["/models/ct"], "min_replicas": 1, "max_replicas": 3, "num_cpus": 2})
    assert isinstance(app, Application)
    deployment = app._bound_deployment
    assert deployment.ray_actor_options["num_cpus"] == 2
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
