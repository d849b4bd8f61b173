"""lm-evaluation-harness for the container, fetched on the host (`launcher eval --tasks`).

NVIDIA's images do not carry lm-eval, and the payload container has no network and no token.
So the host downloads its wheels, like the model and the calibration data: `pip download` for
the image's platform and Python (from the image probe), resolved with every package the image
already has pinned at the image's version, so nothing the container installs replaces one of
the image's own (container_payload/tasks.py installs only what the image lacks, into its tmpfs).
A dependency published only as a source archive (sqlitedict, word2number) is built into a wheel
here; only pure-Python ones are accepted, since the host's compiler is not the image's.

    <home>/lm-eval/<version>-<image id, 12>/        complete when its MARKER file exists
    <home>/lm-eval/<version>-<image id, 12>/site/   installed by the image's first run, reused after

The folder is written under a temporary name and renamed when complete, so a half-fetched set
never looks usable; the host's pip settings (mirror, proxy CA) apply as for any pip call here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..common import paths
from ..common.errors import ConfigError, LauncherError
from ..common.files import atomic_write_text, make_shareable
from ..containers.image_probe import ImageProbe

LM_EVAL_VERSION = "0.4.13"   # the version the payload is tested with (its own deps: no torch pin)
MARKER = "COMPLETE"
# manylinux levels every supported image's glibc has (Debian 12: 2.36, Ubuntu 24.04: 2.39)
MANYLINUX = ["manylinux2014", *(f"manylinux_2_{n}" for n in range(17, 29))]
PIP_TIMEOUT_S = 900
MAX_SOURCE_ONLY = 8   # source-only dependencies built here before we give up


SITE = "site"   # lm-eval installed for the image by its first run (container_payload/tasks.py), reused after


def folder_for(image: ImageProbe) -> Path:
    return paths.lm_eval_dir() / f"{LM_EVAL_VERSION}-{image.image_id.removeprefix('sha256:')[:12]}"


def ready(image: ImageProbe) -> Path | None:
    folder = folder_for(image)
    return folder if (folder / MARKER).is_file() and not folder.is_symlink() else None


def fetch(image: ImageProbe, console, offline: bool = False, record=None) -> Path:
    """The folder of lm-eval's wheels for `image`, downloaded if not yet here; `record(path)` is told
    of a folder this call created (the run's record: `rollback --cache` removes it)."""
    done = ready(image)
    if done:
        return done
    folder = folder_for(image)
    if offline:
        raise LauncherError(f"lm-eval's wheels for this image are not in {folder}", where="--tasks",
                            advice="run the same command once on a machine with network (it fetches them), "
                                   "or copy that folder here")
    folder.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"fetching lm-eval {LM_EVAL_VERSION} wheels for {image.arch}, Python {image.python} "
                  f"into {folder}", highlight=False)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        atomic_write_text(work / "constraints.txt", "\n".join(_constraints(image)) + "\n")
        for _ in range(MAX_SOURCE_ONLY + 1):
            missing = _download(image, work)
            if missing is None:
                break
            _build_pure_wheel(missing, work)
        else:
            raise LauncherError("lm-eval has too many dependencies without wheels", where=str(folder))
        (work / "constraints.txt").unlink()
        atomic_write_text(work / MARKER, f"lm-eval=={LM_EVAL_VERSION}\n")
        make_shareable(work)
        work.chmod(0o755)   # the container's user reads it
        if folder.exists():
            shutil.rmtree(folder)   # an incomplete set of an earlier, interrupted fetch (ours by name)
        work.rename(folder)
        if record is not None:
            record(str(folder))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _constraints(image: ImageProbe) -> list[str]:
    """The image's packages at its versions (pip may add beside them, never replace them)."""
    return sorted(f"{name}=={version}" for name, version in image.packages.items()
                  if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and re.fullmatch(r"[0-9][0-9A-Za-z.+!_-]*", version))


def _python_tag(image: ImageProbe) -> str:
    major, minor = (image.python.split(".") + ["0"])[:2]
    return f"{major}.{minor}"


def _pip(args: list[str], what: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    try:
        return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--retries", "1",
                               "--timeout", "20"], capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise LauncherError(f"pip took over {PIP_TIMEOUT_S} s to {what}", where="--tasks",
                            advice="check the network and pip's index settings") from None


def _download(image: ImageProbe, work: Path) -> str | None:
    """One resolution of lm-eval for the image's platform; the name of a dependency that has no
    wheel (to build here), or None when every wheel is in `work`."""
    platforms = [a for tag in MANYLINUX for a in ("--platform", f"{tag}_{image.arch}")]
    proc = _pip(["download", f"lm-eval=={LM_EVAL_VERSION}", "--dest", str(work), "--find-links", str(work),
                 "--only-binary=:all:", "--implementation", "cp", "--python-version", _python_tag(image),
                 *platforms, "--constraint", str(work / "constraints.txt")], "download lm-eval")
    if proc.returncode == 0:
        return None
    text = proc.stdout + proc.stderr
    found = re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)", text)
    if found and "lm-eval" not in found.group(1) and "lm_eval" not in found.group(1):
        return found.group(1)
    raise ConfigError(f"could not fetch lm-eval {LM_EVAL_VERSION}'s wheels: {_last_error(text)}", where="--tasks",
                      advice="check the network and pip's index settings (the host fetches them, never the container)")


def _build_pure_wheel(name: str, work: Path) -> None:
    before = set(work.glob("*.whl"))
    proc = _pip(["wheel", "--no-deps", "--wheel-dir", str(work), "--constraint", str(work / "constraints.txt"),
                 name], f"build {name}")
    made = set(work.glob("*.whl")) - before
    if proc.returncode != 0 or not made:
        raise ConfigError(f"could not fetch {name} (an lm-eval dependency without wheels): "
                          f"{_last_error(proc.stdout + proc.stderr)}", where="--tasks", advice="check the network")
    impure = [w.name for w in made if not w.name.endswith("-none-any.whl")]
    if impure:
        raise ConfigError(f"{name} has no wheel for the image's platform and compiles native code ({impure[0]})",
                          where="--tasks", advice="fetch it on a machine of the image's platform")


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("ERROR")]
    return (lines[-1] if lines else (text.strip().splitlines() or ["?"])[-1])[:300]


def site_for(wheels: Path) -> tuple[Path, bool]:
    """Where the container finds lm-eval installed: the image's site folder when an earlier run
    completed it (mounted read-only), else a fresh folder it installs into (`keep_site` after)."""
    site = wheels / SITE
    if (site / MARKER).is_file() and not site.is_symlink():
        return site, True
    return Path(tempfile.mkdtemp(prefix=f".{SITE}-", dir=wheels)), False


def keep_site(fresh: Path, wheels: Path) -> None:
    """A fresh site the container completed becomes the image's (unless another run's was first)."""
    site = wheels / SITE
    if (fresh / MARKER).is_file() and not site.exists():
        try:
            fresh.rename(site)
            return
        except OSError:
            pass   # another run renamed its own first
    shutil.rmtree(fresh, ignore_errors=True)
