"""The payload's output, live: raw lines to the run's log file and the terminal,
`@@spark-nvfp4` events to progress bars.

The payload speaks through one JSON event a line (container_payload/core/events.py);
everything else is library chatter that we pass through untouched.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from container_payload.core import contract
from container_payload.core.contract import PREFIX

from ..common import output


def parse_event(line: str) -> dict | None:
    """The event a payload line carries (contract.PREFIX + a JSON object), or None."""
    if not line.startswith(PREFIX):
        return None
    try:
        event = json.loads(line[len(PREFIX):])
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def find_event(lines: Iterable[str], kind: str) -> dict | None:
    """The first event of this kind among the lines (others and garbage skipped)."""
    for line in lines:
        event = parse_event(line)
        if event is not None and event.get("event") == kind:
            return event
    return None


_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.I)


@dataclass
class StreamOutcome:
    events: list[dict] = field(default_factory=list)
    error: dict | None = None        # the payload's own `error` event, if any
    done: dict | None = None         # the `done` event
    saw_cuda_oom: bool = False
    tail: list[str] = field(default_factory=list)  # last lines, for messages


class EventStream:
    """Feed it byte chunks; it splits lines, logs, renders and remembers the outcome."""

    def __init__(self, log_file: IO[str], console: Console | None = None, *, echo: bool = True,
                 secrets: Iterable[str] = ()):
        self.log = log_file
        self.console = console or output.console
        self.echo = echo
        self.secrets = [s for s in secrets if s]
        self.outcome = StreamOutcome()
        self._buf = ""
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description:<12}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
                                  transient=False)
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self.feed(b"\n")
        self._progress.stop()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk.decode("utf-8", "replace")
        # tqdm redraws with \r: treat it as a line end so the log stays readable
        *lines, self._buf = re.split(r"\r\n|\n|\r", self._buf)
        for line in lines:
            self._line(line)

    def _redact(self, line: str) -> str:
        for s in self.secrets:  # never let a secret reach a log, whoever printed it
            line = line.replace(s, "***")
        return line

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        line = self._redact(line)
        self.log.write(line + "\n")
        self.log.flush()
        self.outcome.tail = (self.outcome.tail + [line])[-20:]
        if _OOM.search(line):
            self.outcome.saw_cuda_oom = True
        if line.startswith(PREFIX):
            ev = parse_event(line)
            if ev is not None:
                self._event(ev)
        elif self.echo:
            self._progress.console.print(line, style="dim", markup=False, highlight=False)

    def _event(self, ev: dict) -> None:
        self.outcome.events.append(ev)
        kind = ev.get("event")
        if kind == contract.STAGE:
            self._finish_running()
            name = ev.get("stage", "?")
            self._tasks[name] = self._progress.add_task(output.safe(name), total=ev.get("total"))
            if ev.get("detail"):
                self._progress.console.print(output.markup("[bold]{}[/]: {}", name, str(ev["detail"])), highlight=False)
        elif kind == contract.PROGRESS:
            name = ev.get("stage", "?")
            if name not in self._tasks:
                self._tasks[name] = self._progress.add_task(output.safe(name), total=ev.get("total"))
            self._progress.update(self._tasks[name], total=ev.get("total"), completed=ev.get("done", 0))
        elif kind == contract.ERROR:
            self.outcome.error = ev
        elif kind == contract.DONE:
            self._finish_running()
            self.outcome.done = ev

    def _finish_running(self) -> None:
        for task in self._progress.tasks:
            if not task.finished:
                total = task.total or max(task.completed, 1)
                self._progress.update(task.id, total=total, completed=total)


def open_log(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8")
