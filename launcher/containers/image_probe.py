"""What is inside an image: container_payload/probe.py run in it once, cached by image id.

An image id names its content, so the answer never goes stale; the cache is still read
as untrusted input (a damaged file is probed again). The probe needs no network, no GPU
and no torch import: about a second even on NVIDIA's 20 GB images.
"""
from __future__ import annotations

from pathlib import Path

from docker.errors import ImageNotFound
from pydantic import BaseModel, ValidationError

import docker
from container_payload.core import recipes

from ..common import output, paths
from ..common.errors import ConfigError, ImageError, docker_error
from ..common.files import atomic_write_text
from ..common.untrusted import parse, read_capped
from .container import PayloadContainer, payload_command
from .logstream import find_event

MAX_PROBE_BYTES = 1 << 20  # a probe is ~2 KB (a few hundred package versions at most)
PROBE_TIMEOUT_S = 300  # a cold start of a 20 GB image on a slow disk; the probe itself is ~1 s


class ImageProbe(BaseModel):
    image_id: str
    arch: str
    python: str
    torch_cuda: str | None = None
    trtllm_serve: str | None = None
    user: str
    uid: int
    packages: dict[str, str]

    def version(self, dist: str) -> str | None:
        want = recipes.dist_key(dist)
        return next((v for k, v in self.packages.items() if recipes.dist_key(k) == want), None)

    def summary(self) -> str:
        torch = self.version("torch") or "none"
        cuda = f", CUDA {self.torch_cuda}" if self.torch_cuda else ", CPU build"
        return (f"{self.arch}, Python {self.python}, torch {torch}{cuda}, transformers "
                f"{self.version('transformers') or 'none'}, ModelOpt {self.version('nvidia-modelopt') or 'none'}")


def cache_path(image_id: str) -> Path:
    return paths.home() / "probes" / f"{image_id.removeprefix('sha256:')[:64]}.json"


def probe(client: docker.DockerClient, image: str, run_id: str = "probe") -> ImageProbe:
    """The probe of `image` (a ref or id that is present), from the cache or run now."""
    try:
        image_id = client.images.get(image).id
    except ImageNotFound:
        raise ImageError(f"image {image} is not present", advice="pull or build it first") from None
    cached = cache_path(image_id)
    found = _cached(cached)
    if found is not None and found.image_id == image_id:
        return found
    found = ImageProbe(image_id=image_id, **_run(client, image_id, run_id))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, found.model_dump_json(indent=2))
    except ConfigError:
        pass  # a link or FIFO planted at the cache's name: never written through, and _cached's warning named it
    except OSError as e:  # a cache, not a need: the next command probes again
        output.console.print(output.markup("[yellow]warning:[/] {}", f"cannot cache the image probe: {e.strerror} "
                                                                     f"[{cached}]"), highlight=False, soft_wrap=True)
    return found


def _cached(path: Path) -> ImageProbe | None:
    """The cached probe, or None when absent; a damaged one (a FIFO, /dev/zero, a symlink, huge,
    not JSON, wrong types) is one warning and counts as absent: the image is probed again."""
    try:
        raw = read_capped(path, MAX_PROBE_BYTES, "cached image probe", error=ImageError, missing_ok=True)
        if raw is None:
            return None
        return ImageProbe.model_validate(parse(raw, "json", "cached image probe", str(path), error=ImageError))
    except ValidationError as e:
        err = e.errors()[0]
        why = f"cached image probe is damaged: {'.'.join(map(str, err['loc']))}: {err['msg']} [{path}]"
    except ImageError as e:
        why = str(e)
    output.console.print(output.markup("[yellow]warning:[/] {}; probing the image again", why),
                         highlight=False, soft_wrap=True)
    return None


def _run(client: docker.DockerClient, image_id: str, run_id: str) -> dict:
    box = PayloadContainer(client, image_id, run_id, role="probe")
    box.create(payload_command("probe"), [], network="none", user=None)
    try:
        box.container.start()
        code = box.container.wait(timeout=PROBE_TIMEOUT_S).get("StatusCode", 1)
        text = box.container.logs(stdout=True, stderr=True).decode("utf-8", "replace")
    except (docker.errors.DockerException, OSError) as e:  # includes the wait's timeout
        raise docker_error(e, "probe", where=image_id[:19]) from None
    finally:
        box.remove()
    event = find_event(text.splitlines(), "probe")
    if event is not None:
        return {k: v for k, v in event.items() if k not in ("event", "t")}
    last = text.strip().splitlines()[-1][:200] if text.strip() else "no output"
    raise ImageError(f"the image probe failed (exit {code}): {last}", where=image_id[:19],
                     advice="the image needs a `python3` on its PATH (NVIDIA's TensorRT-LLM images have one)")

