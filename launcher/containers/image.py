"""Getting the image: use it when present, otherwise pull it with progress.

nvcr.io needs a login: user `$oauthtoken`, password the NGC API key, passed to the
daemon for this pull only (never stored in a record or a log).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from docker.errors import APIError, ImageNotFound
from docker.utils import parse_repository_tag
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

import docker

from ..common import output
from ..common.config import NVIDIA_IMAGE, STANDIN_IMAGE, STANDIN_REPO
from ..common.errors import ImageError, docker_error


@dataclass
class ImageInfo:
    ref: str
    id: str
    pulled: bool      # True when this launcher pulled it (rollback may remove it)
    size: int


def choose_image(requested: str, nvidia_runtime: bool) -> str:
    """'auto' means NVIDIA's image where Docker can give it a GPU, else the CPU stand-in."""
    if requested != "auto":
        return requested
    return NVIDIA_IMAGE if nvidia_runtime else STANDIN_IMAGE


def registry_of(ref: str) -> str:
    first = ref.split("/")[0]
    return first if ("." in first or ":" in first or first == "localhost") and "/" in ref else "docker.io"


STANDIN_LABEL = "io.spark-nvfp4.standin"  # set by docker/Dockerfile.standin (and kept by derived images)


def is_standin(image) -> bool:
    """A CPU stand-in (or an image derived from one): it needs no GPU, and serve emulates.
    Decided by the image's label only, never by its name (any tag may point anywhere)."""
    return (image.labels or {}).get(STANDIN_LABEL) == "true"


def standin_build_target(ref: str) -> str | None:
    """The `make` target that builds `ref` here, when it names one of our stand-ins: an
    absent one is built, never pulled (it is on no registry). Says how to build; whether a
    present image is a stand-in is is_standin's question."""
    if parse_repository_tag(ref)[0] != STANDIN_REPO:
        return None
    return "image-2025" if ref.endswith(":2025") else "image"


class ImageStore:
    def __init__(self, client: docker.DockerClient, console: Console | None = None):
        self.client = client
        self.console = console or output.console

    def get(self, ref: str):
        try:
            return self.client.images.get(ref)
        except ImageNotFound:
            return None

    def ensure(self, ref: str, *, ngc_key_env: str = "NGC_API_KEY", dry_run: bool = False) -> ImageInfo:
        img = self.get(ref)
        if img is not None:
            return ImageInfo(ref, img.id, pulled=False, size=img.attrs.get("Size", 0))
        target = standin_build_target(ref)
        if target:
            raise ImageError(f"the CPU stand-in image {ref} is not built",
                             advice=f"run `make {target}` (builds it from Debian and PyPI)")
        if dry_run:
            self.console.print(output.markup("would pull {}", ref))
            return ImageInfo(ref, "", pulled=True, size=0)
        self.pull(ref, auth=self._auth(ref, ngc_key_env))
        img = self.get(ref)
        if img is None:  # the daemon said it pulled, but cannot show it
            raise ImageError(f"pulled {ref} but the daemon does not list it", advice="retry; check `docker images`")
        return ImageInfo(ref, img.id, pulled=True, size=img.attrs.get("Size", 0))

    @staticmethod
    def _auth(ref: str, ngc_key_env: str) -> dict | None:
        key = os.environ.get(ngc_key_env)
        if registry_of(ref) == "nvcr.io" and key:
            return {"username": "$oauthtoken", "password": key}
        return None

    def pull(self, ref: str, auth: dict | None = None) -> None:
        repo, tag = parse_repository_tag(ref)
        registry = registry_of(ref)
        self.console.print(output.markup("pulling {}", ref))
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        try:
            with Progress(*columns, console=self.console, transient=True) as bar:
                tasks: dict[str, int] = {}
                totals: dict[str, int] = {}
                for ev in self.client.api.pull(repo, tag=tag or "latest", stream=True, decode=True,
                                               auth_config=auth):
                    if "error" in ev:  # failed mid-stream: no HTTP status to go by
                        raise APIError(ev["error"], explanation=ev["error"])
                    layer, detail = ev.get("id"), ev.get("progressDetail") or {}
                    if not layer or ":" in layer:
                        continue
                    if layer not in tasks:
                        tasks[layer] = bar.add_task(output.markup("layer {}", layer), total=None)
                    status = output.markup("{:<11} {}", str(ev.get("status", ""))[:11], layer)
                    if detail.get("total"):
                        totals[layer] = detail["total"]
                        bar.update(tasks[layer], total=detail["total"], completed=detail.get("current", 0),
                                   description=status)
                    elif ev.get("status") in ("Pull complete", "Already exists"):
                        done = totals.get(layer, 1)
                        bar.update(tasks[layer], total=done, completed=done, description=status)
            self.console.print(output.markup("pulled {}: {} layers, {:.1f} MB downloaded", ref, len(tasks),
                                             sum(totals.values()) / 1e6))
        except docker.errors.DockerException as e:  # APIError included
            raise self.pull_error(ref, registry, e, auth is not None) from None

    @staticmethod
    def pull_error(ref: str, registry: str, e: Exception, had_auth: bool) -> ImageError:
        login = ("your NGC API key was refused; create one at ngc.nvidia.com and export NGC_API_KEY"
                 if had_auth else "this registry needs a login: export NGC_API_KEY (for nvcr.io) and retry")
        return docker_error(e, "pull", where=registry, ref=ref, login=login)

    def remove(self, ref_or_id: str) -> bool:
        try:
            self.client.images.remove(ref_or_id, noprune=False)
            return True
        except ImageNotFound:
            return False
