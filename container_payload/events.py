"""Structured progress events on stdout, one JSON object a line.

The launcher turns them into progress bars; everything else the payload or its
libraries print passes through as log text.
"""
import json
import sys
import time

PREFIX = "@@spark-nvfp4 "


def emit(event: str, **fields) -> None:
    fields = {"event": event, "t": round(time.time(), 3), **fields}
    sys.stdout.write(PREFIX + json.dumps(fields, default=str) + "\n")
    sys.stdout.flush()


def stage(name: str, total: int | None = None, **fields) -> None:
    emit("stage", stage=name, total=total, **fields)


def progress(name: str, done: int, total: int) -> None:
    emit("progress", stage=name, done=done, total=total)


class PayloadError(Exception):
    """A failure with a one-line message for the user; `kind` lets the launcher advise."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


def run_job(run, argv: list[str], module: str, activity: str) -> int:
    """The payload entry point: read the job file, run, and end every failure in one
    `error` event (the launcher shows it as one line; the log keeps the traceback)."""
    import traceback
    from pathlib import Path

    if len(argv) != 1:
        print(f"usage: python3 -m container_payload.{module} JOB.json", file=sys.stderr)
        return 2
    try:
        run(json.loads(Path(argv[0]).read_text()))
        return 0
    except PayloadError as e:
        emit("error", kind=e.kind, message=str(e))
    except MemoryError:
        emit("error", kind="oom", message=f"host memory ran out during {activity}")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        emit("error", kind="oom" if "out of memory" in str(e).lower() else "error",
             message=f"{type(e).__name__}: {first}")
    return 1
