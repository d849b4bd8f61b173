"""The host-payload contract: the jobs the launcher hands the payload, and the events it gets back.

Standard library only: the launcher (which never imports torch) and the payload (inside the
image) import this one module, so a job's fields and their defaults are written once. The
launcher writes a job as JSON (`to_json`); the payload reads it with `from_json`, which refuses
a field it does not know, so a launcher and a payload of different versions fail in one line
instead of silently dropping a setting.

Every payload command starts the same way (`__main__.py`):

    python3 -m container_payload COMMAND [JOB.json]

and talks back through event lines on stdout: PREFIX + one JSON object with an `event` key.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

PREFIX = "@@spark-nvfp4 "

# Event names (the `event` key of each line).
STAGE = "stage"          # a stage began: stage, total, detail
PROGRESS = "progress"    # stage, done, total
LOG = "log"              # message: a line worth showing
ERROR = "error"          # kind (one of ERROR_KINDS), message: the payload's last word on a failure
DONE = "done"            # the job finished; its result file is written
READY = "ready"          # serve: the server listens
PROBE = "probe"          # probe: what the image holds

# What went wrong, for the launcher's advice (and its exit code).
ERROR_KINDS = ("input", "image", "gpu", "oom", "error")


@dataclass(frozen=True)
class Calibration:
    source: str = "builtin"       # builtin | a .txt/.jsonl path in the container | hf:DATASET (fetched on the host)
    samples: int = 128            # windows of calibration text
    seq_len: int = 512            # tokens per window
    batch_size: int | str = "auto"


@dataclass(frozen=True)
class QuantizeJob:
    model_dir: str                          # bf16 safetensors folder (or where the embedded GGUF converts to)
    output_dir: str = "/out"
    gguf: str | None = None                 # the embedded model's GGUF, converted once into model_dir
    format: str = "nvfp4"                   # recipes.FORMAT_NEEDS
    recipe: str = "default"                 # a recipes.RECIPES name, a ModelOpt library recipe or YAML path
    recipe_params: dict = field(default_factory=dict)   # "step.param" -> value (recipes.with_params)
    kv_cache: str = "none"
    calibration: Calibration = Calibration()
    device: str = "auto"                    # auto (CUDA when there is one) | cpu | cuda
    low_memory: bool = False                # small calibration batches, no read-ahead: same bytes
    gpu_memory_budget: int | None = None    # bytes per GPU; a model larger than that spreads over the GPUs
    trust_remote_code: bool = False         # the model's own code (auto_map) may be imported
    mode: str = "whole"                     # whole | streamed (one decoder layer at a time) | auto (by memory_budget)
    memory_budget: int | None = None        # bytes the job may use (mode auto decides with it)
    cpu_float32: bool = True                # our own passes' bf16 products in float32 on a CPU (linear_compute)
    direct_load: bool | str | dict = "auto"   # read shards straight to the device; a dict tunes the reader
    prefetch: bool | None = None            # read the shards into the page cache first (None: unless low_memory)
    job_fingerprint: str = ""
    run_id: str = ""


@dataclass(frozen=True)
class EvalJob:
    checkpoint: str
    reference: str
    text: str
    json_out: str
    tokens: int = 16384                     # held-out tokens scored
    seq_len: int = 512                      # window length
    device: str = "auto"
    generations: list | None = None         # prompts for side-by-side greedy generations (None: the built-in ones)
    max_new_tokens: int = 48
    trust_remote_code: bool = False         # the models' own code (auto_map) may be imported


@dataclass(frozen=True)
class TasksJob:
    """lm-evaluation-harness tasks on the quantized checkpoint and its reference (tasks.py)."""
    checkpoint: str
    reference: str
    tasks: list                             # lm-eval task names, or container paths of task YAML files/folders
    wheels: str                             # read-only folder of lm-eval's wheels, fetched on the host
    site: str                               # writable folder lm-eval is installed into (not the tmpfs: noexec)
    json_out: str
    lm_eval_version: str = "0.4.13"
    limit: int | None = None                # documents per task (None: all)
    num_fewshot: int | None = None          # None: each task's own default
    batch_size: int = 1
    bootstrap_iters: int = 1000             # lm-eval's resampling for stderrs of non-mean metrics
    device: str = "auto"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ServeJob:
    checkpoint: str
    model_name: str = "model"
    port: int = 8000
    host: str = "0.0.0.0"                   # inside the container; published on the host's 127.0.0.1 only
    device: str = "cpu"
    max_new_tokens: int = 64
    api_key_file: str | None = None         # a read-only file: never the environment (`docker inspect` shows it)
    trust_remote_code: bool = False         # the checkpoint's own code (auto_map) may be imported


@dataclass(frozen=True)
class ProbeJob:
    """The probe takes no input: it reports what the image holds."""


JOBS = {"quantize": QuantizeJob, "evaluate": EvalJob, "tasks": TasksJob, "serve": ServeJob, "probe": ProbeJob}
RESULT_FILE = "result.json"   # written last into a quantize job's output_dir: its presence marks it complete


class ContractError(ValueError):
    """A job file that does not fit this payload's contract."""


def to_json(job) -> str:
    return json.dumps(dataclasses.asdict(job), indent=2)


def from_dict(cls, data: dict):
    """`cls` from a JSON object: unknown fields refused, missing ones take their defaults."""
    if not isinstance(data, dict):
        raise ContractError(f"a {cls.__name__} must be a JSON object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ContractError(f"{cls.__name__} has no field {unknown[0]!r}: the launcher and the payload "
                            "are of different versions")
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = from_dict(kind, value)
        values[name] = value
    try:
        return cls(**values)
    except TypeError as e:  # a required field missing
        raise ContractError(f"{cls.__name__}: {e}") from None


def from_json(cls, text: str):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ContractError(f"job file is not JSON: {e}") from None
    return from_dict(cls, data)
