"""The Ray backend against a real single-node Ray cluster that this module starts on loopback."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from jobs_helpers import assert_usable_bundle, make_dataset, train_args, wait_until

pytest.importorskip("ray.job_submission", reason="the Ray backend is optional: pip install 'covidscan[ray]'")

from covidscan.cli import main  # noqa: E402
from covidscan.errors import JobError  # noqa: E402
from covidscan.jobs import get_runner  # noqa: E402
from covidscan.jobs.ray_backend import RayRunner  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address():
    """A Ray head with 2 CPUs and no GPU, dashboard on 127.0.0.1; stopped (only it) afterwards."""
    # Short temp path: Ray's unix sockets must fit in 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    dashboard_port = _free_port()
    command = [
        shutil.which("ray") or "ray", "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={_free_port()}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
    ]
    log = open(Path(temp_dir) / "head.log", "wb")
    # Its own process group, so teardown stops exactly this cluster and nothing else.
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, RAY_JOB_STOP_WAIT_TIME_S="5"))
    address = f"http://127.0.0.1:{dashboard_port}"

    def job_server_up() -> bool:
        assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    try:
        wait_until(job_server_up, timeout=120, poll=0.5, what="the Ray head to start")
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its own processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_ray_jobs_succeed_fail_cancel_and_request_gpus(ray_address, tmp_path, capsys, monkeypatch):
    data = make_dataset(tmp_path / "ct")
    state = tmp_path / "state"
    # The head runs on this machine, with this interpreter; half a CPU each lets all jobs start.
    monkeypatch.setenv("COVIDSCAN_RAY_PYTHON", sys.executable)
    assert main(["jobs", "submit", "--state-dir", str(state), "--ray-address", ray_address, "--name", "ray tiny",
                 "--", *train_args(data)]) == 0
    done = capsys.readouterr().out.strip()
    runner = get_runner(state, ray_address=ray_address)
    assert isinstance(runner, RayRunner)
    runner.num_cpus = 0.5
    long = runner.submit(train_args(data, epochs=200), name="ray long").id
    bad = runner.submit(["--dataset", "folder", "--modality", "CT", "--root", str(tmp_path / "missing"), "--arch", "tiny_cnn"],
                        name="bad path").id
    # A GPU request on a cluster without GPUs waits in Ray's queue: proof that it reached Ray.
    needs_gpu = RayRunner(ray_address, state_dir=state, num_gpus=1).submit(train_args(data), name="needs a GPU").id

    def long_is_running() -> bool:
        record = runner.get(long)
        assert not record.done, runner.logs(long)
        return record.status == "running"

    wait_until(long_is_running, timeout=120, what="Ray to start the long job")
    started = time.monotonic()
    cancelled = runner.cancel(long, wait=30)
    assert cancelled.status == "cancelled" and time.monotonic() - started < 20
    assert not list(Path(cancelled.run_dir).glob(".model.tmp-*"))

    record = runner.wait(done, timeout=120)
    assert record.status == "succeeded", runner.logs(done)
    assert record.backend == "ray" and record.pid is None and record.exit_code == 0
    # Metrics and the bundle came back through the shared run directory.
    assert [row["epoch"] for row in runner.metrics(done)] == [1]
    assert runner.progress(done)["state"] == "succeeded"
    assert_usable_bundle(record.model_dir, next((data / "Covid").iterdir()))
    saved_log = (Path(record.run_dir) / "train.log").read_text()
    assert "Best model" in saved_log and "Best model" in runner.logs(done)

    failed = runner.wait(bad, timeout=60)
    assert failed.status == "failed" and "does not exist" in failed.error and "missing" in failed.error

    assert runner.get(needs_gpu).status == "queued"
    assert runner.cancel(needs_gpu, wait=30).status == "cancelled"

    assert main(["jobs", "list", "--json", "--state-dir", str(state), "--ray-address", ray_address]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(job["id"], job["status"], job["backend"]) for job in listed] == [
        (done, "succeeded", "ray"), (long, "cancelled", "ray"), (bad, "failed", "ray"), (needs_gpu, "cancelled", "ray")]


def test_ray_errors_are_clear(ray_address, tmp_path, capsys):
    state = tmp_path / "state"
    assert main(["jobs", "status", "nope", "--state-dir", str(state), "--ray-address", ray_address]) == 2
    assert "No job with id 'nope'" in capsys.readouterr().err
    with pytest.raises(JobError, match="Cannot reach the Ray cluster"):
        RayRunner(f"http://127.0.0.1:{_free_port()}", state_dir=state)
