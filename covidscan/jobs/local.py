"""The local backend: each job is its own OS process, recorded in SQLite, queued with a slot limit.

How a job runs::

    submit ──► row "queued" ──► start_queued() ──► python -m covidscan.jobs.supervise JOB_ID
                                                        │  (own process session, survives the app)
                                                        └─► python -m covidscan train ... --out RUN_DIR
                                                               stdout+stderr ──► RUN_DIR/train.log

The supervisor waits for training, records the outcome (succeeded / failed with the reason /
cancelled), cancels with SIGTERM then SIGKILL after a grace period, and then starts the next
queued job itself, so the queue moves on with no app or CLI open. Any status read checks that the
processes of "running" jobs still exist (and are not zombies, and are the same processes, not a
recycled pid), so a job killed by ``kill -9``, the OOM killer or a reboot is marked failed.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from covidscan.errors import JobError
from covidscan.jobs.base import (
    CANCELLED, FAILED, LOG_NAME, QUEUED, RUNNING, SUCCEEDED, JobRecord, JobRunner, default_state_dir,
    error_from_log, read_progress, tail_text, utc_now,
)
from covidscan.jobs.store import JobStore, record_from_row

CONCURRENCY_ENV = "COVIDSCAN_JOBS_CONCURRENCY"
DEFAULT_GRACE_SECONDS = 10.0
RUNS_DIR_NAME = "runs"

# Supervisors started by this process, kept so they can be reaped (no zombies in a long-lived app).
_SPAWNED: dict[int, subprocess.Popen] = {}


def default_concurrency() -> int:
    """``$COVIDSCAN_JOBS_CONCURRENCY`` or 1: one CPU training run already uses every core."""
    text = os.environ.get(CONCURRENCY_ENV, "").strip()
    if not text:
        return 1
    try:
        value = int(text)
    except ValueError:
        raise JobError(f"{CONCURRENCY_ENV} must be a whole number of jobs, not {text!r}.") from None
    if value < 1:
        raise JobError(f"{CONCURRENCY_ENV} must be at least 1.")
    return value


def process_start_time(pid: int | None) -> float | None:
    """When a live, non-zombie process started (its identity beside the pid), else None."""
    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def process_alive(pid: int | None, started: float | None) -> bool:
    """True if ``pid`` is still the process that started at ``started`` and has not exited."""
    now_started = process_start_time(pid)
    if now_started is None:
        return False
    # A different start time means the pid was recycled (e.g. after a reboot).
    return started is None or abs(now_started - started) < 1.0


class LocalRunner(JobRunner):
    """Runs jobs as local processes.

    Args:
        state_dir: Where ``jobs.sqlite3`` and the run directories (``runs/<id>``) live; default
            ``default_state_dir()`` (env ``COVIDSCAN_STATE_DIR``).
        concurrency: How many jobs may run at once; default ``default_concurrency()`` (1).
        grace_seconds: How long a cancelled job may take to stop before it is killed.
    """

    backend = "local"

    def __init__(self, state_dir: str | os.PathLike | None = None, concurrency: int | None = None,
                 grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
        self.store = JobStore(state_dir if state_dir is not None else default_state_dir())
        self.state_dir = self.store.state_dir
        self.concurrency = default_concurrency() if concurrency is None else int(concurrency)
        if self.concurrency < 1:
            raise JobError("The number of jobs that may run at once must be at least 1.")
        self.grace_seconds = float(grace_seconds)
        self.host = socket.gethostname()

    # ----------------------------------------------------------------- the interface
    def submit(self, train_args: Sequence[str] | Mapping[str, Any] = (), name: str | None = None,
               config: Mapping[str, Any] | None = None) -> JobRecord:
        record = self._register(train_args, name, self.state_dir / RUNS_DIR_NAME, config)
        self.start_queued()
        return self.get(record.id)

    def get(self, job_id: str) -> JobRecord:
        row = self.store.row(job_id)
        if row is None:
            raise JobError(f"No job with id {job_id!r} in {self.state_dir}. `covidscan jobs list` shows the jobs.")
        if row["status"] == RUNNING and row["backend"] == self.backend:
            self._reap_spawned()
            if self._check_running(row):
                self.start_queued()
            row = self.store.row(job_id) or row
        elif row["status"] == QUEUED and row["backend"] == self.backend:
            self.refresh()  # a dead "running" job may be holding the slot this one waits for
            row = self.store.row(job_id) or row
        return record_from_row(row)

    def list(self) -> list[JobRecord]:
        self.refresh()
        return [record_from_row(row) for row in self.store.rows()]

    def cancel(self, job_id: str, wait: float = 0.0) -> JobRecord:
        record = self.get(job_id)
        if record.status == QUEUED:
            if self.store.update(job_id, only_if_status=(QUEUED,), status=CANCELLED, finished=utc_now(),
                                 error="Cancelled before it started."):
                return self.get(job_id)
            record = self.get(job_id)  # it started meanwhile: cancel it as a running job
        if record.status != RUNNING:
            return record
        row = self.store.row(job_id) or {}
        self.store.update(job_id, cancel_requested=1)
        if process_alive(row.get("supervisor_pid"), row.get("supervisor_created")):
            # The supervisor forwards SIGTERM to training and SIGKILLs it after the grace period.
            _signal(row["supervisor_pid"], signal.SIGTERM)
        else:
            self._stop_orphan(row)
        return self.wait(job_id, timeout=wait, poll_seconds=0.2) if wait > 0 else self.get(job_id)

    # ----------------------------------------------------------------- the queue
    def refresh(self) -> None:
        """Check every running local job's processes, then start queued jobs if slots are free."""
        self._reap_spawned()
        for row in self.store.rows("status = ? AND backend = ?", (RUNNING, self.backend)):
            self._check_running(row)
        self.start_queued()

    def start_queued(self) -> list[str]:
        """Start queued jobs while fewer than ``concurrency`` run. Safe to call from any process.

        Returns:
            The ids of the jobs started.
        """
        started: list[str] = []
        with self.store.transaction() as connection:
            running = connection.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ? AND backend = ?", (RUNNING, self.backend)).fetchone()[0]
            free = self.concurrency - running
            if free <= 0:
                return started
            queued = connection.execute(
                "SELECT id, run_dir FROM jobs WHERE status = ? AND backend = ? ORDER BY seq LIMIT ?",
                (QUEUED, self.backend, free)).fetchall()
            for job in queued:
                # Spawned while holding the write lock: the supervisor waits until this commits.
                try:
                    process = self._spawn_supervisor(job["id"], Path(job["run_dir"]))
                except OSError as exc:
                    self.store.update(job["id"], connection=connection, status=FAILED, finished=utc_now(),
                                      error=f"The job could not be started: {exc.strerror or exc}.")
                    continue
                self.store.update(job["id"], connection=connection, status=RUNNING, started=utc_now(),
                                  host=self.host, supervisor_pid=process.pid,
                                  supervisor_created=process_start_time(process.pid))
                started.append(job["id"])
        return started

    def _spawn_supervisor(self, job_id: str, run_dir: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "covidscan.jobs.supervise", "--state-dir", str(self.state_dir),
                   "--concurrency", str(self.concurrency), "--grace", str(self.grace_seconds), job_id]
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / LOG_NAME, "ab") as log:
            # Own session: closing the app, a Streamlit rerun or Ctrl-C in a terminal leaves it alone.
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, close_fds=True)
        _SPAWNED[process.pid] = process
        return process

    # ----------------------------------------------------------------- dead-process detection
    def _check_running(self, row: dict[str, Any]) -> bool:
        """Mark a "running" job final if all its processes are gone. Returns True if it changed."""
        if row.get("host") and row["host"] != self.host:
            return False  # another machine's process: it cannot be checked from here
        if process_alive(row.get("supervisor_pid"), row.get("supervisor_created")):
            return False
        if process_alive(row.get("pid"), row.get("pid_created")):
            return False  # training outlived its supervisor; judged when it ends
        # Re-read: the supervisor may have recorded the outcome just before exiting.
        fresh = self.store.row(row["id"])
        if fresh is None or fresh["status"] != RUNNING:
            return False
        status, error = outcome_without_supervisor(fresh)
        return self.store.update(row["id"], only_if_status=(RUNNING,), status=status, finished=utc_now(), error=error)

    def _stop_orphan(self, row: dict[str, Any]) -> None:
        """Cancel a training process whose supervisor is gone: SIGTERM, wait, SIGKILL, record."""
        pid, started = row.get("pid"), row.get("pid_created")
        if process_alive(pid, started):
            _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.grace_seconds
            while process_alive(pid, started) and time.monotonic() < deadline:
                time.sleep(0.2)
            if process_alive(pid, started):
                kill_tree(pid)
        self.store.update(row["id"], only_if_status=(RUNNING,), status=CANCELLED, finished=utc_now(),
                          error="Cancelled by the user.")
        self.start_queued()

    @staticmethod
    def _reap_spawned() -> None:
        for pid, process in list(_SPAWNED.items()):
            if process.poll() is not None:
                del _SPAWNED[pid]


def outcome_without_supervisor(row: dict[str, Any]) -> tuple[str, str | None]:
    """Final status and reason for a job whose processes all vanished without recording an end."""
    run_dir = Path(row["run_dir"])
    progress = read_progress(run_dir) or {}
    if progress.get("state") == SUCCEEDED and (run_dir / "model" / "card.json").is_file():
        return SUCCEEDED, None
    if progress.get("state") == CANCELLED or row.get("cancel_requested"):
        return CANCELLED, "Cancelled by the user."
    reason = ("The training process stopped without reporting a result: it was killed (kill -9, out of "
              "memory) or the machine restarted.")
    return FAILED, reason


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (data-loader workers)."""
    try:
        parent = psutil.Process(pid)
        victims = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def free_disk_mb(path: Path) -> float:
    """Free space, in MB, on the disk holding ``path``."""
    return shutil.disk_usage(path).free / 1e6


def describe_exit(exit_code: int, log_path: Path) -> str:
    """A sentence for a training process that ended with a non-zero status."""
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        if -exit_code == getattr(signal, "SIGKILL", 9):
            return f"The training process was killed ({name}): out of memory, or killed by hand."
        return f"The training process was stopped by {name}."
    reason = error_from_log(tail_text(log_path))
    try:
        if free_disk_mb(log_path.parent) < 20:  # the log itself may not have had room for the error
            reason = "The disk holding the run directory is full (no space left on device)."
    except OSError:
        pass
    if exit_code == 2:
        return reason or "Training refused its input (exit status 2)."
    return f"Training crashed (exit status {exit_code}): {reason}" if reason else f"Training crashed (exit status {exit_code})."
