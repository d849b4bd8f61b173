"""Run records: what each run was asked, what it created, and how it ended.

A record is rewritten atomically every time the run creates something, so a crash
(even kill -9) leaves an accurate list for `launcher rollback`. Rollback trusts
these records and Docker labels, never name patterns.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, Field

from . import paths
from .errors import RunNotFound

Status = Literal["running", "complete", "failed", "interrupted", "rolled-back"]


class Created(BaseModel):
    """Everything a run made, so that rollback can remove exactly that."""
    containers: list[str] = Field(default_factory=list)   # container ids
    images: list[str] = Field(default_factory=list)       # refs this run pulled itself
    outputs: list[str] = Field(default_factory=list)      # finished output folders
    partials: list[str] = Field(default_factory=list)     # temporary output folders
    cache: list[str] = Field(default_factory=list)        # cache folders it downloaded or converted
    locks: list[str] = Field(default_factory=list)        # output lock files (stale after a kill -9)


class RunRecord(BaseModel):
    id: str
    command: str
    created_at: str
    updated_at: str = ""
    status: Status = "running"
    pid: int = Field(default_factory=os.getpid)
    pid_started: float = Field(default_factory=lambda: psutil.Process().create_time())
    host: str = Field(default_factory=socket.gethostname)
    spec: dict = Field(default_factory=dict)
    image: str | None = None
    output: str | None = None   # the resolved output folder (the spec may hold a relative path)
    created: Created = Field(default_factory=Created)
    error: str | None = None
    result: dict | None = None

    @property
    def folder(self) -> Path:
        return paths.runs_dir() / self.id

    @property
    def log_path(self) -> Path:
        return self.folder / "log.txt"

    def save(self) -> None:
        self.updated_at = _now()
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.folder, delete=False, suffix=".tmp") as f:
            f.write(self.model_dump_json(indent=2))
        os.replace(f.name, self.folder / "record.json")

    def add(self, kind: str, item: str) -> None:
        items = getattr(self.created, kind)
        if item not in items:
            items.append(item)
            self.save()

    def finish(self, status: Status, error: str | None = None) -> None:
        self.status = status
        self.error = error
        self.save()

    @contextmanager
    def ends_on_error(self):
        """Any exception that leaves the block ends the run with the matching status, so a
        record never stays 'running' after its launcher gave up."""
        from .errors import LauncherError

        try:
            yield self
        except KeyboardInterrupt:
            self.finish("interrupted", error="interrupted (Ctrl-C)")
            raise
        except LauncherError as e:
            self.finish("interrupted" if e.exit_code == 130 else "failed", error=str(e))
            raise
        except BaseException as e:
            self.finish("failed", error=f"{type(e).__name__}: {e}")
            raise

    def owner_alive(self) -> bool:
        """Is the launcher process that runs this record still alive (same host)?"""
        if self.host != socket.gethostname():
            return True  # can't tell from here: assume alive, never reap other hosts' runs
        try:
            return abs(psutil.Process(self.pid).create_time() - self.pid_started) < 1.0
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run(command: str, spec: dict) -> RunRecord:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    rec = RunRecord(id=f"{stamp}-{secrets.token_hex(3)}", command=command, created_at=_now(), spec=spec)
    rec.save()
    return rec


def load(run_id: str) -> RunRecord:
    path = paths.runs_dir() / run_id / "record.json"
    if not path.exists():
        raise RunNotFound(f"no run {run_id!r}", where=str(paths.runs_dir()),
                          advice="`launcher list` shows the runs")
    return RunRecord.model_validate(json.loads(path.read_text()))


def all_runs() -> list[RunRecord]:
    base = paths.runs_dir()
    if not base.exists():
        return []
    out = []
    for p in sorted(base.glob("*/record.json")):
        try:
            out.append(RunRecord.model_validate(json.loads(p.read_text())))
        except (ValueError, OSError):
            continue  # a foreign or damaged file is not ours to interpret
    return out


def mark_dead_runs() -> list[RunRecord]:
    """Runs still 'running' whose launcher died (kill -9, crash): mark them interrupted."""
    dead = []
    for rec in all_runs():
        if rec.status == "running" and not rec.owner_alive():
            rec.finish("interrupted", error="the launcher process ended before the run finished")
            dead.append(rec)
    return dead
