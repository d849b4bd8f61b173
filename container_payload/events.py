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
