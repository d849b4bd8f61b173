"""The job spec: what to quantize, how, and where it goes.

Values come from three layers, later ones winning: an optional config file
(YAML, JSON or TOML), environment variables `SPARK_NVFP4_<FIELD>` (nested fields
with `__`, e.g. `SPARK_NVFP4_CALIBRATION__SAMPLES=256`), then command-line flags.
Every invalid value is rejected with the field's name and where it came from.
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from container_payload import recipes

from .errors import ConfigError

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


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field("builtin", description="builtin | FILE.txt | FILE.jsonl | hf:DATASET[:SPLIT[:FIELD]]")
    samples: int = Field(128, gt=0, le=65536)
    seq_len: int = Field(512, ge=16, le=131072)
    batch_size: int | Literal["auto"] = "auto"

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v):
        if v != "auto" and v <= 0:
            raise ValueError("must be a positive integer or 'auto'")
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

    model: str = Field(EMBEDDED_MODEL, description="hub id, local folder, or 'embedded'")
    revision: str | None = None
    format: QuantFormat = QuantFormat.NVFP4
    recipe: str = "default"       # a name of container_payload/recipes.py, a ModelOpt library recipe, or a .yaml
    calibration: Calibration = Calibration()
    kv_cache: Literal["none", "fp8"] = "none"
    output: Path | None = None
    image: str = "auto"
    gpus: str = "auto"
    memory_limit: str | None = None
    low_memory: bool = False      # smaller calibration batches, no read-ahead: same bytes, less memory
    mode: Literal["auto", "whole", "streamed"] = "auto"  # streamed: one decoder layer at a time (issue 15)
    memory_budget: str | None = None  # bytes the job may use, like 24g; default from the machine (memory_budget.py)
    hf_token_env: str = "HF_TOKEN"
    ngc_key_env: str = "NGC_API_KEY"
    offline: bool = False
    image_upgrade: bool = True    # derive an image with newer packages when the image falls short
    evaluate: bool = True
    keep_container: bool = False

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, v: str):
        problem = recipes.check_name(v)
        if problem:
            raise ValueError(problem)
        if v.endswith(recipes.YAML_SUFFIXES) and not Path(v).expanduser().is_file():
            raise ValueError("recipe file not found (a ModelOpt library recipe is named without .yaml)")
        return v

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
    def _mem(cls, v):
        if v is not None and not re.fullmatch(r"\d+[bkmg]?", v.lower()):
            raise ValueError("must look like 16g or 512m")
        return v

    @model_validator(mode="after")
    def _defaults(self):
        if self.output is None:
            self.output = Path("out") / f"{self.model_slug}-{self.format.value.upper()}"
        if self.format is not QuantFormat.NVFP4 and self.recipe not in ("default",):
            raise ValueError(f"recipe {self.recipe!r} applies to nvfp4 (W4A4) only")
        return self

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


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror}", where=str(path),
                          advice="pass an existing YAML, JSON or TOML file to --config")
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file is not valid {path.suffix.lstrip('.') or 'JSON'}: "
                          f"{str(e).splitlines()[0]}", where=str(path))
    if not isinstance(data, dict):
        raise ConfigError("config file must hold a mapping of fields", where=str(path))
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
