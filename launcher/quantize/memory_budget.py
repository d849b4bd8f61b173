"""The memory a quantize job may use, and the mode (whole or streamed) it allows.

The budget is --memory-budget, else the machine's:
- a DGX Spark (GB10): one pool of unified memory shared by CPU and GPU: host memory available;
- another NVIDIA GPU: its memory (the weights, activations and export live there);
- no GPU: host memory available.
Preflight checks it before the download; the estimates are container_payload/core/memory_plan.py's.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from container_payload.core import memory_plan, recipes

from ..common import paths
from ..common.config import EMBEDDED_MODEL, JobSpec
from ..sources.model_source import EMBEDDED_DIRNAME
from .preflight import Check

UNIFIED_GPUS = ("GB10",)  # one memory pool for CPU and GPU
# The streamed path uses ModelOpt's streaming shard writer and per-tensor export (0.47).
STREAMED_NEEDS = recipes.Needs(modelopt="0.47", why=("streamed mode: ModelOpt's streaming export (0.47)",))


@dataclass
class Plan:
    mode: str             # whole | streamed: what the payload is told to run
    batch: int            # the calibration batch it is told to feed (the estimates' batch)
    budget: int           # bytes
    budget_from: str      # where the budget came from, for messages
    need: dict[str, int]  # estimated peak per mode
    check: Check


def gpus() -> list[tuple[str, int]]:
    """(name, memory bytes) of each NVIDIA GPU the host sees; [] without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            found.append((name.strip(), int(float(mib)) << 20))
        except ValueError:  # "[N/A]": unified memory reports no size of its own
            found.append((name.strip(), 0))
    return found


def machine_budget(on_gpu: bool) -> tuple[int, str]:
    host = psutil.virtual_memory().available
    if on_gpu:
        found = gpus()
        if found and any(u in found[0][0] for u in UNIFIED_GPUS):
            return host, f"unified memory available ({found[0][0]})"
        if found and found[0][1]:
            return found[0][1], f"memory of GPU 0 ({found[0][0]})"
    return host, "host memory available"


def model_folder(spec: JobSpec) -> Path | None:
    """The model's folder on the host when it is already there (exact layer sizes)."""
    if spec.model == EMBEDDED_MODEL:
        return paths.models_dir() / EMBEDDED_DIRNAME
    if spec.is_local:
        return Path(spec.model).expanduser()
    snaps = paths.hf_hub_cache() / ("models--" + spec.model.replace("/", "--")) / "snapshots"
    found = sorted((s for s in snaps.glob("*") if (s / "config.json").exists()), key=lambda s: s.stat().st_mtime)
    return found[-1] if found else None


def plan(spec: JobSpec, model_bytes: int, on_gpu: bool) -> Plan:
    if spec.memory_budget:
        budget, source = memory_plan.parse_bytes(spec.memory_budget), "--memory-budget"
    else:
        budget, source = machine_budget(on_gpu)
    calib = spec.calibration
    tokens = calib.samples * calib.seq_len
    shape = memory_plan.shape_of(model_folder(spec), model_bytes)
    steps = spec.steps
    need_at = lambda bs: memory_plan.peaks_of(shape, tokens, bs * calib.seq_len, steps)  # noqa: E731
    need = need_at(memory_plan.planning_batch(calib.batch_size, on_gpu))
    mode, problem = memory_plan.choose(spec.mode, budget, need, memory_plan.refusal_of(spec.recipe, steps))
    # "auto" on a GPU: as large a batch as the chosen mode's budget allows (low_memory and the
    # streamed mode keep the floor: their batch's temporaries are a large part of the peak)
    grow = problem is None and mode == "whole" and not spec.low_memory
    bs = memory_plan.planned_batch(calib.batch_size, on_gpu, calib.samples,
                                   lambda b: grow and need_at(b)[mode] <= budget)
    need = need_at(bs) if problem is None else need
    g = lambda b: f"{b / (1 << 30):.1f} GiB"  # noqa: E731
    detail = (f"mode {mode} ({spec.mode}), batch {bs}: whole ~{g(need['whole'])}, streamed ~{g(need['streamed'])}, "
              f"budget {g(budget)} ({source}){'' if shape.exact else ', layer sizes guessed from the total'}")
    return Plan(mode, bs, budget, source, need, Check("memory budget", problem is None,
                                                  problem or detail, "" if problem is None else
                                                  "see --mode and --memory-budget in `launcher quantize --help`"))
