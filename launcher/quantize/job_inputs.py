"""What a quantize job reads, by content: two jobs with the same inputs make the same checkpoint.

Three parts, kept apart in the output's result.json (`job_inputs`) so that a rerun can say
which one changed; the job fingerprint is a hash of all three:
- model: a hub model by its resolved commit and the blob hashes of the files the job
  downloads (huggingface_hub's own names, online from the hub, offline from the cache);
  a local folder, and the embedded model once converted, by the sha256 of the bytes of
  each file the payload loads;
- calibration: the text's bytes (the builtin text included), or a hub dataset's commit;
- options: every spec value that changes the checkpoint (format, recipe, sizes, ...); a
  YAML recipe by its bytes.
Where the model lies and where the output goes are not part of it: the same files in
another folder are the same job.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from huggingface_hub.utils import filter_repo_objects

from container_payload.core import recipes

from ..common import paths, untrusted
from ..common.config import JobSpec, read_recipe_file
from ..common.errors import LauncherError
from ..sources import assets, model_source

# The files of a model folder the payload can load (transformers reads the top level only).
MODEL_PATTERNS = model_source.WEIGHT_PATTERNS + model_source.CODE_PATTERNS + ["*.bin"]
COMMIT = re.compile(r"[0-9a-f]{40}")


def job_inputs(spec: JobSpec) -> dict:
    """The job's inputs by content (JSON-able). A part is None when it cannot be known now
    (offline with a model not in the cache): such a job is never reused."""
    return {"model": model_identity(spec), "calibration": calibration_identity(spec), "options": options(spec)}


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def options(spec: JobSpec) -> dict:
    """Spec values that change the checkpoint's bytes, as they are (so a rerun can name the one
    that changed). Not where things are, and not what only changes speed or memory (mode,
    low_memory: the same bytes, README: Memory)."""
    keys = spec.model_dump(mode="json", include={"format", "recipe", "kv_cache"})
    keys["calibration"] = spec.calibration.model_dump(mode="json", exclude={"source"})
    if spec.recipe_params:
        keys["recipe_params"] = spec.recipe_params
    if spec.recipe.endswith(recipes.YAML_SUFFIXES):  # the user's YAML recipe: what it says, not where
        keys["recipe"] = "sha256:" + hashlib.sha256(read_recipe_file(Path(spec.recipe))).hexdigest()
    return keys


# ---------------------------------------------------------------- the model

def model_identity(spec: JobSpec) -> dict | None:
    if spec.is_embedded:
        converted = paths.models_dir() / model_source.EMBEDDED_DIRNAME
        if model_source.embedded_needs_conversion():
            return {"kind": "embedded", "converted": False}  # no checkpoint was made from it yet
        return {"kind": "files", "files": folder_hashes(converted)}
    if spec.is_local:
        return {"kind": "files", "files": folder_hashes(Path(spec.model).expanduser())}
    return hub_identity(spec)


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each file the payload may load from `folder`.

    Every byte is read. A 16 GB bf16 model costs ~16 GB of reads: OpenSSL's sha256 runs at
    ~0.6 GB/s a core on this x86 CI host and ~1.5-2 GB/s on the Spark's Grace cores (ARMv8 SHA2
    instructions), and hashlib drops the GIL, so the shards are hashed in parallel: seconds,
    against minutes of calibration, and the page cache it fills is what the payload reads next.
    size + mtime + inode would cost nothing, but `cp -p`, `rsync -t` or `touch -r` keep an edited
    file's mtime, and that would hand back a stale checkpoint: correctness first."""
    names = sorted(p.name for p in folder.iterdir()
                   if any(fnmatch.fnmatch(p.name, pat) for pat in MODEL_PATTERNS))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda n: file_sha256(folder / n, "--model"), names)
        return dict(zip(names, digests))


def file_sha256(path: Path, where: str) -> str:
    """sha256 of a regular file's bytes (a FIFO or device is refused, never read; a model
    folder's own links, as in an HF snapshot, are followed)."""
    with untrusted.open_regular(path, "model file", follow_symlinks=True,
                                advice="check that the file exists and is readable") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hub_identity(spec: JobSpec) -> dict | None:
    """{repo, commit, files: {name: blob}} of the files the job downloads. The blob names are
    the cache's file names (sha256 for LFS files, the git blob id for the others): the same
    whether read from the hub or from the cache, so an online and an offline run agree."""
    patterns = model_source.WEIGHT_PATTERNS + (model_source.CODE_PATTERNS if spec.trust_remote_code else [])
    if model_source.is_offline(spec):
        commit = cached_commit(spec.model, spec.revision)
        return None if commit is None else {"repo": spec.model, "commit": commit,
                                            "files": cached_blobs(spec.model, commit, patterns)}

    info = model_source.hub_model_info(spec.model, spec.revision, model_source.token_from(spec.hf_token_env))
    commit = getattr(info, "sha", None)
    if not commit:
        return None
    siblings = filter_repo_objects(info.siblings or [], allow_patterns=patterns, key=lambda s: s.rfilename)
    return {"repo": spec.model, "commit": commit,
            "files": {s.rfilename: (s.lfs.sha256 if getattr(s, "lfs", None) else getattr(s, "blob_id", None))
                      for s in sorted(siblings, key=lambda s: s.rfilename)}}


def cached_commit(repo_id: str, revision: str | None, repo_type: str = "model") -> str | None:
    """The commit a revision names in the hub cache (refs/<revision>), or the revision itself
    when it is a commit; None when the cache does not know it."""
    folder = paths.hf_repo_folder(repo_id, repo_type)
    revision = revision or "main"
    if COMMIT.fullmatch(revision):
        return revision if (folder / "snapshots" / revision).is_dir() else None
    try:  # a ref file holds 40 hex digits: read no more than that, never from a FIFO
        raw = untrusted.read_capped(folder / "refs" / revision, 64, "hub cache ref", follow_symlinks=True,
                                  missing_ok=True)
    except LauncherError:
        return None
    commit = (raw or b"").decode("ascii", "replace").strip()
    return commit if COMMIT.fullmatch(commit) else None


def cached_blobs(repo_id: str, commit: str, patterns: list[str]) -> dict[str, str]:
    snap = paths.hf_repo_folder(repo_id) / "snapshots" / commit
    names = sorted(filter_repo_objects([str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()],
                                       allow_patterns=patterns))
    # a snapshot file is a link to blobs/<hash>; a file copied in by hand is hashed
    return {n: Path(os.readlink(snap / n)).name if (snap / n).is_symlink()
            else "sha256:" + file_sha256(snap / n, "--model") for n in names}


# ---------------------------------------------------------------- the calibration text

def calibration_identity(spec: JobSpec) -> dict | None:
    src = spec.calibration.source
    if src.startswith("hf:"):
        name, split, fld = model_source.parse_hf_source(src)
        commit = dataset_commit(spec, name)
        return None if commit is None else {"dataset": name, "commit": commit, "split": split, "field": fld}
    path = assets.calibration_text() if src == "builtin" else Path(src).expanduser()
    # the payload reads .jsonl/.json as records and anything else as plain text
    kind = "jsonl" if path.suffix in (".jsonl", ".json") else "text"
    return {"kind": kind, "sha256": file_sha256(path, "--calib")}


def dataset_commit(spec: JobSpec, name: str) -> str | None:
    if model_source.is_offline(spec):
        return cached_commit(name, None, "dataset")
    return model_source.hub_dataset_commit(name, model_source.token_from(spec.hf_token_env))


# ---------------------------------------------------------------- why two jobs differ

def differences(old: dict | None, new: dict) -> str:
    """Why a previous output's inputs are not this job's, in a few words."""
    if not isinstance(old, dict):
        return ("it was made by an earlier launcher that fingerprinted the inputs' paths, not their "
                "content, so it cannot be proven to be this job")
    why = []
    if old.get("model") != new["model"] or new["model"] is None:
        why.append(_model_change(old.get("model"), new["model"]))
    if old.get("calibration") != new["calibration"] or new["calibration"] is None:
        why.append("the calibration text changed" if new["calibration"] is not None
                   else "the calibration dataset's revision cannot be resolved")
    if old.get("options") != new["options"]:
        why.append("the options changed (" + _option_changes(old.get("options"), new["options"]) + ")")
    return "; ".join(why) or "its fingerprint does not match this job's"


def _model_change(old, new) -> str:
    if new is None:
        return "the model's revision cannot be resolved"
    if isinstance(old, dict) and isinstance(old.get("files"), dict) and isinstance(new.get("files"), dict):
        if old.get("commit") != new.get("commit"):
            return f"the model's revision changed ({str(old.get('commit'))[:12]} -> {str(new.get('commit'))[:12]})"
        changed = sorted(set(old["files"].items()) ^ set(new["files"].items()))
        if changed:
            return f"the model's files changed ({changed[0][0]} differs)"
    return "the model changed"


def _option_changes(old, new: dict) -> str:
    old = old if isinstance(old, dict) else {}
    flat_old, flat_new = _flatten(old), _flatten(new)
    keys = sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))
    return ", ".join(f"{k}: {flat_old.get(k)} -> {flat_new.get(k)}" for k in keys[:4]) or "?"


def _flatten(d: dict, prefix: str = "", depth: int = 2) -> dict:
    """Options as dotted names (two levels: options are that deep; the old ones come from a file)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and depth > 1 and k != "recipe_params":
            out.update(_flatten(v, f"{prefix}{k}.", depth - 1))
        else:
            out[f"{prefix}{k}"] = (json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else str(v))[:60]
    return out
