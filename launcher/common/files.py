"""Files the launcher writes on the host: written whole or not at all, never through a link.

A reader (another launcher, rollback, an engine loading the checkpoint) sees the old
file or the new one, never half of one, and a crash mid-write leaves the old one: the
text goes into a temporary file beside the target, which is then renamed over it.

Many of these files land in folders the launcher did not make or fill itself (eval.json
in a checkpoint from a tarball, --json-out, a report, the card in an output the container
wrote). So the final name is never followed: a symlink or other non-file there is refused
in one line. The folder is the one the caller names (the user's own links in that path
are theirs to make); it is opened once and every step happens relative to that handle.

Modes: outputs are shared artefacts (served, copied, read by a container's other user),
so every file is 0644 minus the user's umask, like any file a tool creates. Only secrets
(serve's API key) are written elsewhere, 0600.
"""
from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

from .errors import ConfigError
from .untrusted import printable

FILE_MODE = 0o644


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (same folder, so the rename never crosses filesystems),
    refusing a symlink or non-regular file at `path`."""
    path = Path(path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        refuse_link(path, folder)
        # O_EXCL: a name planted between the check and here is never opened, let alone followed
        tmp = f".{path.name[:100]}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE,
                     dir_fd=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            # rename replaces whatever is at the name (a link planted since the check
            # included) and never writes through it
            os.replace(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=folder)
            except OSError:
                pass
            raise
    finally:
        os.close(folder)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent))


def refuse_link(path: Path, folder: int | None = None) -> None:
    """A ConfigError if `path` (relative to the open `folder`, else as given) is a symlink or
    anything but a regular file; nothing if it is a file or absent."""
    try:
        st = os.stat(path.name if folder is not None else path, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        return

    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path.name, dir_fd=folder) if folder is not None else os.readlink(path)
        what = f"a symlink (to {printable(target)})"
    else:
        what = "not a regular file"
    raise ConfigError(f"{printable(path.name)} is {what}: not written through it", where=printable(str(path)),
                      advice="remove it, or choose another file to write")


def make_shareable(folder: Path) -> None:
    """Every regular file under `folder` (made by this run) to 0644 minus the umask, like the rest
    of an output: safetensors 0.8 writes its files 0600 (through a temporary file), and
    a checkpoint is meant to be served and copied. Links are not followed, nor changed."""
    mode = FILE_MODE & ~_umask()
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue  # a link (ELOOP) or a name that vanished: not ours to change
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.fchmod(fd, mode)
            finally:
                os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (Linux 4.7+), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask
