"""Where the model comes from, resolved on the host before anything heavy starts.

Downloads happen HERE, on the host, with huggingface_hub, not in the container:
- the gated-access check and the token stay on the host: the container never sees
  the token and runs with HF_HUB_OFFLINE=1;
- huggingface_hub resumes interrupted downloads and reuses the user's normal cache;
- the container needs no network, so a broken download can never leave a
  half-quantized output behind.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import assets, paths
from .config import JobSpec
from .container import Bind
from .errors import ModelError

EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct-bf16"
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass
class ResolvedModel:
    container_dir: str                 # model folder as the payload sees it
    binds: list[Bind]
    host_dir: Path                     # the same folder on the host (may not exist yet: embedded)
    gguf: str | None = None            # container path of the GGUF to convert first (embedded)
    bytes: int = 0                     # weight bytes, for preflight estimates
    created_cache: list[str] = field(default_factory=list)


def token_from(env_name: str) -> str | None:
    """The token from the named variable, else huggingface_hub's stored login."""
    tok = os.environ.get(env_name)
    if tok:
        return tok
    from huggingface_hub import get_token
    return get_token()


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) + \
        sum(p.stat().st_size for p in folder.glob("*.bin"))


def resolve(spec: JobSpec, *, dry_run: bool = False) -> ResolvedModel:
    if spec.is_embedded:
        return _embedded()
    if spec.is_local:
        return _local(Path(spec.model).expanduser())
    return _hub(spec, dry_run=dry_run)


def embedded_needs_conversion() -> bool:
    """The embedded GGUF is converted to bf16 safetensors by the payload's first run."""
    return not (paths.models_dir() / EMBEDDED_DIRNAME / "config.json").exists()


def _embedded() -> ResolvedModel:
    gguf = assets.embedded_gguf()
    models = paths.models_dir()
    models.mkdir(parents=True, exist_ok=True)
    host_dir = models / EMBEDDED_DIRNAME
    created = [str(host_dir)] if embedded_needs_conversion() else []
    return ResolvedModel(
        container_dir=f"/models/{EMBEDDED_DIRNAME}",
        binds=[Bind(models, "/models", read_only=False), Bind(gguf.parent, "/assets")],
        host_dir=host_dir, gguf=f"/assets/{gguf.name}", bytes=gguf.stat().st_size * 3,
        created_cache=created)


def _local(folder: Path) -> ResolvedModel:
    if not folder.exists():
        raise ModelError(f"model folder does not exist: {folder}",
                         advice="pass an existing folder with config.json, or a Hugging Face id like org/name")
    if not (folder / "config.json").exists():
        raise ModelError(f"no config.json in {folder}: not a Hugging Face model folder",
                         advice="point --model at the folder that holds config.json and *.safetensors")
    folder = folder.resolve()
    return ResolvedModel(container_dir="/model", binds=[Bind(folder, "/model")], host_dir=folder,
                         bytes=weight_bytes(folder))


def _hub(spec: JobSpec, *, dry_run: bool) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    token = token_from(spec.hf_token_env)
    offline = spec.offline or os.environ.get("HF_HUB_OFFLINE") == "1"
    cache = paths.hf_hub_cache()
    repo_folder = cache / ("models--" + spec.model.replace("/", "--"))
    existed = repo_folder.exists()
    if not offline:
        check_access(spec.model, spec.revision, token)
    if dry_run:
        return ResolvedModel(container_dir="/hf", binds=[], host_dir=repo_folder)
    try:
        snap = Path(snapshot_download(spec.model, revision=spec.revision, token=token, cache_dir=cache,
                                      allow_patterns=WEIGHT_PATTERNS, local_files_only=offline))
    except LocalEntryNotFoundError:
        raise ModelError(f"{spec.model} is not in the local Hugging Face cache and we are offline",
                         where=str(cache), advice="download it once while online, or unset HF_HUB_OFFLINE") from None
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise _access_error(spec.model, e, token) from None
    except OSError as e:
        raise ModelError(f"download of {spec.model} failed: {e}", where=str(cache),
                         advice="check the network and free disk; rerun to resume the download") from None
    rel = snap.relative_to(repo_folder)
    # Mount the whole repo folder: snapshot files are symlinks into ../../blobs.
    return ResolvedModel(container_dir=f"/hf/{rel}", binds=[Bind(repo_folder, "/hf")], host_dir=snap,
                         bytes=weight_bytes(snap), created_cache=[] if existed else [str(repo_folder)])


def check_access(repo_id: str, revision: str | None, token: str | None) -> int:
    """Fail fast on a missing, private or gated repo; return its weight bytes."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(token=token)
    try:
        # auth_check fails on a gated repo without access; model_info alone would not.
        api.auth_check(repo_id, token=token)
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise _access_error(repo_id, e, token) from None
    except HfHubHTTPError as e:
        raise ModelError(f"cannot reach the Hugging Face hub for {repo_id}: {str(e).splitlines()[0]}",
                         advice="check the network, or use --offline with a model already in the cache") from None
    except OSError as e:
        raise ModelError(f"cannot reach the Hugging Face hub for {repo_id}: {e}",
                         advice="check the network, or use --offline with a model already in the cache") from None
    return sum((s.size or 0) for s in info.siblings or [] if s.rfilename.endswith(".safetensors"))


def _access_error(repo_id: str, e: Exception, token: str | None) -> ModelError:
    from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

    if isinstance(e, GatedRepoError):
        if token:
            return ModelError(f"{repo_id} is gated and your token has no access yet",
                              advice=f"accept the license at https://huggingface.co/{repo_id}, then retry")
        return ModelError(f"{repo_id} is gated and no Hugging Face token was found",
                          advice="export HF_TOKEN=hf_... (or `hf auth login`) after accepting the license")
    if isinstance(e, RevisionNotFoundError):
        return ModelError(f"{repo_id} has no such revision", advice="check --revision")
    return ModelError(f"{repo_id} was not found on the Hugging Face hub" + ("" if token else " (or it is private)"),
                      advice="check the id (org/name); private repos need HF_TOKEN")
