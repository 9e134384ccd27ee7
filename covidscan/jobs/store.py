"""The job database: one SQLite file (WAL mode) in the state directory, shared by every process.

Several app processes, CLI calls and job supervisors read and write it at once. Reads never block
(WAL); a change that must not race, such as "start the next queued job", runs inside
``BEGIN IMMEDIATE``, which takes SQLite's write lock up front so two processes cannot both see a
free slot and start the same job.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from covidscan.errors import JobError
from covidscan.jobs.base import JobRecord

DB_NAME = "jobs.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    backend TEXT NOT NULL,
    args TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    cwd TEXT,
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    error TEXT,
    exit_code INTEGER,
    host TEXT,
    pid INTEGER,
    pid_created REAL,
    supervisor_pid INTEGER,
    supervisor_created REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
"""

# Columns copied into JobRecord; the others are the runner's bookkeeping.
_RECORD_FIELDS = ("id", "name", "status", "created", "run_dir", "backend", "args", "started",
                  "finished", "error", "pid", "exit_code")


class JobStore:
    """Job rows in ``STATE_DIR/jobs.sqlite3``.

    Args:
        state_dir: The state directory (created if missing).
    """

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.path = self.state_dir / DB_NAME
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JobError(f"Cannot create the job state directory {self.state_dir}: {exc.strerror or exc}.") from exc
        with self._errors():
            connection = self._connect()
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.executescript(_SCHEMA)
            finally:
                connection.close()

    def _connect(self) -> sqlite3.Connection:
        # Autocommit mode: every transaction below is explicit. 30 s covers a busy writer.
        connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA busy_timeout=30000")
        return connection

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise JobError(f"The job database {self.path} cannot be used: {exc}.") from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed on success, rolled back on error."""
        with self._errors():
            connection = self._connect()
            try:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    yield connection
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
            finally:
                connection.close()

    def insert(self, record: JobRecord, cwd: str | None = None) -> None:
        """Add a new job."""
        with self.transaction() as connection:
            connection.execute(
                "INSERT INTO jobs (id, name, status, backend, args, run_dir, cwd, created) VALUES (?,?,?,?,?,?,?,?)",
                (record.id, record.name, record.status, record.backend, json.dumps(record.args),
                 record.run_dir, cwd, record.created),
            )

    def row(self, job_id: str) -> dict[str, Any] | None:
        """The job's full row (bookkeeping included) or None."""
        with self._errors():
            connection = self._connect()
            try:
                found = connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            finally:
                connection.close()
        return dict(found) if found else None

    def rows(self, where: str = "", params: tuple = ()) -> list[dict[str, Any]]:
        """Full rows, oldest first, optionally filtered by an SQL condition."""
        query = "SELECT * FROM jobs" + (f" WHERE {where}" if where else "") + " ORDER BY seq"
        with self._errors():
            connection = self._connect()
            try:
                return [dict(found) for found in connection.execute(query, params).fetchall()]
            finally:
                connection.close()

    def update(self, job_id: str, only_if_status: tuple[str, ...] | None = None,
               connection: sqlite3.Connection | None = None, **fields: Any) -> bool:
        """Set fields of a job; with ``only_if_status``, only while its status is one of those.

        Returns:
            True when a row changed (False: unknown id, or its status had moved on).
        """
        if not fields:
            return False
        assignments = ", ".join(f"{name} = ?" for name in fields)
        params: list[Any] = [json.dumps(value) if name == "args" else value for name, value in fields.items()]
        query = f"UPDATE jobs SET {assignments} WHERE id = ?"
        params.append(job_id)
        if only_if_status:
            query += f" AND status IN ({','.join('?' * len(only_if_status))})"
            params += list(only_if_status)
        if connection is not None:
            return connection.execute(query, params).rowcount > 0
        with self.transaction() as own:
            return own.execute(query, params).rowcount > 0


def record_from_row(row: dict[str, Any]) -> JobRecord:
    """The public JobRecord for a database row."""
    values = {name: row[name] for name in _RECORD_FIELDS}
    values["args"] = json.loads(values["args"] or "[]")
    return JobRecord(**values)
