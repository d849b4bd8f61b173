"""Where the launcher keeps things on the host.

One home folder (default `~/.cache/spark-nvfp4`, or `$SPARK_NVFP4_HOME`) holds run
records, the embedded assets fetched from the package registries, and converted
models. Hugging Face downloads go to the user's normal hub cache so that models they
already have are reused.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "SPARK_NVFP4_HOME"


def home() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".cache" / "spark-nvfp4").expanduser()


def runs_dir() -> Path:
    return home() / "runs"


def assets_dir() -> Path:
    return home() / "assets"


def models_dir() -> Path:
    return home() / "models"


def lm_eval_dir() -> Path:
    """lm-eval's wheels per image (`eval --tasks`), fetched on the host: <version>-<image id> folders."""
    return home() / "lm-eval"


def hf_hub_cache() -> Path:
    from huggingface_hub import constants  # heavy, hub cache only: paths stays stdlib for benchmarks

    return Path(constants.HF_HUB_CACHE)


def hf_repo_folder(repo_id: str, repo_type: str = "model") -> Path:
    """A repo's folder in the hub cache (`models--org--name`), named by huggingface_hub itself."""
    from huggingface_hub.file_download import repo_folder_name  # heavy, as in hf_hub_cache

    return hf_hub_cache() / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
