"""One writer per output folder.

The lock is a small file beside the output (`.NAME.spark-nvfp4.lock`), held with
`flock` on a descriptor kept open for the whole run. The kernel drops the flock when
its process dies (kill -9 included), so "stale" needs no guessing from the file's
content, and a competitor can never see a half-written lock as free: the content
(pid, start time, run id) is only what the messages and rollback show.

Removing the file is what makes the usual flock-and-unlink race possible (B opens
the file, A unlinks it and releases, B locks a file nobody else can see). So whoever
gets the flock checks that the path still names the inode it locked, and retries
otherwise.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path

from ..common.errors import LockHeld
from ..common.untrusted import read_json_object
from . import owner

MAX_LOCK_BYTES = 4096  # ours are ~120 bytes; anything bigger is not ours to parse


def lock_path(output: Path) -> Path:
    output = output.resolve()
    return output.parent / f".{output.name}.spark-nvfp4.lock"


def _alive(info: dict) -> bool:
    """A lock written by another host (shared disk), or by a launcher that predates flock
    and is still running: flock alone cannot see those, so the content decides."""
    return owner.alive(info.get("pid"), info.get("started"), info.get("host"))


def _open_regular(path: Path, flags: int) -> int:
    """Open without following a symlink and without blocking on a FIFO; refuse anything
    that is not a regular file (a FIFO or device put there must never hang us)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise LockHeld("the output's lock path is a symlink", where=str(path),
                       advice="remove it (it is not the launcher's), then retry") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockHeld("the output's lock path is not a regular file", where=str(path),
                       advice="remove what is there (it is not the launcher's), then retry")
    return fd


def read_info(path: Path) -> dict | None:
    """The lock's content, or None when absent, not ours, damaged or not a regular file."""
    return read_json_object(path, MAX_LOCK_BYTES)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _flock(path: Path, create: bool = True) -> int | None:
    """The descriptor of `path`, flocked by us; None when another process holds it."""
    for _ in range(20):  # each retry means the file was replaced under us: rare
        fd = _open_regular(path, os.O_RDWR | (os.O_CREAT if create else 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # we locked an unlinked file: its holder removed it meanwhile
    raise LockHeld("could not take the output lock: it keeps being replaced", where=str(path))


class OutputLock:
    def __init__(self, output: Path, run_id: str):
        self.path = lock_path(output)
        self.run_id = run_id
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _flock(self.path)
        if fd is None:
            raise self._held_error(read_info(self.path))
        info = read_info(self.path)
        if info is not None and info.get("run_id") != self.run_id and _alive(info):
            os.close(fd)
            raise self._held_error(info)
        me = {**owner.me(), "run_id": self.run_id}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd, self.held = fd, True
        return self

    def _held_error(self, info: dict | None) -> LockHeld:
        who = f"run {info.get('run_id')} (pid {info.get('pid')})" if info else "another run"
        host = info.get("host") if info else None
        if host is not None and host != owner.me()["host"]:
            # its owner cannot be looked at from here: the user must judge, so say how to
            return LockHeld(f"{who} on host {str(host)[:100]} holds this output's lock; whether it still "
                            "runs cannot be checked from this host", where=str(self.path),
                            advice="wait for it to finish; if that run is dead (its host rebooted or it was "
                                   f"killed), remove {self.path} and retry, or choose another --output")
        return LockHeld(f"{who} is writing this output", where=str(self.path),
                        advice="wait for it to finish, or choose another --output")

    def release(self) -> None:
        if self._fd is not None:
            # unlink while still holding the flock: a competitor that opened the old file
            # sees the inode change and retries (see _flock)
            if _same_file(self._fd, self.path) and (read_info(self.path) or {}).get("run_id") == self.run_id:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
        self._fd, self.held = None, False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def remove_if_stale(path: Path, run_id: str) -> str | None:
    """Rollback's removal of a lock a dead run left: taken with flock, read again under
    it, removed only if it still names `run_id`. Returns why it was left, or None."""
    try:
        fd = _flock(path, create=False)  # never create what we came to remove
    except FileNotFoundError:
        return "gone"
    except (OSError, LockHeld):
        return "not a regular file: not ours"
    if fd is None:
        return "held by a live process"
    try:
        info = read_info(path)
        if not info or info.get("run_id") != run_id:
            return "taken over by another run"
        path.unlink(missing_ok=True)
        return None
    finally:
        os.close(fd)
