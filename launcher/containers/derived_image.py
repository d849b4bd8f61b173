"""An image the payload can run, derived from the user's when theirs falls short.

NVIDIA's 2025 TensorRT-LLM images carry ModelOpt 0.37, which cannot run our recipes (and
cannot export NVFP4 at all without CUDA). NVIDIA's own playbook re-installs ModelOpt in the
container before every run; we do it once: a new image on top of the user's, holding the
lock's version of each package the job's recipe needs (container_payload/requirements.lock,
container_payload/core/recipes.py). What the image's stack is built on stays exactly as it was:
pip runs with torch, numpy, triton, TensorRT(-LLM) and every CUDA library pinned at the
versions the probe found, and the derived image is probed again to prove it.

    tag  spark-nvfp4/derived:<base image id, 12>-<lock hash, 12>   (reused by later runs)

How it is built: a container of the base image runs pip, then is committed. Docker's classic
builder (the one the Engine API offers) has no secret mounts, so a Dockerfile would bake the
host's pip settings (a proxy's CA bundle, an index URL with a password) into a layer; here
they reach pip through a read-only mount that never becomes part of the image. The container
runs the base image itself, so the result has the base's platform (aarch64 on a Spark).
The user's image is never changed, retagged or removed.
"""
from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from docker.errors import APIError, ImageNotFound
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

import docker
from container_payload.core import recipes

from ..common.daemon import LABEL_PREFIX, ROLE_LABEL
from ..common.errors import ImageError, Interrupted
from ..common.files import atomic_write_text
from ..common.output import markup
from ..records import runs
from .container import Bind, PayloadContainer
from .image_probe import ImageProbe, probe
from .session import DockerSession

REPOSITORY = "spark-nvfp4/derived"
ROLE = "derived-image"
BASE_LABEL = f"{LABEL_PREFIX}.base-image-id"
LOCK_LABEL = f"{LABEL_PREFIX}.lock"
BUILD_DIR = "/run/spark-nvfp4-build"
# The stack the image is built on: pip may add packages beside it, never change it.
FOUNDATION = re.compile(r"^(torch|torchvision|torchaudio|numpy|triton|pytorch-triton.*|tensorrt.*|"
                        r"nvidia-(?!modelopt$|ml-py$).*|cuda-.*|cupy.*|flashinfer.*)$")
# The host's pip settings that say how to reach the index (a mirror, a proxy's CA bundle), from
# pip's own config files and then its PIP_* variables, as the host's pip would read them; they
# reach the build through a read-only mount, never a layer.
PIP_KEYS = ("index-url", "extra-index-url", "trusted-host", "timeout", "retries", "cert")
PIP_CONFIG_FILES = ("/etc/xdg/pip/pip.conf", "/etc/pip.conf", "~/.pip/pip.conf", "~/.config/pip/pip.conf")


def lock_text() -> str:
    return resources.files("container_payload").joinpath("requirements.lock").read_text()


def lock_pins() -> dict[str, str]:
    """Distribution (pip's normal form) -> the exact requirement line."""
    pins = {}
    for line in lock_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins[recipes.dist_key(re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0])] = line
    return pins


def lock_hash() -> str:
    return hashlib.sha256(lock_text().encode()).hexdigest()[:12]


def tag_for(base_id: str) -> str:
    return f"{REPOSITORY}:{base_id.removeprefix('sha256:')[:12]}-{lock_hash()}"


@dataclass
class Plan:
    base_ref: str
    base: ImageProbe
    install: list[str]          # requirement lines from the lock
    constraints: list[str]      # the base's foundation, pinned
    tag: str


def runnable(client: docker.DockerClient, image_ref: str, needs: recipes.Needs, *, cuda: bool,
             rec: runs.RunRecord, console: Console, upgrade: bool = True, offline: bool = False,
             dry_run: bool = False) -> str:
    """The image to run a job with `needs` in: `image_ref` itself when it has what the job
    needs, else its derived image: reused, or built (not when `offline`). `upgrade` False
    (--no-image-upgrade) means this image exactly: a shortfall is one line, nothing else."""
    base = probe(client, image_ref, rec.id)
    console.print(markup("image: {}: {}", image_ref, base.summary()), highlight=False)
    missing = recipes.shortfalls(needs, base.packages, cuda=cuda)
    if not missing:
        return image_ref
    reasons = "; ".join(map(str, missing))
    if not upgrade:
        raise ImageError(f"{image_ref} cannot run this job: {reasons}", where="--no-image-upgrade",
                         advice="drop --no-image-upgrade to derive an image with the tested versions, or "
                                "pass --image with an image that has them")
    p = plan(image_ref, base)
    if present(client, p):
        console.print(markup("image: using {} (derived earlier: {})", p.tag, ", ".join(p.install)))
        return p.tag
    if dry_run:
        console.print(markup("would derive {} ({}) with {}", p.tag, reasons, ", ".join(p.install)))
        return p.tag
    if offline:
        raise ImageError(f"{image_ref} cannot run this job ({reasons}) and --offline forbids building "
                         f"its derived image {p.tag}", where=image_ref, advice=_offline_advice(image_ref, p.tag))
    console.print(markup("image: {} falls short ({}); deriving {} with {}", image_ref, reasons, p.tag,
                          ", ".join(p.install)))
    tag = build(client, p, rec, console)
    check(client, p, tag, rec)
    return tag


def plan(base_ref: str, base: ImageProbe) -> Plan:
    """What the derived image of `base` installs: the lock's version of everything any job
    could need and the base lacks (one image per base serves every recipe), pip resolving
    the rest with the base's foundation pinned."""
    missing = recipes.shortfalls(recipes.EVERYTHING, base.packages, cuda=False)
    pins = lock_pins()
    unknown = [m.dist for m in missing if recipes.dist_key(m.dist) not in pins]
    if unknown:  # a requirement the lock has no version for: a bug of ours, said plainly
        raise ImageError(f"the lock file has no version of {', '.join(unknown)}",
                         where="container_payload/requirements.lock", advice="please report this")
    install = [pins[recipes.dist_key(m.dist)] for m in missing]
    constraints = sorted(f"{name}=={version}" for name, version in base.packages.items()
                         if FOUNDATION.match(recipes.dist_key(name)))
    return Plan(base_ref, base, install, constraints, tag_for(base.image_id))


def present(client: docker.DockerClient, p: Plan) -> str | None:
    """The id of an earlier run's derived image for this base and lock, if there is one."""
    try:
        img = client.images.get(p.tag)
    except ImageNotFound:
        return None
    if img.labels.get(BASE_LABEL) != p.base.image_id or img.labels.get(LOCK_LABEL) != lock_hash():
        return None  # a tag of ours pointing elsewhere (edited by hand): build anew
    return img.id


def build(client: docker.DockerClient, p: Plan, rec: runs.RunRecord, console: Console) -> str:
    """Build the derived image (recorded in `rec` as soon as it exists); return its tag."""
    workdir = Path(tempfile.mkdtemp(prefix="derive-", dir=rec.folder))
    try:
        _write_context(workdir, p)
        box = PayloadContainer(client, p.base.image_id, rec.id, role="image-build")
        # root: pip installs into the image's own Python (the commit gives the base's user back)
        box.create(["/bin/sh", f"{BUILD_DIR}/build.sh"], [Bind(workdir, BUILD_DIR)], user="0:0", payload=False)
        rec.add("containers", box.container.id)
        try:
            code, tail = _run_with_progress(box, rec, console, p)
            if code != 0:
                raise ImageError(f"could not build the derived image (pip exit {code}): {tail}",
                                 where=p.base_ref, advice=_offline_advice(p.base_ref, p.tag))
            box.container.commit(repository=p.tag.split(":")[0], tag=p.tag.split(":")[1],
                                 message=f"spark-nvfp4: {', '.join(p.install)}",
                                 changes=_restore_config(client, p))
        finally:
            box.remove()
        rec.add("images", p.tag)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return p.tag


def check(client: docker.DockerClient, p: Plan, tag: str, rec: runs.RunRecord) -> None:
    """The derived image still has the base's foundation, version for version."""
    after = probe(client, tag, rec.id)
    pinned = (c.split("==", 1) for c in p.constraints)
    changed = [f"{name} {version} -> {after.version(name) or 'removed'}"
               for name, version in pinned if after.version(name) != version]
    if changed:
        try:
            client.images.remove(tag)
        except (ImageNotFound, APIError):
            pass
        raise ImageError(f"the derived image changed the image's own stack ({'; '.join(changed)}); removed it",
                         where=p.base_ref, advice="please report this with `launcher doctor --image`")


def _write_context(workdir: Path, p: Plan) -> None:
    atomic_write_text(workdir / "requirements.txt", "\n".join(p.install) + "\n")
    atomic_write_text(workdir / "constraints.txt", "\n".join(p.constraints) + "\n")
    conf = ["[global]", "no-cache-dir = true", "disable-pip-version-check = true", "no-input = true"]
    settings = host_pip_settings()
    cert = settings.pop("cert", None)
    conf += [f"{key} = {value}" for key, value in settings.items()]
    if cert and Path(cert).is_file():
        shutil.copyfile(cert, workdir / "ca.crt")
        conf.append(f"cert = {BUILD_DIR}/ca.crt")
    atomic_write_text(workdir / "pip.conf", "\n".join(conf) + "\n")
    # PIP_BREAK_SYSTEM_PACKAGES: NVIDIA's images install into the system Python (older pips
    # ignore the variable). The settings live in this script, not in the container's
    # environment, so none of them is committed into the image.
    atomic_write_text(
        workdir / "build.sh",
        "set -eu\n"
        f"export PIP_CONFIG_FILE={BUILD_DIR}/pip.conf PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore\n"
        f"python3 -m pip install -r {BUILD_DIR}/requirements.txt -c {BUILD_DIR}/constraints.txt\n")
    for f in workdir.iterdir():
        f.chmod(0o644)  # readable by the image's user; the folder is the run's, 0700


def host_pip_settings() -> dict[str, str]:
    """How this host's pip reaches its index: config files, then PIP_* variables (later wins)."""
    found: dict[str, str] = {}
    files = [*PIP_CONFIG_FILES, os.environ.get("PIP_CONFIG_FILE", "")]  # pip's order: the variable's file last
    for f in files:
        path = Path(f).expanduser() if f else None
        if path is None or not path.is_file():
            continue
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue  # an unreadable config is pip's to complain about, not ours
        for section in ("global", "install"):
            if parser.has_section(section):
                found.update({k: v for k, v in parser.items(section) if k in PIP_KEYS})
    for key in PIP_KEYS:
        value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            found[key] = value
    if os.environ.get("PIP_DEFAULT_TIMEOUT") and "timeout" not in found:
        found["timeout"] = os.environ["PIP_DEFAULT_TIMEOUT"]
    for key in ("index-url", "extra-index-url"):  # file: indexes name the host's disk, not the container's
        urls = [u for u in found.get(key, "").split() if not u.startswith("file:")]
        found.pop(key, None)
        if urls:
            found[key] = " ".join(urls)
    return found


def _restore_config(client: docker.DockerClient, p: Plan) -> list[str]:
    """Dockerfile lines that give the committed image the base's command and user back (the
    build container ran pip as root) and label it as ours."""
    config = client.images.get(p.base.image_id).attrs.get("Config") or {}
    labels = {BASE_LABEL: p.base.image_id, LOCK_LABEL: lock_hash(), ROLE_LABEL: ROLE}
    return [f"CMD {json.dumps(config.get('Cmd') or [])}", f"USER {config.get('User') or 'root'}",
            "LABEL " + " ".join(f"{k}={json.dumps(v)}" for k, v in labels.items())]


def _run_with_progress(box: PayloadContainer, rec: runs.RunRecord, console: Console, p: Plan) -> tuple[int, str]:
    """Stream pip's output into the run's log, with one live line saying what it is doing."""
    step = re.compile(r"^(Collecting|Downloading|Installing collected packages|Successfully installed|ERROR)")
    last_error, buf = "", ""
    with open(rec.log_path, "a", encoding="utf-8") as log, \
            Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                     console=console, transient=True) as bar:
        task = bar.add_task(markup("deriving image: pip install {}", " ".join(p.install)))
        try:
            box.container.start()
            for chunk in box.container.logs(stream=True, follow=True):
                buf += chunk.decode("utf-8", "replace")
                *lines, buf = buf.split("\n")
                for line in lines:
                    log.write(line + "\n")
                    if step.match(line):
                        bar.update(task, description=markup("deriving image: {}", line[:100]))
                    if line.startswith("ERROR"):
                        last_error = last_error or line[:300]
            code = int(box.container.wait().get("StatusCode", 1))
        except KeyboardInterrupt:
            box.stop(timeout=2)
            raise Interrupted("interrupted while deriving the image; nothing was kept",
                              advice="rerun the same command to build it again") from None
    return code, last_error or "see the run's log"


def _offline_advice(base_ref: str, tag: str) -> str:
    return (f"on a machine with network, run `launcher image prepare --image {base_ref}`, then "
            f"`docker save {tag} -o derived.tar` there and `docker load -i derived.tar` here; or pass --image "
            "with an image that already has the versions (`launcher doctor --image REF` shows them)")


def prepare(image_ref: str, console: Console, *, dry_run: bool = False) -> str:
    """`launcher image prepare`: the image (pulled if absent) and its derived image, ready
    for every recipe. Returns the image to pass to --image."""
    docker = DockerSession.open(console)
    ref = docker.image_ref(image_ref)
    rec = docker.start_run("image-prepare", {"image": ref}, ref)
    with rec.ends_on_error():
        info = docker.ensure_image(rec, ref, dry_run=dry_run)
        tag = ref if dry_run and not info.id else runnable(
            docker.client, ref, recipes.EVERYTHING, cuda=False, rec=rec, console=console, dry_run=dry_run)
        rec.finish("complete")
    if tag == ref:
        console.print(markup("{} runs every recipe as it is: nothing to derive", ref))
    return tag
