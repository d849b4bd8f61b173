"""Where the model comes from, resolved on the host before anything heavy starts.

Downloads happen HERE, on the host, with huggingface_hub, not in the container:
- the gated-access check and the token stay on the host: the container never sees
  the token and runs with HF_HUB_OFFLINE=1;
- huggingface_hub resumes interrupted downloads and reuses the user's normal cache;
- the container needs no network, so a broken download can never leave a
  half-quantized output behind.
Hub datasets for calibration (`--calib hf:...`) are fetched here too, for the same
reasons: the token never enters a container, and the container stays offline.

Every hub failure, whatever transport huggingface_hub uses underneath (httpx2 in
2.x, httpx in 1.x, requests before), becomes one ModelError line with advice.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from huggingface_hub import HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from ..common import paths
from ..common.config import JobSpec
from ..common.errors import ConfigError, ModelError
from ..common.untrusted import link_out_of, printable, read_json_object
from ..containers.container import Bind
from . import assets

# -v2: the converted tokenizer is PreTrainedTokenizerFast, the same to transformers 4.x and 5.x
# (container_payload/quantize.py: portable_tokenizer_config); -v3: its config.json carries the
# top-level rope_theta 4.x reads (portable_rope_config). Earlier conversions are left alone.
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct-bf16-v3"
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
CODE_PATTERNS = ["*.py"]   # a model's own code (auto_map), fetched only with --trust-remote-code
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".txt", ".arrow")
CALIB_DATA_BYTES = 64_000_000   # the payload reads at most this much text of a dataset
EMBEDDED_BYTES_GUESS = 270_000_000   # bf16 SmolLM2-135M, before its GGUF is fetched
OFFLINE_ADVICE = "check the network, or use --offline with a model already in the cache"


@dataclass
class ResolvedModel:
    container_dir: str                 # model folder as the payload sees it
    binds: list[Bind]
    host_dir: Path                     # the same folder on the host (may not exist yet: embedded)
    gguf: str | None = None            # container path of the GGUF to convert first (embedded)
    bytes: int = 0                     # weight bytes, for preflight estimates
    created_cache: list[str] = field(default_factory=list)
    staging: Path | None = None        # embedded, first run: the only folder the payload writes


def token_from(env_name: str) -> str | None:
    """The token from the named variable, else huggingface_hub's stored login."""
    tok = os.environ.get(env_name)
    if tok:
        return tok
    return get_token()


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) + \
        sum(p.stat().st_size for p in folder.glob("*.bin"))


def transport_errors() -> tuple[type[BaseException], ...]:
    """The exceptions huggingface_hub lets through when the network fails: OSError, and
    the HTTP client's own error base class, whichever client this version uses."""
    found: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def check_repo_id(repo_id: str, where: str = "--model") -> None:
    """A hub id must be org/name in the hub's alphabet: caught before Docker or the network."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(f"{repo_id!r:.80} is not a model folder or a Hugging Face id", where=where,
                          advice="pass org/name (letters, digits, '-', '_', '.'), or an existing folder") from None


def validate(spec: JobSpec) -> None:
    """Every model check that needs neither Docker nor the network."""
    if spec.is_embedded:
        return
    if spec.is_local:
        _local(Path(spec.model).expanduser())
        return
    check_repo_id(spec.model)


def refuse_links_out(ckpt: Path) -> None:
    """A checkpoint (a tarball's, a clone's) whose file links out of its folder is refused before
    anything of it is read (untrusted.link_out_of: the rule verify applies too)."""
    with os.scandir(ckpt) as entries:
        for entry in entries:
            escape = entry.is_symlink() and link_out_of(Path(entry.path), ckpt)
            if escape:
                raise ConfigError(f"{printable(entry.name)} in the checkpoint is {escape}", where=printable(entry.path),
                                  advice="put the file itself in the checkpoint folder in place of the link, or remove it")


def check_remote_code(model_dir: Path, trusted: bool, what: str) -> None:
    """A model whose config.json names its own code (auto_map) runs only with --trust-remote-code:
    checked on the host, on the files the payload would read, before any container starts. The one
    rule for every command that loads a model in a container (quantize, eval, serve); `what` names
    the model as the user gave it."""
    config = read_json_object(Path(model_dir) / "config.json", follow_symlinks=True) or {}  # hub snapshots link blobs
    auto_map = config.get("auto_map")
    if auto_map and not trusted:
        classes = ", ".join(sorted(map(str, auto_map.values()))[:2]) if isinstance(auto_map, dict) else "?"
        raise ModelError(f"{what} ships its own Python code ({classes}), which would run in the container",
                         where=str(Path(model_dir) / "config.json"),
                         advice="read that code; if you trust it, pass --trust-remote-code")


def download_bytes(spec: JobSpec) -> tuple[int, int]:
    """(weight bytes, bytes still to download) for preflight, before any download. The hub
    is asked for the sizes (and access checked); what the cache already holds is subtracted."""
    if spec.is_embedded:
        converted = paths.models_dir() / EMBEDDED_DIRNAME
        gguf = paths.assets_dir() / assets.SMOLLM2_GGUF
        return (weight_bytes(converted) or (gguf.stat().st_size * 3 if gguf.exists() else EMBEDDED_BYTES_GUESS)), 0
    if spec.is_local:
        return weight_bytes(Path(spec.model).expanduser()), 0
    repo_folder = paths.hf_repo_folder(spec.model)
    if is_offline(spec):
        return cached_weight_bytes(spec.model), 0
    total = check_access(spec.model, spec.revision, token_from(spec.hf_token_env))
    blobs = repo_folder / "blobs"
    cached = sum(p.stat().st_size for p in blobs.iterdir() if p.is_file()) if blobs.is_dir() else 0
    return total, max(0, total - cached)


def cached_weight_bytes(repo_id: str) -> int:
    """Weight bytes of the largest snapshot of `repo_id` in the hub cache; 0 when none."""
    snaps = paths.hf_repo_folder(repo_id) / "snapshots"
    return max((weight_bytes(s) for s in snaps.glob("*") if s.is_dir()), default=0)


def is_offline(spec: JobSpec) -> bool:
    """--offline, or huggingface_hub's own setting (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE = 1,
    true, yes, on): the launcher leaves the hub alone exactly when huggingface_hub would."""
    return spec.offline or constants.is_offline_mode()


def resolve(spec: JobSpec, *, dry_run: bool = False, on_create: Callable[[str], None] | None = None,
            access_checked: bool = False) -> ResolvedModel:
    """The model on the host. `on_create(path)` is called BEFORE a cache folder is first
    written, so that a failed or interrupted download is in the run record for rollback."""
    if spec.is_embedded:
        return _embedded(on_create, dry_run)
    if spec.is_local:
        return _local(Path(spec.model).expanduser())
    return _hub(spec, dry_run=dry_run, on_create=on_create, access_checked=access_checked)


def embedded_needs_conversion() -> bool:
    """The embedded GGUF is converted to bf16 safetensors by the payload's first run."""
    return not (paths.models_dir() / EMBEDDED_DIRNAME / "config.json").exists()


def _embedded(on_create: Callable[[str], None] | None = None, dry_run: bool = False) -> ResolvedModel:
    gguf = assets.embedded_gguf()
    models = paths.models_dir()
    host_dir = models / EMBEDDED_DIRNAME
    if not embedded_needs_conversion():
        # converted already: an input like any other, mounted read-only
        return ResolvedModel(container_dir=f"/models/{EMBEDDED_DIRNAME}",
                             binds=[Bind(host_dir, f"/models/{EMBEDDED_DIRNAME}")], host_dir=host_dir,
                             bytes=weight_bytes(host_dir))
    # First run: the payload converts the GGUF into a fresh staging folder, the only thing
    # it may write; finish_embedded() moves the result into place on the host.
    staging = models / f"{EMBEDDED_DIRNAME}.convert-{os.urandom(3).hex()}"
    if not dry_run:
        models.mkdir(parents=True, exist_ok=True)
        if on_create:
            on_create(str(staging))
            on_create(str(host_dir))
        staging.mkdir()
    return ResolvedModel(
        container_dir=f"/models/{EMBEDDED_DIRNAME}",
        binds=[Bind(staging, "/models", read_only=False), Bind(gguf.parent, "/assets")],
        host_dir=host_dir, gguf=f"/assets/{gguf.name}", bytes=gguf.stat().st_size * 3,
        created_cache=[str(host_dir)], staging=staging)


def finish_embedded(model: ResolvedModel) -> None:
    """Move the payload's conversion into models/ (once; a concurrent run may have won), and remove
    this run's staging folder. Called whether or not the run succeeded: the payload writes the
    conversion under a temporary name and renames it when complete (loading.prepare_embedded), so
    a folder of the final name is a whole conversion; anything else in staging is a cut one."""
    if model.staging is None:
        return
    made = model.staging / EMBEDDED_DIRNAME
    if made.is_dir() and not made.is_symlink() and not model.host_dir.exists():
        os.replace(made, model.host_dir)
    shutil.rmtree(model.staging, ignore_errors=True)


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


def _hub(spec: JobSpec, *, dry_run: bool, on_create: Callable[[str], None] | None = None,
         access_checked: bool = False) -> ResolvedModel:
    check_repo_id(spec.model)
    token = token_from(spec.hf_token_env)
    offline = is_offline(spec)
    cache = paths.hf_hub_cache()
    repo_folder = paths.hf_repo_folder(spec.model)
    existed = repo_folder.exists()
    if not offline and not access_checked:
        check_access(spec.model, spec.revision, token)
    if dry_run and not offline:  # offline, snapshot_download only looks in the cache: a dry run too
        return ResolvedModel(container_dir="/hf", binds=[], host_dir=repo_folder)
    if not existed and not offline and on_create:
        on_create(str(repo_folder))  # recorded as the download starts: an interrupted one can be rolled back
    try:
        patterns = WEIGHT_PATTERNS + (CODE_PATTERNS if spec.trust_remote_code else [])
        snap = Path(snapshot_download(spec.model, revision=spec.revision, token=token, cache_dir=cache,
                                      allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError:
        raise ModelError(f"{spec.model} is not in the local Hugging Face cache and we are offline",
                         where=str(cache), advice="download it once while online, or unset HF_HUB_OFFLINE") from None
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise _access_error(spec.model, e, token) from None
    except (HfHubHTTPError, *transport_errors()) as e:
        raise ModelError(f"download of {spec.model} failed: {_first_line(e)}", where=str(cache),
                         advice="check the network and free disk; rerun to resume the download") from None
    rel = snap.relative_to(repo_folder)
    # Mount the whole repo folder: snapshot files are symlinks into ../../blobs.
    return ResolvedModel(container_dir=f"/hf/{rel}", binds=[Bind(repo_folder, "/hf")], host_dir=snap,
                         bytes=weight_bytes(snap), created_cache=[] if existed else [str(repo_folder)])


def check_access(repo_id: str, revision: str | None, token: str | None) -> int:
    """Fail fast on a missing, private or gated repo; return its weight bytes."""
    info = hub_model_info(repo_id, revision, token)
    return sum((s.size or 0) for s in info.siblings or [] if s.rfilename.endswith(".safetensors"))


def hub_model_info(repo_id: str, revision: str | None, token: str | None):
    """The hub's ModelInfo of the revision (its commit, files, sizes and blob hashes), with
    access checked; every failure one ModelError line."""
    api = HfApi(token=token)
    try:
        # auth_check fails on a gated repo without access; model_info alone would not.
        api.auth_check(repo_id, token=token)
        return api.model_info(repo_id, revision=revision, files_metadata=True)
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise _access_error(repo_id, e, token) from None
    except (HfHubHTTPError, *transport_errors()) as e:
        raise ModelError(f"cannot reach the Hugging Face hub for {repo_id}: {_first_line(e)}",
                         advice=OFFLINE_ADVICE) from None


def hub_dataset_commit(name: str, token: str | None) -> str | None:
    """The commit of a hub dataset's main branch (what fetch_dataset downloads)."""
    try:
        return getattr(HfApi(token=token).dataset_info(name), "sha", None)
    except (HfHubHTTPError, *transport_errors()) as e:
        raise ModelError(f"dataset {name}: {_first_line(e)}", where="--calib",
                         advice="check the name and the network; gated or private datasets need HF_TOKEN") from None


def _access_error(repo_id: str, e: Exception, token: str | None) -> ModelError:
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


# ---------------------------------------------------------------- hub datasets for calibration

@dataclass
class CalibrationData:
    source: str          # what the payload reads: hf:/calib-hf/<snapshot>:SPLIT:FIELD
    bind: Bind           # the dataset's cache folder, read-only
    created: str | None  # the cache folder, when this run creates it


def parse_hf_source(source: str) -> tuple[str, str, str]:
    name, split, fld = (source[3:].split(":") + ["train", "text"])[:3]
    check_repo_id(name, where="--calib")
    return name, split or "train", fld or "text"


def fetch_dataset(source: str, token_env: str, offline: bool,
                  on_create: Callable[[str], None] | None = None) -> CalibrationData:
    """Download the data files of one split of a hub dataset on the host (about the
    64 MB the payload reads, not the whole dataset) into the normal HF cache. The payload
    then reads that folder, mounted read-only, with no network and no token."""
    name, split, fld = parse_hf_source(source)
    token = token_from(token_env)
    cache = paths.hf_hub_cache()
    repo_folder = paths.hf_repo_folder(name, "dataset")
    existed = repo_folder.exists()
    try:
        patterns = None
        if not offline:
            info = HfApi(token=token).dataset_info(name, files_metadata=True)
            patterns = _split_files(info.siblings or [], split)
            if not patterns:
                raise ModelError(f"dataset {name} has no data files for split {split!r}", where="--calib",
                                 advice="check the split name (hf:DATASET:SPLIT:FIELD)")
            if not existed and on_create:
                on_create(str(repo_folder))
        snap = Path(snapshot_download(name, repo_type="dataset", token=token, cache_dir=cache,
                                      allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError:
        raise ModelError(f"dataset {name} is not in the local Hugging Face cache and we are offline",
                         where=str(cache), advice="fetch it once while online, or use --calib FILE") from None
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelError(f"dataset {name}: {_first_line(e)}", where="--calib",
                         advice="check the name; gated or private datasets need HF_TOKEN") from None
    except (HfHubHTTPError, *transport_errors()) as e:
        raise ModelError(f"cannot fetch dataset {name} from the Hugging Face hub: {_first_line(e)}",
                         where="--calib", advice="check the network, or use --calib FILE / builtin") from None
    rel = snap.relative_to(repo_folder).as_posix()
    return CalibrationData(f"hf:/calib-hf/{rel}:{split}:{fld}", Bind(repo_folder, "/calib-hf"),
                           None if existed else str(repo_folder))


def _split_files(siblings, split: str) -> list[str]:
    """Data files of the split, in order, until about CALIB_DATA_BYTES."""
    data = sorted((s for s in siblings if s.rfilename.endswith(DATA_SUFFIXES)), key=lambda s: s.rfilename)
    named = [s for s in data if split in Path(s.rfilename).name or f"/{split}/" in f"/{s.rfilename}"]
    chosen, size = [], 0
    for s in named or data:
        chosen.append(s.rfilename)
        size += s.size or 0
        if size >= CALIB_DATA_BYTES:
            break
    return chosen
