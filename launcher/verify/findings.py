"""What a verification found and how it is shown: Problem, Report (with its deadline), the
summary line, the printed report and the JSON one. Every message quotes checkpoint values
through `short`, every printed line goes through untrusted.printable."""
from __future__ import annotations

import json
import reprlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.markup import escape

from ..common.errors import ConfigError
from ..common.files import atomic_write_text
from ..common.untrusted import printable
from .layouts import MODELOPT

MAX_PRINTED = 200          # problem lines printed; the JSON report keeps them all
# Whatever the files declare, a verification ends within this many seconds: a real 671B
# checkpoint takes well under one; only a crafted one (200k tensors x 1000 exclude
# patterns) can need more, and that is reported as a problem, never waited for.
VERIFY_SECONDS = 6.0


@dataclass(frozen=True)
class Problem:
    tensor_or_file: str
    message: str

    def __str__(self) -> str:
        # names and values come from the checkpoint: never raw control characters on a terminal
        return printable(f"{self.tensor_or_file}: {self.message}")


@dataclass
class Report:
    path: str
    format: str | None = None
    quant_algo: str | None = None
    weight_only: bool | None = None
    kv_cache: str | None = None
    quantized_linears: int = 0
    shards: int = 0
    tensors: int = 0
    total_bytes: int = 0        # tensor data in all shards
    quantized_bytes: int = 0    # packed weights + block scales + global/input scales
    quantized_params: int = 0   # weight elements of the quantized Linears
    layer_formats: dict = field(default_factory=dict)  # MIXED_PRECISION: quant_algo -> quantized Linears
    problems: list[Problem] = field(default_factory=list)
    deadline: float = field(default_factory=lambda: time.monotonic() + VERIFY_SECONDS, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("deadline")
        d["ok"] = self.ok
        return d


class OutOfTime(Exception):
    """The checks ran past Report.deadline."""


def in_time(report: Report) -> None:
    if time.monotonic() > report.deadline:
        raise OutOfTime


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong, _SHORT.maxlevel = 80, 80, 40, 3


def short(value) -> str:
    """A bounded repr of a value read from the checkpoint: a hostile config or header can
    hold megabytes in one field, and a message stays one short line."""
    try:
        return _SHORT.repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__}>"


def summary(r: Report) -> str:
    """One line, printable whatever the checkpoint holds."""
    return printable(_summary_text(r))


def _summary_text(r: Report) -> str:
    if r.format is None:
        return f"{r.path}: not verified as NVFP4"
    mode = {None: "?", True: "W4A16 (weight-only)", False: "W4A4"}[r.weight_only]
    if r.layer_formats:  # MIXED_PRECISION
        mode = "per layer: " + ", ".join(f"{n} {algo}" for algo, n in r.layer_formats.items())
    kv = f", KV cache {r.kv_cache}" if r.kv_cache else ""
    bits = f", {8 * r.quantized_bytes / r.quantized_params:.3f} bits/weight" if r.quantized_params else ""
    algo = r.quant_algo if isinstance(r.quant_algo, str) and len(r.quant_algo) <= 80 else short(r.quant_algo)
    return (f"{r.path}: {r.format} {algo or '?'} {mode}{kv}; {r.quantized_linears} quantized Linears"
            f"{bits}; {r.tensors} tensors in {r.shards} shard(s), {r.total_bytes / 2**20:.1f} MiB")


def print_report(report: Report, console) -> None:
    """The summary line, the first MAX_PRINTED problems and the verdict."""
    console.print(escape(summary(report)), highlight=False, soft_wrap=True)
    for p in report.problems[:MAX_PRINTED]:
        console.print(f"[red]problem[/red] {escape(str(p))}", highlight=False, soft_wrap=True)
    if len(report.problems) > MAX_PRINTED:
        console.print(f"[red]problem[/red] {len(report.problems) - MAX_PRINTED} more (all in --json-out)")
    if report.ok:
        engines = "TensorRT-LLM, vLLM and SGLang" if report.format == MODELOPT else "vLLM and SGLang"
        console.print(f"[green]ok[/green]: meets what {engines} require")
    else:
        console.print(f"[red]{len(report.problems)} problem(s)[/red]")


def write_report(report: Report, json_out: Path) -> None:
    """The full report as JSON (a file the user named: a one-line error if it cannot be written)."""
    try:
        atomic_write_text(Path(json_out), json.dumps(report.to_json(), indent=2) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write the report: {e.strerror or e}", where=str(json_out),
                          advice="choose a writable --json-out path") from None
