"""Files the launcher writes on the host, written whole or not at all.

A reader (another launcher, rollback, an engine loading the checkpoint) sees the old
file or the new one, never half of one, and a crash mid-write leaves the old one: the
text goes into a temporary file beside the target, which is then renamed over it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (same folder, so the rename never crosses filesystems).
    The file is readable by this user only, as tempfile makes it."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False, encoding="utf-8") as f:
        tmp = f.name
        try:
            f.write(text)
        except BaseException:
            f.close()
            os.unlink(tmp)
            raise
    os.replace(tmp, path)
    return path


def atomic_write_json(path: Path, data, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent))
