"""Training jobs that outlive the app: a local process runner (default) or a Ray cluster.

Use ``get_runner()`` and the ``JobRunner`` methods::

    runner = get_runner()                        # local; or get_runner(ray_address="http://head:8265")
    job = runner.submit(["--dataset", "folder", "--root", "data/ct", "--arch", "tiny_cnn"], name="ct-1")
    runner.get(job.id).status                    # queued / running / succeeded / failed / cancelled
    runner.progress(job.id), runner.metrics(job.id), runner.logs(job.id)
    runner.cancel(job.id)
    Predictor(runner.get(job.id).model_dir)      # once it succeeded

Job records live in ``STATE_DIR/jobs.sqlite3`` and run directories in ``STATE_DIR/runs/<id>``;
``STATE_DIR`` is ``$COVIDSCAN_STATE_DIR`` or the user's data directory.
"""
from __future__ import annotations

import os
from pathlib import Path

from covidscan.jobs.base import (
    CANCELLED, FAILED, QUEUED, RUNNING, STATE_DIR_ENV, STATES, SUCCEEDED, TERMINAL_STATES, JobRecord, JobRunner,
    default_state_dir, read_metrics, read_progress, train_args_from,
)

RAY_ADDRESS_ENV = "COVIDSCAN_RAY_ADDRESS"

__all__ = [
    "CANCELLED", "FAILED", "QUEUED", "RUNNING", "STATES", "SUCCEEDED", "TERMINAL_STATES", "STATE_DIR_ENV",
    "RAY_ADDRESS_ENV", "JobRecord", "JobRunner", "default_state_dir", "get_runner", "read_metrics",
    "read_progress", "train_args_from",
]


def get_runner(state_dir: str | os.PathLike | None = None, ray_address: str | None = None,
               concurrency: int | None = None, num_gpus: float | None = None,
               runs_dir: str | os.PathLike | None = None) -> JobRunner:
    """The configured job runner.

    Args:
        state_dir: Job database folder; default ``$COVIDSCAN_STATE_DIR`` or the user data dir.
        ray_address: A Ray dashboard address (``http://head:8265``); default
            ``$COVIDSCAN_RAY_ADDRESS``. Without one, jobs run as local processes.
        concurrency: Local backend: how many jobs run at once (default 1, or
            ``$COVIDSCAN_JOBS_CONCURRENCY``).
        num_gpus: Ray backend: GPUs each job reserves (default 1 if the cluster has GPUs, else 0).
        runs_dir: Ray backend: the shared folder for run directories (default ``STATE_DIR/runs``).

    Returns:
        A LocalRunner or a RayRunner.
    """
    state = Path(state_dir) if state_dir is not None else default_state_dir()
    address = ray_address or os.environ.get(RAY_ADDRESS_ENV) or None
    if address:
        from covidscan.jobs.ray_backend import RayRunner

        return RayRunner(address, state_dir=state, num_gpus=num_gpus, runs_dir=runs_dir)
    from covidscan.jobs.local import LocalRunner

    return LocalRunner(state, concurrency=concurrency)
