"""Files that are either the old version or the complete new one: every output goes through here.

A crash, a full disk or Ctrl-C never leaves a half-written file under its final name: data is
written to a temporary name in the same folder (so the rename cannot cross file systems),
flushed to disk, given the user's umask (``mkstemp`` would make it private) and renamed into
place with ``os.replace``. Temporary names (``.<stem>.<8 random>.tmp<suffix>``, the suffix kept
for encoders that pick a format by it) are recognisable, so that a process that holds a folder's
lock (:func:`exclusive_lock`) can remove those a killed writer left (:func:`remove_temporaries`).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import tempfile
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_target(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it vanishes.

    For writers that need a file name rather than bytes (video encoders, ``safetensors.save_file``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # after the writer: some (safetensors) replace the file they are given
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    path = Path(path)
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return path


def atomic_copy(source: Path | str, target: Path | str) -> Path:
    """Make ``target`` a complete copy of ``source`` atomically: a hard link where the file system
    has them (checkpoints are never modified in place, only replaced), else a copy."""
    source, target = Path(source), Path(target)
    tmp = target.with_name(f".{target.stem}.{secrets.token_hex(4)}.tmp{target.suffix}")
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write_bytes(target, source.read_bytes())
    return target


def write_files_atomically(folder: Path | str, files: dict[str, bytes]) -> list[Path]:
    """Write ``{name: bytes}`` into ``folder`` (created if needed): every file is written in full
    under a temporary name first, then all are renamed in the dict's order (so a file that names
    others, like an OBJ naming its MTL, lands last). A failure leaves no partial file and the
    earlier versions in place. OSErrors become :class:`UserError`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            # entered in reverse so that the stack, unwinding last-in first-out, renames in order
            staged = {name: stack.enter_context(atomic_target(folder / name)) for name in reversed(files)}
            for name, data in files.items():
                with open(staged[name], "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
        return [folder / name for name in files]
    except OSError as exc:
        raise UserError(f"cannot write to {folder}: {exc.strerror or exc}") from None


TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
"""Names :func:`atomic_target` and :func:`atomic_copy` give their temporary files."""


def remove_temporaries(folder: Path | str) -> list[Path]:
    """Remove the temporary files of atomic writes in ``folder`` (not below it) that a killed
    process left; returns them. Call it only while holding the lock of every process that writes
    there (:func:`exclusive_lock`): a live writer's temporary file looks the same."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no such folder (yet), or not readable: nothing to clear
        return removed
    for entry in entries:
        if TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except OSError:  # gone already, or not ours to remove: harmless either way
                continue
            removed.append(Path(entry.path))
    return removed


RUN_LOCK = ".lock"
"""A run folder's lock file: held (``flock``) by the process that trains in the folder, or empties it."""


@contextmanager
def exclusive_lock(path: Path | str, busy: str) -> Iterator[None]:
    """Hold an OS lock (``flock``) on the file ``path`` (created if needed) for the block.

    The kernel drops it when the block ends or the process dies, ``kill -9`` included, so no lock is
    ever left stale. While it is held, another process (or another call in this one) gets a
    :class:`UserError`: ``"<busy> (pid N on HOST)"``, the holder as it wrote itself into the file.
    """
    import fcntl

    path = Path(path)
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise UserError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "pid unknown"
            raise UserError(f"{busy} ({holder})") from None
        except OSError as exc:  # a file system without locks (ENOLCK): say so rather than run unprotected
            raise UserError(f"cannot lock {path}: {exc.strerror or exc}") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield


@contextmanager
def writing_folder(folder: Path | str, what: str) -> Iterator[Path]:
    """Create ``folder`` and hold its lock for the block, after clearing the temporary files a killed
    writer left there: ``export`` and ``render-video`` write a run's ``export/`` and ``video/`` while
    it may still train, so they lock their own folder, not the run's. A second writer gets one line.
    The lock file sits beside the folder (``.<name>.lock``), so the folder holds only what was written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {folder}: {exc.strerror or exc}") from None
    lock = folder.parent / f".{folder.name}.lock"
    with exclusive_lock(lock, f"another nfsd-nerf process is writing {what} in {folder}"):
        remove_temporaries(folder)
        yield folder


def check_writable(folder: Path | str) -> None:
    """Fail before any expensive work if ``folder`` cannot be created or written; creates nothing
    (the probe goes into the nearest folder that exists), so a later refusal leaves nothing behind."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        probe = existing / f".nfsd-nerf-write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None


def slugify(text: str, max_len: int = 48) -> str:
    """A folder-name-safe form of a prompt: ``"A red cube!"`` -> ``"a-red-cube"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "run"


def new_run_dir(out: Path | str, prompt: str, now: datetime | None = None) -> Path:
    """``OUT/<slug>-<YYYYmmdd-HHMMSS>``; never an existing folder (a suffix is added instead)."""
    out = Path(out)
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = out / f"{slugify(prompt)}-{stamp}"
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")
        except OSError as exc:
            raise UserError(f"cannot create the run folder in {out}: {exc.strerror or exc}") from None


def write_png(path: Path | str, pixels) -> Path:
    """Write uint8 pixels [H, W, 3] (a NumPy array) as a PNG, atomically."""
    import imageio.v3 as iio

    return atomic_write_bytes(path, iio.imwrite("<bytes>", pixels, extension=".png"))
