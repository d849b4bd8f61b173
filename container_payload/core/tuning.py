"""Knobs that change how fast a job runs or how much memory it holds, never its bytes: one value,
built once per job and passed down (benchmarks set them; the launcher leaves the defaults).

The job contract still carries them under their old names (cpu_float32, direct_load, prefetch)
so that job files written for earlier payloads keep working; `Tuning.of(job)` reads them once.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tuning:
    cpu_float32: bool = True              # our own passes' bf16 products in float32 on a CPU (linear_compute)
    direct_load: bool | str | dict = "auto"   # read shards straight to the device; a dict tunes the reader
    prefetch: bool | None = None          # read the shards into the page cache first (None: unless low_memory)

    @classmethod
    def of(cls, job) -> "Tuning":
        return cls(cpu_float32=job.cpu_float32, direct_load=job.direct_load, prefetch=job.prefetch)
