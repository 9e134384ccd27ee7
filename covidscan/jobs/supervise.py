"""``python -m covidscan.jobs.supervise JOB_ID``: run one local job's training and record its end.

Started by ``LocalRunner.start_queued`` in its own process session. It:

1. waits until the runner's transaction that claimed the job commits (and checks that the claim
   names this process, so a job is never run twice);
2. refuses to start on a full disk, otherwise runs ``python -m covidscan train ARGS --out RUN_DIR``
   with stdout and stderr appended to ``RUN_DIR/train.log``;
3. on SIGTERM (``cancel``) forwards SIGTERM to training and SIGKILLs it after the grace period;
4. records succeeded / failed (with the reason) / cancelled in the job database;
5. starts the next queued job, so the queue advances with no app or CLI running.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from covidscan.jobs.base import CANCELLED, FAILED, RUNNING, SUCCEEDED, MODEL_DIR_NAME, LOG_NAME, job_command, utc_now
from covidscan.jobs.local import (
    DEFAULT_GRACE_SECONDS, LocalRunner, describe_exit, free_disk_mb, kill_tree, process_start_time,
)
from covidscan.jobs.store import JobStore

MIN_FREE_MB_ENV = "COVIDSCAN_JOBS_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 200.0
CLAIM_TIMEOUT_SECONDS = 30.0


class _Cancel:
    """Set by SIGTERM/SIGINT/SIGHUP; remembers when, for the SIGKILL deadline."""

    requested_at: float | None = None

    @classmethod
    def handler(cls, signum, frame) -> None:  # noqa: ARG003 - signal handler signature
        if cls.requested_at is None:
            cls.requested_at = time.monotonic()


def _note(log, text: str) -> None:
    log.write(f"[covidscan jobs] {utc_now()} {text}\n".encode())
    log.flush()


def _wait_for_claim(store: JobStore, job_id: str) -> dict | None:
    deadline = time.monotonic() + CLAIM_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        row = store.row(job_id)
        if row is None:
            return None
        if row["supervisor_pid"] == os.getpid():
            return row if row["status"] == RUNNING else None
        time.sleep(0.05)
    return None


def _remove_partial_bundles(run_dir: Path) -> None:
    """Delete staging folders a killed bundle save left behind (``.model.tmp-*``)."""
    for staging in run_dir.glob(f".{MODEL_DIR_NAME}.tmp-*"):
        shutil.rmtree(staging, ignore_errors=True)


def supervise(state_dir: Path, job_id: str, concurrency: int, grace_seconds: float) -> int:
    """Run and record one job, then start queued ones. Returns the supervisor's exit status."""
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):  # SIGHUP does not exist on Windows
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _Cancel.handler)
    store = JobStore(state_dir)
    row = _wait_for_claim(store, job_id)
    if row is None:
        return 0  # the claim was rolled back or belongs to another supervisor
    run_dir = Path(row["run_dir"])
    log_path = run_dir / LOG_NAME
    try:
        status, error, exit_code = _run_training(store, row, run_dir, log_path, grace_seconds)
    except Exception as exc:  # the supervisor must always record an end
        status, error, exit_code = FAILED, f"The job runner failed: {exc}", None
    if status != SUCCEEDED:
        _remove_partial_bundles(run_dir)
    store.update(job_id, only_if_status=(RUNNING,), status=status, error=error, exit_code=exit_code,
                 finished=utc_now())
    try:
        with open(log_path, "ab") as log:
            _note(log, f"job {status}" + (f": {error}" if error and status == FAILED else ""))
    except OSError:
        pass
    LocalRunner(state_dir, concurrency=concurrency, grace_seconds=grace_seconds).start_queued()
    return 0


def _run_training(store: JobStore, row: dict, run_dir: Path, log_path: Path,
                  grace_seconds: float) -> tuple[str, str | None, int | None]:
    min_free_mb = float(os.environ.get(MIN_FREE_MB_ENV, DEFAULT_MIN_FREE_MB))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        free_mb = free_disk_mb(run_dir)
        log = open(log_path, "ab")
    except OSError as exc:
        return FAILED, f"Cannot write the run directory {run_dir}: {exc.strerror or exc}.", None
    with log:
        if free_mb < min_free_mb:
            return (FAILED, f"The disk holding {run_dir} is full: {free_mb:.0f} MB free, and a training run "
                    f"needs at least {min_free_mb:.0f} MB. Free some space and submit the job again.", None)
        if _Cancel.requested_at is not None or row["cancel_requested"]:
            return CANCELLED, "Cancelled before it started.", None
        command = [sys.executable, "-m", "covidscan", *job_command(json.loads(row["args"])), "--out", str(run_dir)]
        _note(log, "starting: " + " ".join(command[1:]))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cwd = row["cwd"] if row["cwd"] and os.path.isdir(row["cwd"]) else None
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=cwd, env=env, close_fds=True)
        store.update(row["id"], pid=process.pid, pid_created=process_start_time(process.pid))
        forwarded = False
        while True:
            try:
                exit_code = process.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            if _Cancel.requested_at is None and store.row(row["id"])["cancel_requested"]:
                _Cancel.requested_at = time.monotonic()  # cancelled by a process that could not signal us
            if _Cancel.requested_at is not None:
                if not forwarded:
                    _note(log, "cancel requested: asking training to stop")
                    process.send_signal(signal.SIGTERM)
                    forwarded = True
                elif time.monotonic() - _Cancel.requested_at > grace_seconds:
                    _note(log, f"training did not stop within {grace_seconds:g} s: killing it")
                    kill_tree(process.pid)
                    exit_code = process.wait()
                    break
    if _Cancel.requested_at is not None or exit_code == 130:
        return CANCELLED, "Cancelled by the user.", exit_code
    if exit_code == 0:
        if not (run_dir / MODEL_DIR_NAME / "card.json").is_file():
            return FAILED, "Training finished but saved no model bundle.", exit_code
        return SUCCEEDED, None, exit_code
    return FAILED, describe_exit(exit_code, log_path), exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covidscan.jobs.supervise", description=__doc__.splitlines()[0])
    parser.add_argument("job_id")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_SECONDS)
    args = parser.parse_args(argv)
    return supervise(args.state_dir, args.job_id, args.concurrency, args.grace)


if __name__ == "__main__":
    raise SystemExit(main())
