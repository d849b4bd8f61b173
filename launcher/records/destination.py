"""Where a checkpoint may go: the --output folder, refused in one line before anything runs
(no Docker, no record) when it cannot be one.

A run writes three things at the output's place: the hidden partial folder, the lock file
beside it, then the output itself (the partial renamed). All three names must fit the
filesystem, and the folder that will hold them must be creatable by this user; that is
asked of the filesystem itself (a temporary folder made and removed), since permission
bits say nothing about root, read-only mounts or /proc.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psutil

from ..common import paths
from ..common.errors import ConfigError
from .locks import lock_path

# filesystems of the kernel's own state: never a place for a checkpoint (root can write some)
KERNEL_FILESYSTEMS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "securityfs",
                      "tracefs", "configfs", "fusectl", "bpf", "pstore", "mqueue", "hugetlbfs", "binfmt_misc"}
SAMPLE_RUN_ID = "20260101-000000-abcdef"   # runs.RUN_ID's length, for the partial folder's name
ADVICE = "choose a folder of its own, e.g. out/NAME-NVFP4"


def partial_path(output: Path, run_id: str) -> Path:
    """The hidden folder a run writes into, renamed to `output` once verified."""
    return output.parent / f".{output.name}.partial-{run_id}"


def replaced_path(output: Path, run_id: str) -> Path:
    """Where run `run_id` moves an older checkpoint of another job aside, before deleting it."""
    return output.parent / f".{output.name}.partial-{run_id}.old"


def check_output(output: Path | str, *, model_folder: Path | None = None) -> Path:
    """The resolved output folder; ConfigError (one line: what, --output, what to do) when a
    run could not write it, or must not."""
    output = Path(os.path.abspath(Path(output).expanduser()))
    _names_fit(output)
    output = output.resolve()
    if output == Path(output.anchor):
        raise ConfigError(f"output {output} is the filesystem root", where="--output", advice=ADVICE)
    if output.parent == Path(output.anchor) and os.path.isdir(output):
        raise ConfigError(f"output {output} is a system folder", where="--output", advice=ADVICE)
    if output == Path.home().resolve():
        raise ConfigError(f"output {output} is your home folder", where="--output", advice=ADVICE)
    fs = _filesystem(output)
    if fs in KERNEL_FILESYSTEMS:
        raise ConfigError(f"output {output} is on the kernel's {fs} filesystem, which cannot hold files",
                          where="--output", advice=ADVICE)
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ConfigError(f"output is an existing file, not a folder: {output}", where="--output",
                          advice="choose another --output")
    forbidden = [("the Hugging Face cache", paths.hf_hub_cache()), ("the launcher's home", paths.home())]
    if model_folder is not None:
        forbidden.append(("the model folder", model_folder))
    for what, folder in forbidden:
        folder = folder.expanduser().resolve()
        if output == folder or folder in output.parents or output in folder.parents:
            raise ConfigError(f"output {output} is inside {what} (or holds it)", where="--output", advice=ADVICE)
    _creatable(output.parent)
    return output


def _names_fit(output: Path) -> None:
    """Every name the run will create there fits the filesystem (NAME_MAX, PATH_MAX); checked
    first, since the OS answers a too-long name with an error at the first stat."""
    base = _existing_folder(output.parent)
    name_max = _conf(base, "PC_NAME_MAX", 255)
    new = [p.name for p in (output, *output.parents) if p != base and base in p.parents]
    made = [partial_path(output, SAMPLE_RUN_ID).name, lock_path(output).name]
    for name in new + made:
        if len(os.fsencode(name)) > name_max:
            why = (f" (the run's partial folder {len(made[0]) - len(output.name)} more than the output's)"
                   if name in made else "")
            raise ConfigError(f"output name is too long for its filesystem: {name[:40]}... is "
                              f"{len(os.fsencode(name))} bytes, at most {name_max} allowed there{why}",
                              where="--output", advice="choose a shorter --output")
    path_max = _conf(base, "PC_PATH_MAX", 4096)
    longest = len(os.fsencode(partial_path(output, SAMPLE_RUN_ID))) + 256   # files inside the checkpoint
    if longest > path_max:
        raise ConfigError(f"output path is too long: {len(os.fsencode(output))} bytes, the files in it would "
                          f"pass the {path_max}-byte limit", where="--output", advice="choose a shorter --output")


def _creatable(folder: Path) -> None:
    """This user can create folders where `folder` is (or will be): asked of the filesystem."""
    base = _existing_folder(folder)
    if os.path.lexists(base) and not os.path.isdir(base):
        raise ConfigError(f"output is under {base}, which is a file, not a folder", where="--output",
                          advice="choose another --output")
    try:
        probe = tempfile.mkdtemp(prefix=".spark-nvfp4-probe-", dir=base)
    except OSError as e:
        raise ConfigError(f"cannot create the output: {base} does not allow new folders ({e.strerror})",
                          where="--output", advice="choose a folder you can write, e.g. out/NAME-NVFP4") from None
    os.rmdir(probe)


def _existing_folder(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (a folder, or the file that blocks the way)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _conf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path if os.path.isdir(path) else path.parent, name)
    except (OSError, ValueError):
        return default


def _filesystem(path: Path) -> str:
    """The type of the filesystem `path` is (or would be) on: the longest mount point above it."""
    best, kind = "", ""
    try:
        mounts = psutil.disk_partitions(all=True)
    except OSError:
        return ""
    for m in mounts:
        mp = m.mountpoint.rstrip("/") or "/"
        if (str(path) == mp or str(path).startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
            best, kind = mp, m.fstype
    return kind
