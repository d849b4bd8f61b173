"""What `launcher list`, `status` and `logs` show of the runs of this home.

Records are files anyone can edit: every value shown goes through output.safe (markup escaped,
control characters printable), and a recorded path is measured only when rollback would accept
it as the run's own.
"""
from __future__ import annotations

import codecs
import datetime as dt
import os
import stat
import sys
import time
from pathlib import Path

from rich import box
from rich.table import Table

from ..common.errors import RunDamaged
from ..common.output import markup, safe
from ..common.untrusted import open_regular
from . import runs
from .orphans import tidy
from .rollback import human, recorded_path_ok, tree_size

STATUS_COLORS = {"complete": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}


def age(iso: str) -> str:
    try:
        secs = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(iso)).total_seconds()
    except (ValueError, TypeError):  # a hand-edited record
        return "?"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= n:
            return f"{secs // n:.0f}{unit}"
    return f"{secs:.0f}s"


# rich lays a table out at ~1-3 ms a row: thousands of runs took seconds (issue 22)
SHOWN_RUNS = 100


def print_runs(console, out, show_all: bool = False) -> None:
    """The runs of this home, oldest first, the latest SHOWN_RUNS unless `show_all` (runs whose
    launcher died are marked interrupted)."""
    records = runs.all_runs()
    damaged = dict(runs.damaged)
    tidy(console, records)
    for name, why in damaged.items():
        console.print(markup("[yellow]skipped[/] run {}: {}", name, why),
                      highlight=False, soft_wrap=True)
    if not records:
        console.print("no runs yet")
        return
    if not show_all and len(records) > SHOWN_RUNS:
        console.print(f"{len(records) - SHOWN_RUNS} older runs not shown (`launcher list --all` shows them)")
        records = records[-SHOWN_RUNS:]
    t = Table(box=box.SIMPLE_HEAD)
    for col in ("id", "status", "model", "output", "created", "age"):
        t.add_column(col, overflow="fold", no_wrap=col in ("id", "status", "age"),
                     min_width=10 if col == "output" else None)
    for r in records:
        st = f"[{STATUS_COLORS[r.status]}]{r.status}[/]" if r.status in STATUS_COLORS else r.status
        shown = (str(r.spec.get("model") or "embedded"), r.output or str(r.spec.get("output") or "-"))
        t.add_row(safe(r.id), st, *(safe(x) for x in shown), safe(r.created_at.replace("T", " ")[5:16]),
                  age(r.created_at))
    out.print(t)


def print_status(run_id: str, console, out) -> None:
    """One run: its record, what it created (and whether that still exists), its files."""
    tidy(console)
    r = runs.load(run_id)
    t = Table(show_header=False, box=None)
    alive = r.status == "running" and r.owner_alive()
    rows = [("run", r.id), ("command", r.command), ("status", r.status),
            ("launcher", f"pid {r.pid} on {r.host}" + (" (alive)" if alive else "")),
            ("created", r.created_at), ("updated", r.updated_at),
            ("model", str(r.spec.get("model") or "embedded")), ("output", r.output or str(r.spec.get("output"))),
            ("image", r.image or "-"), ("error", r.error or "-")]
    if r.result:
        rows.append(("checkpoint", f"{human(r.result.get('checkpoint_bytes'))}, "
                                   f"{r.result.get('timings', {}).get('total_s', '?')} s in the payload"))
    for k, v in rows:
        t.add_row(f"[bold]{k}[/]", safe(v))
    out.print(t)
    made = Table(title="created", title_justify="left")
    for col in ("kind", "what", "now"):
        made.add_column(col, overflow="fold")
    for kind, items in r.created.model_dump().items():
        for item in items:
            if kind in ("containers", "images"):
                now = "-"
            elif not recorded_path_ok(r, kind, item):  # a crafted record must not make us walk `/`
                now = "not ours: rollback leaves it"
            else:
                now = human(tree_size(Path(item))) if os.path.lexists(item) else "gone"
            made.add_row(kind, safe(item), now)
    out.print(made if made.row_count else "created: nothing")
    # lstat: a symlink put in the run's folder is named as one, never followed
    files = sorted((p, p.lstat()) for p in r.folder.iterdir()) if r.folder.is_dir() else []
    shown = [f"{p} ({human(st.st_size) if stat.S_ISREG(st.st_mode) else 'not a regular file'})"
             for p, st in files if not stat.S_ISDIR(st.st_mode)]
    out.print("files: " + safe(", ".join(shown)), highlight=False)


# `logs` prints at most this much of a log, its end (a real one is a few MB at most); a larger
# or sparse file put there is never read whole
MAX_LOG_SHOWN = 16 << 20
_LOG_CHUNK = 1 << 20


def print_log(run_id: str, follow: bool, console) -> None:
    """The run's log on stdout, as bytes arrive; with follow, until the run ends. The log is
    read as untrusted: a regular file only (a FIFO or /dev/zero would never end), never
    through a symlink (it would print the link's target), at most its last MAX_LOG_SHOWN."""
    rec = runs.load(run_id)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pos = None  # where the next read starts (None: nothing read yet)
    advice = "it is not the launcher's log; remove it"
    if not os.path.lexists(rec.log_path) and not follow:
        console.print(markup("run {} has no log yet ({})", run_id, rec.status))
        return
    while True:
        going = follow and rec.status == "running" and rec.owner_alive()
        f = open_regular(rec.log_path, "run log", error=RunDamaged, advice=advice, missing_ok=True)
        if f is not None:
            with f:
                size = os.fstat(f.fileno()).st_size
                start = 0 if pos is None or size < pos else pos  # (smaller: the log was replaced)
                pos = max(start, size - MAX_LOG_SHOWN)
                if pos > start:
                    console.print(f"[yellow]note:[/] {size - start:,} bytes of log; showing the last "
                                  f"{MAX_LOG_SHOWN:,}", highlight=False)
                f.seek(pos)
                while pos < size and (chunk := f.read(min(_LOG_CHUNK, size - pos))):
                    pos += len(chunk)
                    sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        if not going:  # read once more after the run ended: nothing written at the end is lost
            break
        time.sleep(0.5)
        rec = runs.load(run_id)
