"""Whether an existing output is this job's checkpoint, and what a rerun does with it.

    nothing there, or an empty folder           -> quantize
    a complete checkpoint of the same inputs    -> verified again and reused; its JSON result
      (job_inputs.py: by content)                  carries the numbers of the run that made it
    a launcher's checkpoint of other inputs,    -> quantize again, say why, and put the new one
      made by a run of this home, holding only     in its place once verified (the old one is
      the files that run wrote                     ours: `rollback --outputs` would delete it too)
    anything else                               -> refused in one line: not ours to overwrite

The output's files are untrusted (a user can edit them): they decide nothing alone. A
replacement needs the maker's run record in this home, and what a reuse reports is
checked for type and range before it is passed on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..common.errors import ConfigError, RunNotFound
from ..common.output import quality
from ..common.untrusted import read_json_object
from ..records import runs
from ..records.rollback import recorded_path_ok
from .job_inputs import differences

MAX_RESULT = 16 << 20          # a checkpoint's result.json is tens of KB
# what the launcher adds to a checkpoint after the payload listed its files
LAUNCHER_FILES = {"result.json", "eval.json", "README.md"}


@dataclass
class Previous:
    action: Literal["quantize", "reuse", "replace"]
    output: Path
    why: str | None = None                 # why the existing output is not reused
    result: dict | None = None             # its result.json
    maker: runs.RunRecord | None = None    # the run of this home that made it


def judge(output: Path, inputs: dict) -> Previous:
    """What to do with what lies at `output` (called under the output lock)."""
    if not output.exists() or not any(output.iterdir()):
        return Previous("quantize", output)
    result = read_json_object(output / "result.json", limit=MAX_RESULT) or {}
    if result.get("status") != "complete" or not isinstance(result.get("run_id"), str):
        raise ConfigError(f"output folder exists and is not a finished run of this job: {output}",
                          where="--output", advice="choose another --output, or remove the folder")
    maker = _maker(output, result)
    if None not in inputs.values() and result.get("job_inputs") == inputs:
        return Previous("reuse", output, result=result, maker=maker)
    why = differences(result.get("job_inputs"), inputs)
    if maker is None:
        raise ConfigError(f"output holds a checkpoint of another job ({why}) that no run of this launcher "
                          f"home made: {output}", where="--output",
                          advice="choose another --output, or remove that folder yourself")
    check_replaceable(output, result, why)
    return Previous("replace", output, why=why, result=result, maker=maker)


def check_replaceable(output: Path, result: dict, why: str) -> None:
    """The old checkpoint holds only what its run wrote (checked again right before it goes:
    a file the user put there meanwhile is not ours to delete)."""
    files = result.get("files") if isinstance(result.get("files"), dict) else {}
    foreign = sorted(p.name for p in output.iterdir() if p.name not in files and p.name not in LAUNCHER_FILES)
    if foreign:
        raise ConfigError(f"output holds a checkpoint of another job ({why}) and {foreign[0]!r}, which the "
                          f"launcher did not write: {output}", where="--output",
                          advice="choose another --output, or move that file out and run again")


def _maker(output: Path, result: dict) -> runs.RunRecord | None:
    """The quantize run of this home whose record lists `output` and whose id the output's
    result.json names; None when there is none (another home, a copy, a hand-made folder)."""
    try:
        rec = runs.load(result["run_id"])
    except RunNotFound:  # RunDamaged included
        return None
    if rec.command == "quantize" and str(output) in rec.created.outputs and recorded_path_ok(rec, "outputs", str(output)):
        return rec
    return None


# ---------------------------------------------------------------- what a reuse reports

def carried(prev: Previous) -> tuple[dict, dict | None]:
    """(the checkpoint's result, its quality) as the run that made it reported them: sizes,
    recipe, format and timings from the output's result.json; the quality from the maker's own
    JSON result in this home (the output's eval.json may have been rewritten by a later
    `launcher eval`), else from that eval.json. Only values of the right type and range."""
    checkpoint = _checkpoint_fields(prev.result or {})
    made = prev.maker.read_result() if prev.maker is not None else None
    if isinstance(made, dict) and made.get("run_id") == prev.maker.id and made.get("status") == "complete":
        measured = made.get("quality")
    else:
        measured = quality(read_json_object(prev.output / "eval.json", limit=MAX_RESULT))
    return checkpoint, _quality_fields(measured)


def _number(v, integer: bool = False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v if not integer or isinstance(v, int) else None


def _numbers(d: dict, nested: bool = False) -> dict:
    """The finite numbers of `d` (and of its dicts one level down, as timings' timeline)."""
    out = {}
    for k, v in list(d.items())[:64]:
        value = _numbers(v) if nested and isinstance(v, dict) else _number(v)
        if value not in (None, {}):
            out[str(k)[:40]] = value
    return out


def _checkpoint_fields(result: dict) -> dict:
    timings = result.get("timings") if isinstance(result.get("timings"), dict) else {}
    size = _number(result.get("checkpoint_bytes"), integer=True)
    fields = {
        "checkpoint_bytes": size if size is not None and size >= 0 else None,
        "recipe": result["recipe"][:200] if isinstance(result.get("recipe"), str) else None,
        "format": result["format"][:40] if isinstance(result.get("format"), str) else None,
        "timings": _numbers(timings, nested=True) or None,
        "job_fingerprint": result.get("job_fingerprint") if isinstance(result.get("job_fingerprint"), str) else None,
        "run_id": result.get("run_id"),
    }
    return {k: v for k, v in fields.items() if v is not None}  # absent, not null: readers default it


def _quality_fields(q) -> dict | None:
    if not isinstance(q, dict):
        return None
    out = {k: _number(q.get(k)) for k in ("kl_divergence", "top1_agreement", "perplexity", "reference_perplexity")}
    out["tokens"] = _number(q.get("tokens"), integer=True)
    out["text"] = q["text"][:200] if isinstance(q.get("text"), str) else None
    return out
