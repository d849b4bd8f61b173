"""Checks that run before anything heavy: each one says what is wrong and what to do.

Estimates are deliberately simple and stated: an NVFP4 checkpoint is about 0.3x the
bf16 weights (4.5 bits per quantized weight, embeddings stay bf16); quantizing
holds the bf16 model once in memory plus activations.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..common.errors import PreflightError

GiB = 1 << 30


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    advice: str = ""


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def disk_check(where: Path, need_bytes: int, what: str) -> Check:
    free = shutil.disk_usage(_existing_parent(where)).free
    ok = free >= need_bytes
    return Check(f"disk ({what})", ok, f"{free / GiB:.1f} GiB free at {_existing_parent(where)}, "
                 f"need about {need_bytes / GiB:.1f} GiB",
                 "" if ok else f"free space there or choose another folder for the {what}")


def memory_check(need_bytes: int, on_gpu: bool) -> Check:
    avail = psutil.virtual_memory().available
    ok = avail >= need_bytes
    where = "host memory (the model is staged here before the GPU)" if on_gpu else "host memory"
    return Check("memory", ok, f"{avail / GiB:.1f} GiB available, need about {need_bytes / GiB:.1f} GiB in {where}",
                 "" if ok else "close other programs, or use a machine with more memory")


def quantize_checks(*, model_bytes: int, output: Path, download_bytes: int, cache_dir: Path,
                    on_gpu: bool, memory: Check | None = None) -> list[Check]:
    """`memory`: the memory budget's check (memory_budget.plan), in place of the whole-model one."""
    out_bytes = int(model_bytes * 0.32) + (64 << 20)
    checks = [disk_check(output.parent, out_bytes * 2, "output")]  # partial + final during rename
    if download_bytes:
        checks.append(disk_check(cache_dir, download_bytes, "model download"))
    # bf16 weights once, plus activations and ModelOpt's bookkeeping; on a GPU most
    # of it goes to device memory, but loading still passes through host memory.
    checks.append(memory or memory_check(int(model_bytes * (0.6 if on_gpu else 1.4)) + GiB, on_gpu))
    return checks


# bf16 matrix products on a CPU without bf16 instructions: measured 0.5-5 GF/s on 2 cores of an
# AVX2-only EPYC, 60x slower than float32 there. ModelOpt's calibration keeps the model's bf16
# products (its input scales must match ModelOpt run directly), so on such a host it dominates.
SLOW_BF16_FLOPS = 5e9
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU has bf16 matrix instructions (None: cannot tell)."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return None
    return any(f in flags.split() for f in BF16_CPU_FLAGS) if flags else None


def cpu_calibration_note(model_bytes: int, tokens: int, on_gpu: bool) -> str | None:
    """A warning when ModelOpt's bf16 calibration will be slow on this CPU (None: nothing to say)."""
    if on_gpu or cpu_has_bf16() is not False or not model_bytes:
        return None
    flop = 2 * (model_bytes / 2) * tokens
    minutes = flop / SLOW_BF16_FLOPS / 60
    if minutes < 5:
        return None
    return (f"this CPU has no bf16 matrix instructions ({' / '.join(BF16_CPU_FLAGS)}): ModelOpt's bf16 "
            f"calibration of {tokens} tokens is ~{flop / 1e12:.1f} TFLOP, roughly {minutes:.0f} min or more "
            f"here; fewer tokens (e.g. --calib-samples 16 --calib-seq-len 256) or a GPU cut that")


def enforce(checks: list[Check]) -> None:
    bad = [c for c in checks if not c.ok]
    if bad:
        c = bad[0]
        raise PreflightError(f"preflight: {c.name}: {c.detail}", advice=c.advice)
