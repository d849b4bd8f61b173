"""Getting the image: use it when present, otherwise pull it with progress.

nvcr.io needs a login: user `$oauthtoken`, password the NGC API key, passed to the
daemon for this pull only (never stored in a record or a log).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import docker
from docker.errors import APIError, ImageNotFound
from docker.utils import parse_repository_tag
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from .config import NVIDIA_IMAGE, STANDIN_IMAGE, STANDIN_REPO
from .errors import ImageError


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
    """A CPU stand-in (or an image derived from one): it needs no GPU, and serve emulates."""
    return (image.labels or {}).get(STANDIN_LABEL) == "true"


class ImageStore:
    def __init__(self, client: docker.DockerClient, console: Console | None = None):
        self.client = client
        self.console = console or Console(stderr=True)

    def get(self, ref: str):
        try:
            return self.client.images.get(ref)
        except ImageNotFound:
            return None

    def ensure(self, ref: str, *, ngc_key_env: str = "NGC_API_KEY", dry_run: bool = False) -> ImageInfo:
        img = self.get(ref)
        if img is not None:
            return ImageInfo(ref, img.id, pulled=False, size=img.attrs.get("Size", 0))
        if parse_repository_tag(ref)[0] == STANDIN_REPO:
            target = "image-2025" if ref.endswith(":2025") else "image"
            raise ImageError(f"the CPU stand-in image {ref} is not built",
                             advice=f"run `make {target}` (builds it from Debian and PyPI)")
        if dry_run:
            self.console.print(f"would pull {ref}")
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
        self.console.print(f"pulling {ref}")
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        try:
            with Progress(*columns, console=self.console, transient=True) as bar:
                tasks: dict[str, int] = {}
                totals: dict[str, int] = {}
                for ev in self.client.api.pull(repo, tag=tag or "latest", stream=True, decode=True,
                                               auth_config=auth):
                    if "error" in ev:
                        raise APIError(ev["error"])
                    layer, detail = ev.get("id"), ev.get("progressDetail") or {}
                    if not layer or ":" in layer:
                        continue
                    if layer not in tasks:
                        tasks[layer] = bar.add_task(f"layer {layer}", total=None)
                    status = f"{ev.get('status', '')[:11]:<11} {layer}"
                    if detail.get("total"):
                        totals[layer] = detail["total"]
                        bar.update(tasks[layer], total=detail["total"], completed=detail.get("current", 0),
                                   description=status)
                    elif ev.get("status") in ("Pull complete", "Already exists"):
                        done = totals.get(layer, 1)
                        bar.update(tasks[layer], total=done, completed=done, description=status)
            self.console.print(f"pulled {ref}: {len(tasks)} layers, {sum(totals.values()) / 1e6:.1f} MB downloaded")
        except APIError as e:
            raise self._pull_error(ref, registry, e, auth is not None) from None
        except docker.errors.DockerException as e:
            raise ImageError(f"cannot pull {ref}: {e}", where=registry,
                             advice="check the registry address and your network") from None

    @staticmethod
    def _pull_error(ref: str, registry: str, e: APIError, had_auth: bool) -> ImageError:
        msg = str(getattr(e, "explanation", None) or e).strip()
        low = msg.lower()
        if any(s in low for s in ("unauthorized", "denied", "authentication required", "401", "403")):
            advice = ("your NGC API key was refused; create one at ngc.nvidia.com and export NGC_API_KEY"
                      if had_auth else "this registry needs a login: export NGC_API_KEY (for nvcr.io) and retry")
            return ImageError(f"registry refused the pull of {ref}", where=registry, advice=advice)
        if any(s in low for s in ("connection refused", "no such host", "timeout", "i/o timeout",
                                  "dial tcp", "network is unreachable", "server misbehaving")):
            return ImageError(f"registry unreachable while pulling {ref}", where=registry,
                              advice="check the network or proxy; or build the CPU stand-in with `make image` "
                                     "and pass --image spark-nvfp4/trtllm-standin:cpu")
        if "not found" in low or "manifest unknown" in low:
            return ImageError(f"image {ref} does not exist in the registry", where=registry,
                              advice="check the image name and tag")
        return ImageError(f"cannot pull {ref}: {msg.splitlines()[0]}", where=registry)

    def remove(self, ref_or_id: str) -> bool:
        try:
            self.client.images.remove(ref_or_id, noprune=False)
            return True
        except ImageNotFound:
            return False
