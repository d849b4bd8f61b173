"""The scale tensors' values: F32 through safetensors, FP8 E4M3 block scales as raw bytes
classified through a 256-entry table, and the checks on what they hold (finite and positive,
no NaN or negative block scale, not all zero)."""
from __future__ import annotations

import functools
import math
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .checkpoint_files import TensorInfo, open_regular
from .findings import Report

CHUNK = 16 * 2**20         # bytes of block scales decoded at a time


@functools.cache
def _e4m3_classes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(NaN, negative, zero) masks over the 256 E4M3 bytes, each byte decoded once; classifying a
    tensor's bytes is then a histogram. ml_dtypes is imported here, when block scales are first
    checked: its import takes ~0.6 s, which every `launcher quantize` (it imports the verifier)
    paid before its first line, dry runs and one-line refusals included."""
    import ml_dtypes

    e4m3 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    # 0x7F and 0xFF (E4M3FN has no infinities); sign bit set, except -0.0 (0x80); zero
    return np.isnan(e4m3), e4m3 < 0, e4m3 == 0


class ScaleReader:
    """Reads the small scale tensors, and only those.

    F32 goes through safetensors' own numpy reader. F8_E4M3 cannot: numpy has no float8
    dtype, so safetensors(framework="numpy") refuses it; its raw bytes are memory-mapped
    from the offsets in the header instead and classified through a 256-entry table.
    Shards with a damaged header (which safetensors refuses whole) are read the same raw
    way, so their intact scales still get checked.
    """

    def __init__(self, stack: ExitStack, damaged: set[Path], report: Report):
        self._stack = stack
        self._damaged = set(damaged)
        self._report = report
        self._handles: dict[Path, object] = {}

    def f32(self, t: TensorInfo) -> np.ndarray:
        if t.shard not in self._damaged:
            try:
                if t.shard not in self._handles:
                    self._handles[t.shard] = self._stack.enter_context(safe_open(str(t.shard), framework="numpy"))
                return np.asarray(self._handles[t.shard].get_tensor(t.name), dtype=np.float32).reshape(-1)
            except SafetensorError as e:
                self._report.add(t.shard.name, f"safetensors cannot read it: {e}")
                self._damaged.add(t.shard)
        return self._raw(t).view("<f4").astype(np.float32)

    # Both readers take at most t.declared bytes, whatever the offsets say (read_header
    # marks a tensor whose span differs not intact, and callers read only intact ones).
    @staticmethod
    def _raw(t: TensorInfo) -> np.ndarray:
        with open_regular(t.shard) as f:
            f.seek(t.start)
            return np.frombuffer(f.read(min(t.nbytes, t.declared)), dtype=np.uint8)

    @staticmethod
    def e4m3_histogram(t: TensorInfo) -> np.ndarray:
        counts = np.zeros(256, dtype=np.int64)
        n = min(t.nbytes, t.declared)
        if n == 0:
            return counts
        data = np.memmap(t.shard, dtype=np.uint8, mode="r", offset=t.start, shape=(n,))
        for i in range(0, n, CHUNK):
            counts += np.bincount(data[i:i + CHUNK], minlength=256)
        del data
        return counts


def check_positive(name: str, values: np.ndarray, report: Report) -> float | None:
    if values.size != 1:
        return None
    v = float(values[0])
    if not math.isfinite(v) or v <= 0:
        report.add(name, f"is {v}, a scale must be finite and > 0")
        return None
    return v


def check_block_scales(t: TensorInfo, report: Report, no_negative: bool) -> None:
    counts = ScaleReader.e4m3_histogram(t)
    is_nan, is_negative, is_zero = _e4m3_classes()
    total = int(counts.sum())
    nan = int(counts[is_nan].sum())
    if nan:
        report.add(t.name, f"{nan} of {total} FP8 block scales are NaN (E4M3 byte 0x7F/0xFF)")
    neg = int(counts[is_negative].sum())
    if no_negative and neg:
        report.add(t.name, f"{neg} of {total} FP8 block scales are negative")
    if total and int(counts[is_zero].sum()) == total:
        report.add(t.name, "every FP8 block scale is 0: the layer would compute zeros")
