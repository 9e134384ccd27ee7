"""Batch inputs: the images inside a ZIP archive or a folder, read in memory, with hard limits.

Used by ``covidscan predict`` (a folder, searched recursively, or a .zip) and the Predict page
(a ZIP upload). An archive is never extracted to disk: each member is read into memory, at most
``limits.max_member_bytes`` of it, whatever its header claims. Archives that are too large, have
too many members, or would inflate beyond the limits (zip bombs) are refused as a whole; a member
with an unsafe name (``..``, an absolute path), too deep a folder, or that is itself an archive is
refused on its own, with the reason, and the rest of the batch carries on.
"""
from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from covidscan.errors import CovidscanError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".dcm", ".dicom"}
ARCHIVE_SUFFIXES = {".zip", ".gz", ".tgz", ".tar", ".7z", ".rar", ".bz2", ".xz"}


class BatchError(CovidscanError):
    """A whole batch input (archive or folder) is refused."""


class _TooLarge(Exception):
    """A member's real content exceeds its reading budget."""


@dataclass(frozen=True)
class BatchLimits:
    """What one batch may hold.

    Attributes:
        max_members: files (images or not) in one archive or folder.
        max_total_bytes: uncompressed bytes of all the images read.
        max_member_bytes: uncompressed bytes of one image.
        max_depth: folders deep a file may sit inside the archive or folder.
        max_ratio: uncompressed / compressed size of one member beyond which it is a zip bomb.
    """

    max_members: int = 2000
    max_total_bytes: int = 1024 * 1024 * 1024
    max_member_bytes: int = 128 * 1024 * 1024
    max_depth: int = 10
    max_ratio: float = 200.0


DEFAULT_LIMITS = BatchLimits()


@dataclass
class BatchItem:
    """One file of a batch: its name (path inside the archive or folder) and bytes, or why it was refused."""

    name: str
    data: bytes | None = None
    error: str | None = None


def is_archive_name(name: str) -> bool:
    """True for a file name that looks like an archive (.zip, .tar.gz ...)."""
    return PurePosixPath(name.lower()).suffix in ARCHIVE_SUFFIXES


def _is_candidate(name: str) -> bool:
    """An image by its suffix, or a suffix-less file (DICOM files often have none)."""
    suffix = PurePosixPath(name.lower()).suffix
    return suffix in IMAGE_SUFFIXES or suffix == "" or suffix.lstrip(".").isdigit()


def _is_hidden(parts: Iterable[str]) -> bool:
    # macOS resource forks, .DS_Store and the like: not the user's images.
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def zip_items(data: bytes, limits: BatchLimits = DEFAULT_LIMITS) -> list[BatchItem]:
    """The images inside a ZIP archive (given as bytes), read in memory.

    Args:
        data: the archive's bytes.
        limits: what the archive may hold.

    Returns:
        One item per image-like member, in archive order; unsafe, nested-archive or oversized
        members come back with ``error`` set. Other files (text, hidden files) are left out.

    Raises:
        BatchError: not a ZIP, too many members, or too much uncompressed data.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BatchError(f"This is not a readable ZIP archive ({exc}).") from None
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if len(members) > limits.max_members:
            raise BatchError(f"The archive holds {len(members)} files; at most {limits.max_members} are read.")
        declared = sum(info.file_size for info in members)
        if declared > limits.max_total_bytes:
            raise BatchError(f"The archive would unpack to {declared / 2**20:.0f} MiB; at most "
                             f"{limits.max_total_bytes / 2**20:.0f} MiB are read.")
        items: list[BatchItem] = []
        total = 0
        for info in members:
            name = info.filename
            problem = _member_problem(info, limits)
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if problem is None and (_is_hidden(parts) or not (_is_candidate(name) or is_archive_name(name))):
                continue
            if problem is None and is_archive_name(name):
                problem = "an archive inside the archive: nested archives are not opened."
            if problem is not None:
                items.append(BatchItem(name, error=problem))
                continue
            remaining = limits.max_total_bytes - total
            try:
                content = _read_member(archive, info, min(limits.max_member_bytes, remaining))
            except _TooLarge:
                if remaining <= limits.max_member_bytes:
                    raise BatchError(f"The archive inflates beyond {limits.max_total_bytes / 2**20:.0f} MiB in all "
                                     "(its headers understate the sizes): refused as a likely zip bomb.") from None
                items.append(BatchItem(name, error=f"inflates beyond {limits.max_member_bytes / 2**20:.0f} MiB "
                                                   "(its header understates its size): refused."))
                continue
            except (RuntimeError, zipfile.BadZipFile, OSError, NotImplementedError, EOFError) as exc:
                items.append(BatchItem(name, error=f"this member cannot be read ({exc})."))
                continue
            total += len(content)
            items.append(BatchItem(name, data=content))
        return items


def _member_problem(info: zipfile.ZipInfo, limits: BatchLimits) -> str | None:
    """Why a member is refused by its header alone (unsafe name, depth, size, ratio), or None."""
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
        return "unsafe path in the archive (absolute, a drive, or '..'): refused."
    if len(parts) - 1 > limits.max_depth:
        return f"nested {len(parts) - 1} folders deep; at most {limits.max_depth} are read."
    if info.file_size > limits.max_member_bytes:
        return (f"{info.file_size / 2**20:.0f} MiB uncompressed; one file may be at most "
                f"{limits.max_member_bytes / 2**20:.0f} MiB.")
    if info.compress_size > 0 and info.file_size > 1024 * 1024 and info.file_size / info.compress_size > limits.max_ratio:
        return (f"compressed {info.file_size / info.compress_size:.0f} to 1, far beyond any image: "
                "refused as a likely zip bomb.")
    return None


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    """A member's bytes, never more than ``budget`` (a header may understate the real size)."""
    chunks = []
    size = 0
    with archive.open(info) as stream:
        while True:
            chunk = stream.read(1024 * 1024)
            if not chunk:
                break
            size += len(chunk)
            if size > budget:
                raise _TooLarge()
            chunks.append(chunk)
    return b"".join(chunks)


def folder_items(folder: str | os.PathLike, limits: BatchLimits = DEFAULT_LIMITS) -> list[BatchItem]:
    """The images in a folder and its sub-folders (sorted by path), read into memory.

    Symbolic links are not followed (no loops, nothing outside the folder). ZIP archives inside
    are listed with an error: nested archives are not opened.

    Raises:
        BatchError: too many files or too many bytes.
    """
    root = Path(folder)
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root, followlinks=False):
        relative = Path(directory).relative_to(root)
        depth = len(relative.parts)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and depth < limits.max_depth)
        for file in files:
            path = Path(directory) / file
            if file.startswith(".") or path.is_symlink():
                continue
            if _is_candidate(file) or is_archive_name(file):
                found.append(path)
            if len(found) > limits.max_members:
                raise BatchError(f"{root} holds more than {limits.max_members} files; at most that many are read.")
    items: list[BatchItem] = []
    total = 0
    for path in sorted(found):
        name = path.relative_to(root).as_posix()
        if is_archive_name(name):
            items.append(BatchItem(name, error="an archive inside the folder: nested archives are not opened."))
            continue
        size = path.stat().st_size
        if size > limits.max_member_bytes:
            items.append(BatchItem(name, error=f"{size / 2**20:.0f} MiB; one file may be at most "
                                               f"{limits.max_member_bytes / 2**20:.0f} MiB."))
            continue
        total += size
        if total > limits.max_total_bytes:
            raise BatchError(f"The files in {root} add up to more than {limits.max_total_bytes / 2**20:.0f} MiB.")
        items.append(BatchItem(name, data=path.read_bytes()))
    return items


def expand_inputs(paths: Iterable[str], limits: BatchLimits = DEFAULT_LIMITS) -> Iterator[BatchItem]:
    """The CLI's inputs as batch items: a file as itself, a folder's images, a .zip's images.

    Names are the path given, and for folder and archive contents ``PATH/member``. A folder or
    archive that is refused as a whole gives one item with the error.
    """
    for given in paths:
        path = Path(given)
        try:
            if path.is_dir():
                members = folder_items(path, limits)
            elif path.suffix.lower() == ".zip" and path.is_file():
                if path.stat().st_size > limits.max_total_bytes:
                    raise BatchError(f"The archive is larger than {limits.max_total_bytes / 2**20:.0f} MiB.")
                members = zip_items(path.read_bytes(), limits)
            else:
                yield BatchItem(given, data=None)  # a plain file: the caller reads it (and reports its errors)
                continue
        except BatchError as exc:
            yield BatchItem(given, error=str(exc))
            continue
        except OSError as exc:
            yield BatchItem(given, error=f"cannot be read ({exc.strerror or exc}).")
            continue
        if not members:
            yield BatchItem(given, error="no image or DICOM files were found in it.")
        for item in members:
            yield BatchItem(f"{given.rstrip('/')}/{item.name}", item.data, item.error)
