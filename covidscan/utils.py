"""Small helpers every long-running command shares: seeding, device choice, SIGTERM, atomic writes,
file checksums, logging.

Cheap to import: numpy and torch are imported by the functions that need them (the job runner uses
the atomic writes without torch).
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and GPU) for reproducible runs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``name``: "auto" (or None) is the GPU when there is one, else the CPU.

    Args:
        name: "auto", "cpu", "cuda", "cuda:N" or a torch.device.

    Returns:
        The device.
    """
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def install_sigterm(stop_event: threading.Event):
    """Make SIGTERM set ``stop_event`` (main thread only); returns the handler to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_event.set())
    return previous


def restore_sigterm(previous) -> None:
    """Put back the SIGTERM handler :func:`install_sigterm` replaced."""
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigterm_stops(stop_event: threading.Event) -> Iterator[threading.Event]:
    """While active, SIGTERM sets ``stop_event`` (in the main thread); the old handler is put back after."""
    previous = install_sigterm(stop_event)
    try:
        yield stop_event
    finally:
        restore_sigterm(previous)


@contextmanager
def failure_recorded(record: Callable[[str], None]) -> Iterator[None]:
    """Record why a run failed, then let the exception go on.

    Args:
        record: called with the message: a CovidscanError's own text (bad data or options, said to
            the user as it is), or "unexpected error: ..." for anything else.
    """
    from covidscan.errors import CovidscanError

    try:
        yield
    except CovidscanError as exc:
        record(str(exc))
        raise
    except BaseException as exc:
        record(f"unexpected error: {exc!r}")
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], mode: int | None = 0o644) -> None:
    """Write a file so that readers see the old or the new content, never half of it.

    Args:
        path: the file to (re)write.
        write: writes the content to the temporary path it is given (same folder, so the rename is atomic).
        mode: permissions of the result (readable by others by default: the app may run as another user).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (the checksum cards record for weights, gates and ONNX exports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def log(message: str) -> None:
    """Print a time-stamped line (what training and pretraining logs are made of)."""
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)
