"""One command's Docker session, the same for quantize, eval, serve and image prepare.

    connect -> reap orphans -> NVIDIA runtime? -> which image -> run record + guard
    -> image present or pulled (a pull is recorded in the run, for rollback)

Like docker-py's client object, it is made once per command and handed to what needs
Docker; each step is a method, since the commands check different things in between
(quantize takes its output lock and runs preflight before it pulls).
"""
from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

import docker

from ..common.daemon import connect, has_nvidia_runtime
from ..records import runs
from ..records.orphans import guard, reap
from .image import ImageInfo, ImageStore, choose_image, is_standin


@dataclass
class DockerSession:
    client: docker.DockerClient
    nvidia: bool          # Docker has the NVIDIA runtime: containers can get a GPU
    images: ImageStore

    @classmethod
    def open(cls, console: Console | None = None) -> "DockerSession":
        """Connect (DockerUnavailable if not), then remove containers of launchers that died."""
        client = connect()
        reap(client, console)
        return cls(client, has_nvidia_runtime(client), ImageStore(client, console))

    def image_ref(self, requested: str) -> str:
        """--image, where 'auto' means NVIDIA's image with a GPU runtime, else the CPU stand-in."""
        return choose_image(requested, self.nvidia)

    def start_run(self, command: str, spec: dict, image: str, output: str | None = None) -> runs.RunRecord:
        """The run's record, then its guard: from here a kill -9 of this launcher still gets
        the run's containers removed (orphans.py)."""
        rec = runs.new_run(command, spec)
        rec.image = image
        rec.output = output
        rec.save()
        guard(rec)
        return rec

    def ensure_image(self, rec: runs.RunRecord, ref: str, *, ngc_key_env: str = "NGC_API_KEY",
                     dry_run: bool = False) -> ImageInfo:
        """The image present, pulled if not; a pull (not a dry run's "would pull") goes into the
        record, so `rollback --images` may remove it."""
        info = self.images.ensure(ref, ngc_key_env=ngc_key_env, dry_run=dry_run)
        if info.pulled and not dry_run:
            rec.add("images", ref)
        return info

    def is_standin(self, ref: str) -> bool:
        """The present image is a CPU stand-in (by its label: image.is_standin)."""
        image = self.images.get(ref)
        return image is not None and is_standin(image)
