"""Reading and showing what the launcher did not write itself: checkpoint files, run
records, lock files. Such a file may be a FIFO (reading it would block forever), huge,
nested past the recursion limit, or hold terminal control characters."""
from __future__ import annotations

import json
import os
import stat
import unicodedata
from pathlib import Path


def printable(text: str) -> str:
    """Control and format characters (ESC, CR, bidi overrides...) and line/paragraph
    separators (U+2028/9) escaped, so a name from a file cannot move the cursor, rewrite
    or split the line, or colour the terminal."""
    return "".join(c.encode("unicode_escape").decode("ascii") if _unsafe(unicodedata.category(c)) else c
                   for c in str(text))


def _unsafe(category: str) -> bool:
    return category[0] == "C" or category in ("Zl", "Zp")


def read_json_object(path: Path, limit: int = 1 << 20) -> dict | None:
    """A JSON object from a regular file of at most `limit` bytes, else None; never blocks
    on a FIFO or device, never raises for what the file holds."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            raw = f.read(limit + 1)
            data = json.loads(raw) if len(raw) <= limit else None
        except (OSError, ValueError, RecursionError):
            return None
    return data if isinstance(data, dict) else None


def link_out_of(path: Path, folder: Path | None = None) -> str | None:
    """Why `path`, a file of `folder` (default: its own folder, e.g. a checkpoint), must not be
    read: it is a symlink whose target lies outside that folder. None when it may be read.

    The one rule for reading a checkpoint or model folder: a link inside the folder is
    fine, and so is a Hugging Face cache snapshot's link into its own repo's blobs/
    (<repo>/snapshots/<rev>/f -> ../../blobs/<hash>), which huggingface_hub makes. Any other
    link (a tarball's or a clone's `config.json -> /etc/passwd`) is not followed."""
    path = Path(path)
    try:
        if not path.is_symlink():
            return None
        root = Path(folder if folder is not None else path.parent).resolve()
        target, link = path.resolve(), os.readlink(path)
    except (OSError, RuntimeError, ValueError):  # a loop, a name that vanished
        return "a symlink that cannot be resolved: not followed"
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if any(target.is_relative_to(a) for a in allowed):
        return None
    return f"a symlink to {printable(link)}, outside the folder: not followed"
