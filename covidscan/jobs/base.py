"""What every job backend shares: the job record, the runner interface, and run-directory readers.

A *job* is one ``covidscan train`` run. Its run directory (chosen by the runner, never by the
caller) holds ``config.json``, ``metrics.csv``, ``progress.json``, ``train.log`` and the best
model bundle ``model/`` (see the run-directory contract in the README), so progress and results
are read from files, whichever backend ran the job.
"""
from __future__ import annotations

import abc
import csv
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from covidscan.errors import JobError

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)

STATE_DIR_ENV = "COVIDSCAN_STATE_DIR"
LOG_NAME = "train.log"
MODEL_DIR_NAME = "model"
# Train options the runner sets itself: the run directory belongs to the runner.
RESERVED_TRAIN_OPTIONS = ("--out",)
# A job submitted with a whole configuration runs `covidscan train --config RUN_DIR/config.json`; training
# rewrites the file at start with what it resolved, so a queued run's options can be read from it too.
LAUNCH_CONFIG_NAME = "config.json"


@dataclass
class JobRecord:
    """One training job as stored in the job database.

    Attributes:
        id: Job id (also the run directory's name and, on Ray, the submission id).
        name: Human-readable name given at submission.
        status: One of queued, running, succeeded, failed, cancelled.
        created / started / finished: ISO-8601 UTC times, or None.
        run_dir: Absolute path of the job's run directory.
        error: Why the job failed (a sentence for the user), else None.
        pid: The training process id (local backend, while known), else None.
        backend: "local" or "ray".
        args: The ``covidscan train`` arguments, without ``--out``.
        exit_code: The training process's exit status once known.
    """

    id: str
    name: str
    status: str
    created: str
    run_dir: str
    backend: str
    args: list[str] = field(default_factory=list)
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    pid: int | None = None
    exit_code: int | None = None

    @property
    def done(self) -> bool:
        """True once the job has reached a final state."""
        return self.status in TERMINAL_STATES

    @property
    def model_dir(self) -> Path:
        """Where the job's best model bundle is (or will be)."""
        return Path(self.run_dir) / MODEL_DIR_NAME

    @property
    def log_path(self) -> Path:
        return Path(self.run_dir) / LOG_NAME

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``covidscan jobs list --json`` prints)."""
        return asdict(self)


def utc_now() -> str:
    """The current time as ISO-8601 UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_job_id() -> str:
    """A sortable, unique, path-safe id such as ``20261123-225801-3fa2c1``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def default_state_dir() -> Path:
    """Where job records live: ``$COVIDSCAN_STATE_DIR``, else the user's data dir for covidscan."""
    override = os.environ.get(STATE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("covidscan"))


def train_args_from(config: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """Turn train arguments or a TrainConfig-like dict into a ``covidscan train`` argument list.

    Args:
        config: Either the argument list (``["--dataset", "folder", ...]``) or a mapping whose keys
            are option names (``{"dataset": "folder", "epochs": 3, "freeze_backbone": True}``):
            ``_`` becomes ``-``, True adds a bare flag, False/None leave the option out, and a
            list or tuple gives the option several values.

    Returns:
        The argument list, checked: strings only, and no ``--out`` (the runner picks the run dir).
    """
    if isinstance(config, Mapping):
        args: list[str] = []
        for key, value in config.items():
            option = "--" + str(key).replace("_", "-")
            if value is None or value is False:
                continue
            if value is True:
                args.append(option)
            elif isinstance(value, (list, tuple)):
                args += [option, *(str(item) for item in value)]
            else:
                args += [option, str(value)]
    elif isinstance(config, (str, bytes)):
        raise JobError("Train arguments must be a list of arguments, not one string.")
    else:
        args = [str(arg) for arg in config]
    if args and args[0] == "train":  # tolerate "covidscan jobs submit -- train --dataset ..."
        args = args[1:]
    # A leading "cv" stays: that job runs `covidscan cv` (cross-validation) instead of `covidscan train`.
    for arg in args:
        if arg.split("=", 1)[0] in RESERVED_TRAIN_OPTIONS:
            raise JobError(f"Do not pass {arg.split('=', 1)[0]}: the job runner chooses each job's run directory.")
    return args


#: Commands a job can run besides the default ``train``, named by the first argument.
JOB_COMMANDS = ("cv",)


def job_command(args: Sequence[str]) -> list[str]:
    """The ``covidscan`` command line a job's arguments stand for (``--out`` is added by the runner).

    Args:
        args: a job record's arguments: ``covidscan train`` options, or ``["cv", ...]`` for cross-validation.

    Returns:
        e.g. ``["train", "--dataset", ...]`` or ``["cv", "--folds", "5", ...]``.
    """
    args = list(args)
    return args if args[:1] and args[0] in JOB_COMMANDS else ["train", *args]


def read_progress(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The job's ``progress.json`` as a dict, or None when it is missing or being rewritten."""
    try:
        data = json.loads((Path(run_dir) / "progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float | int | None]]:
    """The job's ``metrics.csv`` rows (one per epoch) with numbers parsed; [] before the first epoch."""
    path = Path(run_dir) / "metrics.csv"
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    parsed = []
    for row in rows:
        if None in row or any(value is None for value in row.values()):
            continue  # a row still being written
        parsed.append({key: _number(value) for key, value in row.items()})
    return parsed


def _number(text: str) -> float | int | None:
    text = text.strip()
    if text == "" or text.lower() in ("nan", "none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


def error_from_log(log_text: str) -> str | None:
    """The user-facing reason a training run gave up, taken from its log, if it printed one.

    ``covidscan train`` prints ``covidscan: error: <message>`` for bad input; anything else is
    the last line of a Python traceback. A full disk is named as such whatever printed it.
    """
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    if any("No space left on device" in line or "Disk quota exceeded" in line for line in lines[-50:]):
        return "The disk holding the run directory is full (no space left on device)."
    for line in reversed(lines):
        if line.startswith("covidscan: error:"):
            return line[len("covidscan: error:"):].strip()
    for line in reversed(lines):
        if not line.startswith("[covidscan jobs]"):
            return line[:500]
    return None


def tail_text(path: Path, max_bytes: int = 64_000) -> str:
    """The end of a text file (empty when it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class JobRunner(abc.ABC):
    """The interface the Train page and ``covidscan jobs`` use, whatever runs the jobs.

    ``submit`` returns at once; the job runs outside the calling process. Every read
    (``get``, ``list``) first brings the records up to date with reality (finished or dead
    processes, Ray's job table), so a job is never shown "running" after it has died.
    """

    backend: str = ""

    @abc.abstractmethod
    def submit(self, train_args: Sequence[str] | Mapping[str, Any] = (), name: str | None = None,
               config: Mapping[str, Any] | None = None) -> JobRecord:
        """Queue a ``covidscan train`` run.

        Args:
            train_args: ``covidscan train`` arguments (without ``--out``), or a TrainConfig-like
                dict (see ``train_args_from``).
            name: A label for lists; defaults to the job id.
            config: A whole training configuration (``TrainConfig.to_dict()``): it is written to
                ``RUN_DIR/config.json`` and the job runs ``covidscan train --config`` that file
                (``train_args``, if any, follow and override it).

        Returns:
            The new job's record (status queued, or running if a slot was free).
        """

    def _register(self, train_args: Sequence[str] | Mapping[str, Any], name: str | None, runs_dir: Path,
                  config: Mapping[str, Any] | None = None) -> JobRecord:
        """Create a new job's run directory under ``runs_dir`` (with its launch config) and store its queued record.

        Needs ``self.store`` (a JobStore) from the backend.
        """
        args = train_args_from(train_args)
        job_id = new_job_id()
        run_dir = runs_dir / job_id
        try:
            run_dir.mkdir(parents=True)
        except OSError as exc:
            raise JobError(f"Cannot create the run directory {run_dir}: {exc.strerror or exc}.") from exc
        if config is not None:
            from covidscan.utils import atomic_write_text

            path = run_dir / LAUNCH_CONFIG_NAME
            atomic_write_text(path, json.dumps(dict(config), indent=2, default=str) + "\n")
            command = args[:1] if args[:1] and args[0] in JOB_COMMANDS else []  # e.g. cv stays first
            args = [*command, "--config", str(path), *args[len(command):]]
        record = JobRecord(id=job_id, name=(name or "").strip() or job_id, status=QUEUED, created=utc_now(),
                           run_dir=str(run_dir), backend=self.backend, args=args)
        self.store.insert(record, cwd=os.getcwd())
        return record

    @abc.abstractmethod
    def get(self, job_id: str) -> JobRecord:
        """The job's current record. Raises JobError for an unknown id."""

    @abc.abstractmethod
    def list(self) -> list[JobRecord]:
        """All jobs in the state directory, oldest first."""

    @abc.abstractmethod
    def cancel(self, job_id: str, wait: float = 0.0) -> JobRecord:
        """Stop a queued or running job (SIGTERM, then SIGKILL after a grace period).

        Args:
            job_id: The job.
            wait: Seconds to wait for it to reach a final state before returning.

        Returns:
            The job's record afterwards. Cancelling a finished job changes nothing.
        """

    def logs(self, job_id: str) -> str:
        """The job's log so far (training output and the runner's own notes)."""
        return tail_text(self.get(job_id).log_path, max_bytes=4_000_000)

    def follow_logs(self, job_id: str, poll_seconds: float = 0.5) -> Iterator[str]:
        """Yield the log as it grows, until the job reaches a final state."""
        record = self.get(job_id)
        offset = 0
        while True:
            chunk, offset = _read_from(record.log_path, offset)
            if chunk:
                yield chunk
            if record.done:
                chunk, offset = _read_from(record.log_path, offset)
                if chunk:
                    yield chunk
                return
            time.sleep(poll_seconds)
            record = self.get(job_id)

    def progress(self, job_id: str) -> dict[str, Any] | None:
        """The job's ``progress.json`` (state, epoch, step, ETA, ...) or None before training starts."""
        return read_progress(self.get(job_id).run_dir)

    def metrics(self, job_id: str) -> list[dict[str, float | int | None]]:
        """The job's per-epoch metrics from ``metrics.csv``."""
        return read_metrics(self.get(job_id).run_dir)

    def wait(self, job_id: str, timeout: float | None = None, poll_seconds: float = 0.5) -> JobRecord:
        """Block until the job reaches a final state (or ``timeout`` seconds pass) and return it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        record = self.get(job_id)
        while not record.done and (deadline is None or time.monotonic() < deadline):
            time.sleep(poll_seconds)
            record = self.get(job_id)
        return record


def _read_from(path: Path, offset: int) -> tuple[str, int]:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return "", offset
    return data.decode("utf-8", errors="replace"), offset + len(data)
