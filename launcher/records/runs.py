"""Run records: what each run was asked, what it created, and how it ended.

A record is rewritten atomically every time the run creates something, so a crash
(even kill -9) leaves an accurate list for `launcher rollback`. Rollback goes by
these records and Docker labels, never name patterns; but a record is a file anyone
can edit, so it is input, not truth: the id must have our format, a damaged record is
skipped with one line, and rollback checks each path against what the run could have
created (rollback.py).
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator

from ..common import paths
from ..common.errors import LauncherError, RunDamaged, RunNotFound, as_launcher_error
from ..common.files import atomic_write_text
from ..common.output import run_result
from ..common.untrusted import parse, read_capped, read_json_object
from . import owner

# what new_run() makes: 20261130-061304-a1b2c3 (a folder name, never a path)
RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
MAX_RECORD = 4 << 20   # real records are a few KB

Status = Literal["running", "complete", "failed", "interrupted", "rolled-back"]


class Created(BaseModel):
    """Everything a run made, so that rollback can remove exactly that."""
    containers: list[str] = Field(default_factory=list)   # container ids
    images: list[str] = Field(default_factory=list)       # refs this run pulled itself
    outputs: list[str] = Field(default_factory=list)      # finished output folders
    partials: list[str] = Field(default_factory=list)     # temporary output folders
    cache: list[str] = Field(default_factory=list)        # cache folders it downloaded or converted
    locks: list[str] = Field(default_factory=list)        # output lock files (stale after a kill -9)


class RecordedResult(BaseModel):
    """The members of a record's `result` that commands read back (status, --json): typed, so
    that a hand-edited record is refused in one line rather than crashing a command later."""
    model_config = ConfigDict(extra="allow", strict=True)   # strict: "5" stays a string, so it is refused
    checkpoint_bytes: NonNegativeInt | None = None
    timings: dict[str, float | dict | None] | None = None


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

    @field_validator("id")
    @classmethod
    def _our_id(cls, v: str) -> str:
        if not RUN_ID.fullmatch(v):
            raise ValueError("not a run id of this launcher")
        return v

    @field_validator("result")
    @classmethod
    def _typed_result(cls, v: dict | None) -> dict | None:
        if v is not None:
            RecordedResult.model_validate(v)  # (the dict stays as it is: results differ by command)
        return v

    @property
    def folder(self) -> Path:
        return paths.runs_dir() / self.id

    @property
    def log_path(self) -> Path:
        return self.folder / "log.txt"

    def save(self) -> None:
        self.updated_at = _now()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / "record.json", self.model_dump_json(indent=2))
        except OSError as e:
            raise _unwritable(e, self.folder) from None

    def add(self, kind: str, item: str) -> None:
        items = getattr(self.created, kind)
        if item not in items:
            items.append(item)
            self.save()

    def finish(self, status: Status, error: str | None = None) -> None:
        self.status = status
        self.error = error
        self.save()

    def end(self, failure: BaseException) -> dict:
        """The run's command ends on `failure` (any exception: errors.as_launcher_error says how it
        reads): a running record says so, and result.json holds the object `--json` prints."""
        err = as_launcher_error(failure)
        status = "interrupted" if err.exit_code == 130 else "failed"
        if self.status == "running":  # a finished run keeps its status: what it made is a result
            self.finish(status, error=str(err))  # (a promoted checkpoint, a server left running)
        return self.write_result(run_result(self, failure=err, status=status))

    @contextmanager
    def ends_on_error(self):
        """A LauncherError that leaves the block ends the run, for a caller that survives it (a
        quantize whose quick evaluation failed). Every other ending reaches ending.conclude,
        which ends each run this process started and has not finished."""
        try:
            yield self
        except LauncherError as e:
            self.end(e)
            raise

    def read_result(self) -> dict | None:
        return read_json_object(self.folder / "result.json")

    def write_result(self, body: dict) -> dict:
        """The run's result.json (what a CI job reads), written whole or not at all."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "result.json", json.dumps(body, indent=2, default=str))
        return body

    def discard(self) -> None:
        """Remove this run's folder (a dry run's: it changed nothing and leaves no record), and
        forget it: ending.conclude must not write a result.json back into a folder of its own."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self in started:
            started.remove(self)

    def owner_alive(self) -> bool:
        """Is the launcher process that runs this record still alive? (Another host's: assumed
        so, never reap other hosts' runs.)"""
        return owner.alive(self.pid, self.pid_started, self.host)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# The runs this process started, oldest first (the first is its command's): whatever way the
# command ends, ending.conclude ends those still running and writes the first one's result.json.
started: list[RunRecord] = []


def _unwritable(e: OSError, folder: Path) -> LauncherError:
    """The one-line error for a run folder that cannot be written (the home's runs/ is a file,
    read-only, full...)."""
    return LauncherError(f"cannot write the run record: {e.strerror}", where=str(folder),
                         advice=f"check the launcher home ({paths.ENV_HOME} or ~/.cache/spark-nvfp4)")


def new_run(command: str, spec: dict) -> RunRecord:
    """A new run whose folder it has just created: ids are the second plus 24 random bits, so two
    runs in one second can draw the same id (about 1 in 30 for 2,000 runs made in a few seconds,
    seen in the tests); the folder is claimed exclusively and another id drawn, never another run's
    record overwritten."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        paths.runs_dir().mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where the runs folder should be
        raise _unwritable(NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), paths.runs_dir()) from None
    except OSError as e:
        raise _unwritable(e, paths.runs_dir()) from None
    for _ in range(8):
        rec = RunRecord(id=f"{stamp}-{secrets.token_hex(3)}", command=command, created_at=_now(), spec=spec)
        try:
            rec.folder.mkdir()
            break
        except FileExistsError:  # another run of this second drew these bits
            continue
        except OSError as e:
            raise _unwritable(e, rec.folder) from None
    else:
        raise LauncherError("cannot find a free run id", where=str(paths.runs_dir()),
                            advice="the runs folder holds runs with every id drawn; check it")
    started.append(rec)  # before its file exists: an interrupt during save() still ends it
    rec.save()
    return rec


def check_id(run_id: str) -> str:
    """A run id names a folder under runs/: anything else (empty, `..`, a path) is refused
    before it touches the disk. Container labels go through here too, and anyone can set those."""
    if not RUN_ID.fullmatch(run_id or ""):
        raise RunNotFound(f"{run_id!r:.60} is not a run id (like 20261130-061304-a1b2c3)", where="RUN_ID",
                          advice="`launcher list` shows the runs")
    return run_id


def _parse(path: Path) -> RunRecord:
    """A record file, or RunDamaged saying in one line why it cannot be used."""
    where, advice = str(path), "it is skipped; delete that folder if it is not needed"
    raw = read_capped(path, MAX_RECORD, "run record", error=RunDamaged, advice=advice, missing_ok=True)
    if raw is None:
        raise RunNotFound("no such run", where=where, advice="`launcher list` shows the runs")
    data = parse(raw, "json", "damaged run record", where, error=RunDamaged, advice=advice)
    try:
        rec = RunRecord.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "record"
        raise RunDamaged(f"damaged run record: {field}: {err['msg']}", where=where, advice=advice) from None
    if rec.id != path.parent.name:
        raise RunDamaged(f"run record names run {rec.id}, not its folder's", where=where,
                         advice="it is skipped; a record copied between folders is not trusted")
    return rec


def load(run_id: str) -> RunRecord:
    check_id(run_id)
    try:
        return _parse(paths.runs_dir() / run_id / "record.json")
    except RunDamaged:
        raise
    except RunNotFound:
        raise RunNotFound(f"no run {run_id!r}", where=str(paths.runs_dir()),
                          advice="`launcher list` shows the runs") from None


# records skipped by the last all_runs(), with why: commands print them once
damaged: dict[str, str] = {}


def all_runs() -> list[RunRecord]:
    base = paths.runs_dir()
    damaged.clear()
    if not base.exists():
        return []
    out = []
    for p in sorted(base.glob("*/record.json")):
        try:
            out.append(_parse(p))
        except RunNotFound as e:  # RunDamaged included: a foreign or damaged file is not ours
            damaged[p.parent.name] = str(e)
    return out


def mark_dead_runs(records: list[RunRecord] | None = None) -> list[RunRecord]:
    """Runs still 'running' whose launcher died (kill -9, crash): mark them interrupted (in
    `records` too, when the caller read them already: one read of thousands is enough)."""
    dead = []
    for rec in all_runs() if records is None else records:
        if rec.status == "running" and not rec.owner_alive():
            rec.finish("interrupted", error="the launcher process ended before the run finished")
            dead.append(rec)
    return dead
