"""The Ray backend: the same jobs, run on a Ray cluster through Ray's Job Submission API.

Each job is submitted with ``JobSubmissionClient.submit_job`` as the shell command
``python -m covidscan train ARGS --out RUN_DIR`` (submission id = job id, ``entrypoint_num_gpus``
= the GPUs it reserves). Ray schedules it on a node with those resources, runs it in a process
group, and ``stop_job`` sends SIGTERM and then SIGKILL (after ``RAY_JOB_STOP_WAIT_TIME_S``), so
cancelling behaves like the local backend. Ray's states map onto ours: PENDING → queued,
RUNNING → running, SUCCEEDED → succeeded, FAILED → failed, STOPPED → cancelled.

**The shared run directory.** Metrics (``metrics.csv``, ``progress.json``), the config and the
best model bundle are written by the training process on whichever Ray node runs it, straight into
``RUN_DIR``. So ``runs_dir`` (default ``STATE_DIR/runs``) must be a path that is the same on the
machine running the app and on every Ray node: a shared filesystem (NFS, CephFS, a Kubernetes
ReadWriteMany volume, or simply the one machine when the app runs on the head node). Nothing is
copied back through Ray's object store or working-dir upload (``runtime_env.working_dir`` only
ships code *to* the job and has a size limit, which model bundles exceed). Training's own output
is also kept by Ray (``get_job_logs``); when a job ends, the runner saves it as
``RUN_DIR/train.log`` beside the metrics and the bundle. Dataset paths in the train arguments are
opened on the Ray node, so they too must be absolute paths on shared storage.

Job records are kept in the same SQLite job database as local jobs, so ``covidscan jobs list``
and the Train page show both.
"""
from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from covidscan.errors import JobError
from covidscan.jobs.base import (
    CANCELLED, FAILED, LOG_NAME, MODEL_DIR_NAME, QUEUED, RUNNING, SUCCEEDED, TERMINAL_STATES, JobRecord, JobRunner,
    default_state_dir, error_from_log, job_command, utc_now,
)
from covidscan.jobs.store import JobStore, record_from_row

RAY_PYTHON_ENV = "COVIDSCAN_RAY_PYTHON"
RAY_GPUS_ENV = "COVIDSCAN_RAY_GPUS"

_STATUS_FROM_RAY = {"PENDING": QUEUED, "RUNNING": RUNNING, "SUCCEEDED": SUCCEEDED, "FAILED": FAILED,
                    "STOPPED": CANCELLED}


def _iso_from_ms(milliseconds: int | None) -> str | None:
    if not milliseconds:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc).isoformat(timespec="seconds")


class RayRunner(JobRunner):
    """Runs jobs on a Ray cluster.

    Args:
        address: The Ray dashboard / job server address, e.g. ``http://head-node:8265``.
        state_dir: Job database folder (default ``default_state_dir()``).
        num_gpus: GPUs each job reserves (``entrypoint_num_gpus``); default ``$COVIDSCAN_RAY_GPUS`` or 0.
        num_cpus: CPUs each job reserves (``entrypoint_num_cpus``).
        runs_dir: Shared folder for run directories (default ``STATE_DIR/runs``), see the module doc.
        python: The Python on the Ray nodes that has covidscan installed; default
            ``$COVIDSCAN_RAY_PYTHON`` or ``python``.
    """

    backend = "ray"

    def __init__(self, address: str, state_dir: str | os.PathLike | None = None, num_gpus: float | None = None,
                 num_cpus: float = 1.0, runs_dir: str | os.PathLike | None = None, python: str | None = None) -> None:
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise JobError("The Ray backend needs Ray: install it with `pip install 'covidscan[ray]'`.") from None
        self.address = address
        try:
            self.client = JobSubmissionClient(address)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError ...
            raise JobError(f"Cannot reach the Ray cluster at {address}: {exc}") from exc
        self.store = JobStore(state_dir if state_dir is not None else default_state_dir())
        self.state_dir = self.store.state_dir
        self.runs_dir = Path(runs_dir).expanduser().resolve() if runs_dir else self.state_dir / "runs"
        if num_gpus is None:
            num_gpus = float(os.environ.get(RAY_GPUS_ENV, "0") or 0)
        self.num_gpus = float(num_gpus)
        self.num_cpus = float(num_cpus)
        self.python = python or os.environ.get(RAY_PYTHON_ENV) or "python"

    def submit(self, train_args: Sequence[str] | Mapping[str, Any] = (), name: str | None = None,
               config: Mapping[str, Any] | None = None) -> JobRecord:
        record = self._register(train_args, name, self.runs_dir, config)
        job_id, run_dir, args = record.id, Path(record.run_dir), record.args
        entrypoint = shlex.join([self.python, "-m", "covidscan", *job_command(args), "--out", str(run_dir)])
        try:
            self.client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                entrypoint_num_cpus=self.num_cpus,
                entrypoint_num_gpus=self.num_gpus or None,
                metadata={"covidscan_name": record.name, "covidscan_run_dir": str(run_dir)},
                runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}},
            )
        except Exception as exc:
            self.store.update(job_id, status=FAILED, finished=utc_now(), error=f"Ray refused the job: {exc}")
            raise JobError(f"The Ray cluster at {self.address} refused the job: {exc}") from exc
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        row = self.store.row(job_id)
        if row is None:
            raise JobError(f"No job with id {job_id!r} in {self.state_dir}. `covidscan jobs list` shows the jobs.")
        if row["backend"] == self.backend and row["status"] not in TERMINAL_STATES:
            self._refresh(row)
            row = self.store.row(job_id) or row
        return record_from_row(row)

    def list(self) -> list[JobRecord]:
        for row in self.store.rows("backend = ? AND status IN (?, ?)", (self.backend, QUEUED, RUNNING)):
            self._refresh(row)
        return [record_from_row(row) for row in self.store.rows()]

    def cancel(self, job_id: str, wait: float = 0.0) -> JobRecord:
        record = self.get(job_id)
        if record.done or record.backend != self.backend:
            return record
        self.store.update(job_id, cancel_requested=1)
        try:
            self.client.stop_job(job_id)  # SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S
        except Exception as exc:
            raise JobError(f"Ray could not stop job {job_id}: {exc}") from exc
        if self.get(job_id).status == QUEUED:
            # Ray keeps a job that never got its resources PENDING after stop_job
            # (ray-project/ray#58353): the stop request waits for the job's supervisor actor, which
            # stops the job as soon as it is scheduled, and Ray fails it after its start timeout.
            # It will never train, so it is cancelled as far as the user is concerned.
            self.store.update(job_id, only_if_status=(QUEUED,), status=CANCELLED, finished=utc_now(),
                              error="Cancelled before it started.")
        return self.wait(job_id, timeout=wait, poll_seconds=0.5) if wait > 0 else self.get(job_id)

    def logs(self, job_id: str) -> str:
        record = self.get(job_id)
        if record.done and record.log_path.is_file():
            return record.log_path.read_text(encoding="utf-8", errors="replace")
        try:
            return self.client.get_job_logs(job_id)
        except Exception as exc:
            raise JobError(f"Ray has no logs for job {job_id}: {exc}") from exc

    def follow_logs(self, job_id: str, poll_seconds: float = 1.0) -> Iterator[str]:
        shown = 0
        while True:
            record = self.get(job_id)
            text = self.logs(job_id)
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)
            if record.done:
                return
            time.sleep(poll_seconds)

    def _refresh(self, row: dict[str, Any]) -> None:
        """Bring one unfinished job's record up to date with Ray's job table."""
        job_id = row["id"]
        try:
            info = self.client.get_job_info(job_id)
        except Exception as exc:
            if "does not exist" in str(exc):
                self.store.update(job_id, only_if_status=(QUEUED, RUNNING), status=FAILED, finished=utc_now(),
                                  error="The Ray cluster has no record of this job (was it restarted?).")
            return  # cluster unreachable: keep the last known state
        status = _STATUS_FROM_RAY.get(str(getattr(info.status, "value", info.status)), row["status"])
        fields: dict[str, Any] = {"status": status}
        if status != QUEUED and not row["started"]:
            fields["started"] = _iso_from_ms(info.start_time) or utc_now()
        if status in TERMINAL_STATES:
            fields.update(finished=_iso_from_ms(info.end_time) or utc_now(), exit_code=info.driver_exit_code)
            log_text = self._save_log(job_id, Path(row["run_dir"]))
            if status == FAILED:
                fields["error"] = error_from_log(log_text) or info.message or "The job failed on the Ray cluster."
            elif status == CANCELLED:
                fields["error"] = "Cancelled by the user."
            elif not (Path(row["run_dir"]) / MODEL_DIR_NAME / "card.json").is_file():
                fields.update(status=FAILED, error=(
                    f"Training finished on the Ray cluster, but its model bundle is not in {row['run_dir']}: "
                    "the run directory must be on storage shared with the Ray nodes."))
        self.store.update(job_id, only_if_status=(QUEUED, RUNNING), **fields)

    def _save_log(self, job_id: str, run_dir: Path) -> str:
        try:
            text = self.client.get_job_logs(job_id)
        except Exception:
            return ""
        try:
            (run_dir / LOG_NAME).write_text(text, encoding="utf-8")
        except OSError:
            pass  # the log is still in Ray
        return text

