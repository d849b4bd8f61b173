"""What an image holds, reported in well under a second: no torch import.

    python3 -m container_payload probe

Prints one `probe` event (events.py): the architecture, Python, every installed
distribution with its version, torch's CUDA build, whether `trtllm-serve` is there, and the
default user. The launcher runs it once per image id and caches the answer; the payload
uses `installed()` to refuse a job its image cannot finish (recipes.shortfalls).
"""
import importlib.metadata
import importlib.util
import os
import platform
import pwd
import re
import shutil
import sys

from .core import events
from .core.contract import PROBE


def installed() -> dict[str, str]:
    """Distribution name -> version, the first one on sys.path winning, as imports do."""
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if name and name not in out:
            out[name] = dist.version
    return out


def torch_cuda() -> str | None:
    """torch.version.cuda, read from torch/version.py without importing torch (seconds on
    NVIDIA's builds). None for a CPU build or no torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
    try:
        with open(path, encoding="utf-8") as f:
            m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def default_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def report() -> dict:
    return {
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch_cuda": torch_cuda(),
        "trtllm_serve": shutil.which("trtllm-serve"),
        "user": default_user(),
        "uid": os.getuid(),
        "packages": installed(),
    }


def run(job=None) -> None:
    events.emit(PROBE, **report())


if __name__ == "__main__":
    sys.exit(events.run_command(["probe"]))
