"""One writer per output folder.

The lock is a small file beside the output (`.NAME.spark-nvfp4.lock`) created with
O_EXCL and holding the owner's pid, its start time and the run id. A lock whose
process is gone (kill -9, reboot) is stale and is cleared.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import psutil

from .errors import LockHeld


def lock_path(output: Path) -> Path:
    output = output.resolve()
    return output.parent / f".{output.name}.spark-nvfp4.lock"


def _alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return True
    try:
        return abs(psutil.Process(info["pid"]).create_time() - info["started"]) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
        return False


class OutputLock:
    def __init__(self, output: Path, run_id: str):
        self.path = lock_path(output)
        self.run_id = run_id
        self.held = False

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "started": psutil.Process().create_time(),
              "host": socket.gethostname(), "run_id": self.run_id}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._read()
                if info is not None and _alive(info):
                    raise LockHeld(f"run {info.get('run_id')} (pid {info.get('pid')}) is writing this output",
                                   where=str(self.path.parent),
                                   advice="wait for it to finish, or choose another --output") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise LockHeld("could not take the output lock", where=str(self.path))

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            info = self._read()
            if info and info.get("run_id") == self.run_id:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
