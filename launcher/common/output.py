"""What the launcher prints, and where.

- `console` (stderr): progress, notes and the one-line errors, for people.
- `stdout`: tables and results a user may pipe.
- `--json` (quantize, eval, verify): stdout carries exactly one JSON object for a CI job, the
  same object the run keeps as `result.json` in its folder, whatever the ending (ending.py):

      {"command", "status": "complete" | "failed" | "interrupted", "exit_code", "run_id",
       "output", "sizes", "quality", "timings", "error": {"kind", "message", "where", "advice"}}
"""
from __future__ import annotations

import json
import sys
from pathlib import PurePath
from string import Formatter

from rich.console import Console
from rich.markup import escape

from .errors import as_launcher_error
from .untrusted import printable

# what a result.json (a run's, the payload's, an evaluation's) may weigh when read back: they are
# ~100 KB with generations and per-layer errors; a larger file is not one of ours
MAX_RESULT_BYTES = 64 << 20

console = Console(stderr=True)
stdout = Console()


def safe(value) -> str:
    """A user- or file-supplied value (path, model name, image ref, run id, message) as rich
    markup that prints verbatim: `x[/]y` or `[bold]z` is text, not a tag, and control
    characters cannot move the cursor. (A trailing backslash stays single: rich's escape()
    doubles it, which prints twice; markup() doubles it only where one of our tags follows.)"""
    text = printable(str(value))
    body = text.rstrip("\\")
    return escape(body) + text[len(body):]


def markup(template: str, *args, **kwargs) -> str:
    """`template` (our own rich markup) formatted with every str, path or error argument
    passed through safe(); other values keep their format specs ({size:.1f}). The one way to
    put a value that is not ours into a line rich prints."""
    pieces, position = [], 0
    for literal, name, spec, conversion in Formatter().parse(template):
        pieces.append(literal)
        if name is None:
            continue
        if name == "":
            value, position = args[position], position + 1
        else:
            value = args[int(name)] if name.isdigit() else kwargs[name]
        if conversion:
            value = repr(value) if conversion == "r" else str(value)
        if isinstance(value, (str, PurePath, BaseException)):
            pieces.append(_Value(safe(format(str(value), spec))))
        else:
            pieces.append(format(value, spec))
    # backslashes that end a value and precede one of our tags would escape the tag: doubled,
    # rich prints them once and still reads the tag
    out = [p + "\\" * (len(p) - len(p.rstrip("\\")))
           if isinstance(p, _Value) and i + 1 < len(pieces) and pieces[i + 1].startswith("[") else p
           for i, p in enumerate(pieces)]
    return "".join(out)


class _Value(str):
    """A formatted value inside markup()'s pieces (not template text)."""


def print_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def error_fields(e: BaseException) -> dict:
    """The `error` member of a result: the parts of the LauncherError the user read
    (errors.as_launcher_error: an interrupt or a bug is one too)."""
    e = as_launcher_error(e)
    return {"kind": type(e).__name__, "exit_code": e.exit_code, "message": e.what, "where": e.where,
            "advice": e.advice}


def failure_result(command: str | None, failure: BaseException) -> dict:
    """The JSON result of a command that failed before it had a run record (or has none: verify)."""
    error = error_fields(failure)
    return {"command": command, "status": "interrupted" if error["exit_code"] == 130 else "failed",
            "exit_code": error["exit_code"], "run_id": None, "error": error}


def quality(evaluation: dict | None) -> dict | None:
    """The numbers of an evaluation (launcher eval's JSON) a CI job compares."""
    if not evaluation:
        return None
    keys = ("kl_divergence", "top1_agreement", "perplexity", "reference_perplexity", "tokens", "text")
    return {k: evaluation.get(k) for k in keys}


def run_result(rec, *, failure: BaseException | None = None, evaluation: dict | None = None,
               reused: bool = False, extra: dict | None = None, status: str | None = None) -> dict:
    """The JSON result of one run (runs.RunRecord), complete or failed; `status`: how its command
    ended, where that differs from the record's (a quantize interrupted after its checkpoint)."""
    checkpoint = rec.result if isinstance(rec.result, dict) else {}
    error = error_fields(failure) if failure is not None else None
    body = {
        "command": rec.command, "status": status or rec.status,
        "exit_code": error["exit_code"] if error else 0, "run_id": rec.id, "output": rec.output,
        "reused": reused,
        "sizes": {"checkpoint_bytes": checkpoint.get("checkpoint_bytes")} if checkpoint.get("checkpoint_bytes") else None,
        "recipe": checkpoint.get("recipe"), "format": checkpoint.get("format"),
        "quality": quality(evaluation), "timings": checkpoint.get("timings"),
        "error": error,
    }
    body.update(extra or {})
    return body
