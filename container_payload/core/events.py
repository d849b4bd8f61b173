"""Structured events on stdout (contract.PREFIX + one JSON object a line), and the entry
point that turns every failure into one `error` event.

The launcher turns the events into progress bars; everything else the payload or its
libraries print passes through as log text.
"""
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from . import contract


def emit(event: str, **fields) -> None:
    fields = {"event": event, "t": round(time.time(), 3), **fields}
    sys.stdout.write(contract.PREFIX + json.dumps(fields, default=str) + "\n")
    sys.stdout.flush()


def stage(name: str, total: int | None = None, **fields) -> None:
    emit(contract.STAGE, stage=name, total=total, **fields)


def progress(name: str, done: int, total: int) -> None:
    emit(contract.PROGRESS, stage=name, done=done, total=total)


def log(message: str) -> None:
    """A line for the launcher to show; never breaks the work that logs it."""
    try:
        emit(contract.LOG, message=message)
    except Exception:  # noqa: BLE001
        print(message, flush=True)


class PayloadError(Exception):
    """A failure with a one-line message for the user; `kind` (contract.ERROR_KINDS) lets the
    launcher advise."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


# command -> (module that has run(job), what it is doing, for the out-of-memory message)
COMMANDS = {"quantize": ("quantize", "quantization"), "evaluate": ("evaluate", "evaluation"),
            "tasks": ("tasks", "the task evaluation"),
            "serve": ("serve", "serving"), "probe": ("probe", "the image probe")}


def run_command(argv: list[str]) -> int:
    """`COMMAND [JOB.json]`: read the job into its contract type, run the command's module, and
    end every failure in one `error` event (the launcher shows it as one line; the log keeps
    the traceback)."""
    if not argv or argv[0] not in COMMANDS or len(argv) > 2:
        print(f"usage: python3 -m container_payload {{{','.join(COMMANDS)}}} [JOB.json]", file=sys.stderr)
        return 2
    command = argv[0]
    module, activity = COMMANDS[command]
    try:
        cls = contract.JOBS[command]
        job = contract.from_json(cls, Path(argv[1]).read_text()) if len(argv) == 2 else cls()
        importlib.import_module(f"..{module}", __package__).run(job)  # the top-level command modules
        return 0
    except contract.ContractError as e:
        emit(contract.ERROR, kind="input", message=str(e))
    except PayloadError as e:
        emit(contract.ERROR, kind=e.kind, message=str(e))
    except MemoryError:
        emit(contract.ERROR, kind="oom", message=f"host memory ran out during {activity}")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        # torch.cuda.OutOfMemoryError says so by its type; CUDA and cuBLAS allocation failures
        # reach Python as plain RuntimeErrors, whose text is all there is
        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        emit(contract.ERROR, kind="oom" if oom else "error", message=f"{type(e).__name__}: {first}")
    return 1
