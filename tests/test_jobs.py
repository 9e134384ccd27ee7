"""The local job runner with real `covidscan train` processes on a tiny synthetic dataset."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobs_helpers import assert_usable_bundle, make_dataset, train_args, wait_until

from covidscan.cli import main
from covidscan.errors import JobError
from covidscan.jobs import JobRecord, get_runner
from covidscan.jobs.local import LocalRunner, process_alive
from covidscan.jobs.store import JobStore


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("jobs-data") / "ct")


@pytest.fixture(autouse=True)
def quiet_threads(monkeypatch):
    # Jobs inherit the environment: one thread each keeps the 2-core CI machine responsive.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("COVIDSCAN_STATE_DIR", raising=False)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _wait_for_training(runner: LocalRunner, job_id: str, timeout: float = 60.0) -> dict:
    """Until the training process has taken a step (so cancelling hits it mid-run)."""
    def training() -> dict | None:
        record = runner.get(job_id)
        assert record.status in ("queued", "running"), f"job ended early: {record.status} {record.error}"
        progress = runner.progress(job_id)
        return progress if progress and progress.get("step", 0) > 0 and record.pid else None
    return wait_until(training, timeout, what="training to start")


@pytest.mark.slow
def test_cancel_stops_a_running_job_within_seconds_without_half_bundle(tmp_path, data):
    runner = LocalRunner(tmp_path / "state", grace_seconds=8)
    job = runner.submit(train_args(data, epochs=200), name="long")
    _wait_for_training(runner, job.id)
    pid = runner.get(job.id).pid

    started = time.monotonic()
    record = runner.cancel(job.id, wait=30)
    took = time.monotonic() - started
    assert record.status == "cancelled", runner.logs(job.id)
    assert took < 15, f"cancel took {took:.1f} s"
    assert not process_alive(pid, None)
    run_dir = Path(record.run_dir)
    assert not list(run_dir.glob(".model.tmp-*")), "a half-written bundle was left behind"
    if record.model_dir.exists():  # the best epoch so far is a complete bundle, or nothing
        assert_usable_bundle(record.model_dir, next((data / "Normal").iterdir()))
    assert runner.cancel(job.id).status == "cancelled"  # cancelling again changes nothing


@pytest.mark.slow
def test_kill_9_is_reported_as_failed_never_running_forever(tmp_path, data):
    runner = LocalRunner(tmp_path / "state", concurrency=2)
    only_training = runner.submit(train_args(data, epochs=200), name="training killed")
    everything = runner.submit(train_args(data, epochs=200), name="supervisor and training killed")
    for job in (only_training, everything):  # killed as soon as the training process exists
        wait_until(lambda: process_alive(runner.get(job.id).pid, None), timeout=60, what="training to start")

    # OOM-killer style: the training process dies; its supervisor records why.
    os.kill(runner.get(only_training.id).pid, signal.SIGKILL)
    # Reboot style: every process of the job vanishes, nobody records anything.
    row = runner.store.row(everything.id)
    os.kill(row["supervisor_pid"], signal.SIGKILL)
    os.kill(row["pid"], signal.SIGKILL)

    record = runner.wait(only_training.id, timeout=20)
    assert record.status == "failed" and "killed" in record.error and "SIGKILL" in record.error
    assert record.exit_code == -signal.SIGKILL
    record = runner.wait(everything.id, timeout=20)
    assert record.status == "failed"
    assert "without reporting" in record.error and "kill -9" in record.error


@pytest.mark.slow
def test_queue_runs_jobs_one_at_a_time_to_usable_bundles_despite_a_bad_job(tmp_path, data, capsys):
    state = tmp_path / "state"
    status, out, err = _cli(capsys, "jobs", "submit", "--state-dir", str(state), "--name", "first",
                            "--", *train_args(data))
    assert status == 0, err
    first = out.strip()
    runner = LocalRunner(state, concurrency=1)
    bad = runner.submit(["--dataset", "folder", "--modality", "CT", "--root", str(tmp_path / "no-such-folder"), "--arch", "tiny_cnn"],
                        name="bad path").id
    last = runner.submit(train_args(data), name="last").id
    assert [runner.get(job_id).status for job_id in (first, bad, last)] == ["running", "queued", "queued"]
    del runner  # nobody polls from here on: each job's supervisor starts the next one

    store = JobStore(state)
    seen_running: list[set[str]] = []

    def all_done() -> bool:
        rows = store.rows()
        seen_running.append({row["id"] for row in rows if row["status"] == "running"})
        return all(row["status"] in ("succeeded", "failed", "cancelled") for row in rows)

    wait_until(all_done, timeout=150, poll=0.1, what="the queue to drain")
    assert max(len(running) for running in seen_running) == 1, "two jobs ran at once"
    order = [[first, bad, last].index(next(iter(ids))) for ids in seen_running if ids]
    assert order == sorted(order), "the queue did not keep submission order"

    # A new process (a restarted app) sees every job and its outcome.
    lister = ("import json, sys; from covidscan.jobs import get_runner; "
              "print(json.dumps([job.to_dict() for job in get_runner(sys.argv[1]).list()]))")
    listed = subprocess.run([sys.executable, "-c", lister, str(state)], capture_output=True, text=True,
                            timeout=60, check=True)
    jobs = {job["name"]: job for job in json.loads(listed.stdout)}
    assert [job["id"] for job in json.loads(listed.stdout)] == [first, bad, last]
    assert jobs["first"]["status"] == "succeeded" and jobs["last"]["status"] == "succeeded"
    assert jobs["bad path"]["status"] == "failed" and jobs["bad path"]["exit_code"] == 2
    assert "does not exist" in jobs["bad path"]["error"] and "no-such-folder" in jobs["bad path"]["error"]
    # One after another: each started after the previous one finished.
    assert jobs["first"]["finished"] <= jobs["bad path"]["started"]
    assert jobs["bad path"]["finished"] <= jobs["last"]["started"]

    # The finished run directory: config, metrics, log and a bundle the Predictor uses at once.
    runner = LocalRunner(state)
    record = runner.get(first)
    run_dir = Path(record.run_dir)
    assert run_dir.parent == state.resolve() / "runs"
    assert record.error is None and record.exit_code == 0 and record.started <= record.finished
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 1
    assert [row["epoch"] for row in runner.metrics(first)] == [1]
    assert runner.progress(first)["state"] == "succeeded"
    assert "Best model" in runner.logs(first)
    assert_usable_bundle(record.model_dir, next((data / "Covid").iterdir()))
    assert_usable_bundle(Path(jobs["last"]["run_dir"]) / "model", next((data / "Normal").iterdir()))

    # The CLI's views of the same jobs.
    status, out, _ = _cli(capsys, "jobs", "list", "--json", "--state-dir", str(state))
    listed = json.loads(out)
    assert status == 0 and [job["id"] for job in listed] == [first, bad, last]
    assert {"id", "name", "status", "created", "started", "finished", "run_dir", "error", "pid"} <= set(listed[0])
    status, out, _ = _cli(capsys, "jobs", "status", first, "--json", "--state-dir", str(state))
    shown = json.loads(out)
    assert status == 0 and shown["status"] == "succeeded" and shown["model_dir"] == str(record.model_dir)
    assert shown["last_metrics"]["epoch"] == 1 and shown["progress"]["state"] == "succeeded"
    status, out, _ = _cli(capsys, "jobs", "logs", bad, "--follow", "--state-dir", str(state))
    assert status == 0 and "does not exist" in out and "job failed" in out
    status, out, _ = _cli(capsys, "jobs", "cancel", first, "--state-dir", str(state))
    assert status == 0 and "already ended (succeeded)" in out


def test_racing_processes_never_start_the_same_queued_job(tmp_path, data, monkeypatch):
    state = tmp_path / "state"
    # The disk check refuses each job before training starts: every job is a quick but real run
    # (supervisor, database updates, then starting the next queued job).
    monkeypatch.setenv("COVIDSCAN_JOBS_MIN_FREE_MB", "1e15")
    store = JobStore(state)
    ids = [f"job-{index}" for index in range(8)]
    for job_id in ids:
        (state / "runs" / job_id).mkdir(parents=True)
        store.insert(JobRecord(id=job_id, name=job_id, status="queued", created="2026-01-01T00:00:00+00:00",
                               run_dir=str(state / "runs" / job_id), backend="local", args=train_args(data)))
    # Four app processes wake up at once and each try to fill the two free slots.
    starter = f"from covidscan.jobs.local import LocalRunner; LocalRunner({str(state)!r}, concurrency=2).refresh()"
    racers = [subprocess.Popen([sys.executable, "-c", starter]) for _ in range(4)]
    assert [racer.wait(timeout=60) for racer in racers] == [0, 0, 0, 0]
    runner = LocalRunner(state, concurrency=2)
    wait_until(lambda: all(runner.get(job_id).done for job_id in ids), timeout=60, what="jobs to end")

    rows = store.rows()
    assert len({row["supervisor_pid"] for row in rows}) == len(ids)
    for row in rows:
        log = (Path(row["run_dir"]) / "train.log").read_text()
        assert row["status"] == "failed" and "disk" in row["error"] and "full" in row["error"]
        assert log.count("job failed") == 1, f"{row['id']} was run more than once"


def test_unknown_job_and_bad_submissions_are_clear_errors(tmp_path, capsys):
    state = tmp_path / "state"
    status, out, err = _cli(capsys, "jobs", "status", "20990101-000000-abcdef", "--state-dir", str(state))
    assert status == 2 and out == ""
    assert err.startswith("covidscan: error: No job with id '20990101-000000-abcdef'")

    for argv in (["cancel", "nope"], ["logs", "nope"]):
        status, _, err = _cli(capsys, "jobs", *argv, "--state-dir", str(state))
        assert status == 2 and "No job with id 'nope'" in err

    status, _, err = _cli(capsys, "jobs", "submit", "--state-dir", str(state), "--", "--dataset", "folder",
                          "--out", str(tmp_path / "mine"))
    assert status == 2 and "run directory" in err
    status, _, err = _cli(capsys, "jobs", "submit", "--state-dir", str(state))
    assert status == 2 and "after --" in err
    with pytest.raises(JobError, match="at least 1"):
        LocalRunner(state, concurrency=0)
    assert LocalRunner(state).list() == []  # nothing was recorded by the refused submissions


def test_state_dir_from_environment_and_dict_arguments(tmp_path, monkeypatch):
    state = tmp_path / "from-env"
    monkeypatch.setenv("COVIDSCAN_STATE_DIR", str(state))
    monkeypatch.setenv("COVIDSCAN_JOBS_MIN_FREE_MB", "1e15")  # refused before training: quick
    runner = get_runner()
    assert isinstance(runner, LocalRunner) and runner.state_dir == state.resolve()
    job = runner.submit({"dataset": "folder", "root": "/data/ct", "epochs": 2, "pretrained": True,
                         "tune_threshold": False, "patience": None}, name="from a dict")
    assert job.args == ["--dataset", "folder", "--root", "/data/ct", "--epochs", "2", "--pretrained"]
    assert (state / "jobs.sqlite3").is_file()
    with JobStore(state)._connect() as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    record = runner.wait(job.id, timeout=30)
    assert record.status == "failed" and "full" in record.error


def test_exit_reasons_name_a_full_disk_a_refusal_and_a_kill(tmp_path):
    from covidscan.jobs.local import describe_exit

    log = tmp_path / "train.log"
    log.write_text("[covidscan jobs] starting\nTraceback (most recent call last):\n"
                   '  File "training.py", line 9, in save\nOSError: [Errno 28] No space left on device\n')
    assert describe_exit(1, log) == "Training crashed (exit status 1): The disk holding the run directory is full (no space left on device)."
    log.write_text("[covidscan jobs] starting\ncovidscan: error: The dataset folder /x does not exist or is not a folder.\n")
    assert describe_exit(2, log) == "The dataset folder /x does not exist or is not a folder."
    log.write_text("Traceback (most recent call last):\nRuntimeError: CUDA error: device-side assert triggered\n")
    assert describe_exit(1, log) == "Training crashed (exit status 1): RuntimeError: CUDA error: device-side assert triggered"
    assert "killed" in describe_exit(-signal.SIGKILL, log) and "out of memory" in describe_exit(-signal.SIGKILL, log)
    assert describe_exit(-signal.SIGSEGV, log) == "The training process was stopped by SIGSEGV."


@pytest.mark.slow
def test_a_cross_validation_job_runs_to_an_ensemble_with_an_estimate(tmp_path, data):
    runner = LocalRunner(tmp_path / "state")
    job = runner.submit(["cv", *train_args(data), "--folds", "2", "--bootstrap", "100"], name="cv")
    record = runner.wait(job.id, timeout=300)
    assert record.status == "succeeded", runner.logs(job.id)
    run_dir = Path(record.run_dir)
    assert {"r0-f0", "r0-f1", "oof.csv", "progress.json"} <= {p.name for p in run_dir.iterdir()}
    assert json.loads((run_dir / "progress.json").read_text())["folds"] == 2
    from covidscan.bundle import read_card

    card = read_card(run_dir / "model")
    assert card.ensemble_size == 2 and card.metrics["estimate"]["n"] == 16
    assert_usable_bundle(run_dir / "model", next((data / "Covid").iterdir()))
