"""A checkpoint folder read as hostile input: its JSON files, the safetensors headers of its
shards and its index, each checked against the others and against the files' sizes.
read_json and load_tensors turn every way a file fails into a problem in the Report
(open_regular and the header readers raise Unreadable for them; safetensors_header, for
callers outside verify, raises ValueError). Only headers are read here, never tensor data.

Why not untrusted.open_regular / parse: those end the command with a LauncherError, refuse
any symlink and any nesting past 32; here each failure is one problem among others, links
inside the folder (an HF cache snapshot's) are followed, and the messages are the report's."""
from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ..common.untrusted import link_out_of
from .findings import Report, in_time, short

INDEX_NAME = "model.safetensors.index.json"
# Bits per element of each safetensors dtype (F4 packs two elements a byte).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
              "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
              "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4}
# safetensors refuses headers over 100 MB; a hostile one that size can parse into GBs of
# Python objects, so we stop at 16 MiB (real shards hold a few thousand tensors: < 1 MB).
MAX_HEADER = 16 * 2**20
MAX_JSON = 16 * 2**20      # config.json, hf_quant_config.json and the index: real ones are KBs
MAX_U64 = 2**64            # safetensors stores offsets and dims as u64


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: Path
    dtype: str
    shape: tuple
    start: int   # absolute byte offsets in the shard file
    end: int
    # False: its data lies past the end of a truncated file, or its offsets span other than
    # its dtype and shape need. Such a tensor's values are never read.
    intact: bool = True

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def declared(self) -> int:
        """Bytes its dtype and shape need: the most any read of it may take."""
        return math.prod(self.shape) * DTYPE_BITS[self.dtype] // 8


class Unreadable(Exception):
    """A file cannot be used at all; the message is the problem."""


def open_regular(path: Path):
    """Open a file of the checkpoint folder for reading only if it is a regular file in it. A
    symlink out of the folder is not followed (untrusted.link_out_of; an HF cache snapshot's
    links into its blobs/ are fine); a FIFO, socket or device would block or never end."""
    escape = link_out_of(path)
    if escape:
        raise Unreadable(escape)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise Unreadable("missing" if e.errno == errno.ENOENT else f"unreadable: {e.strerror or e}") from None
    except ValueError:  # a NUL byte in the name
        raise Unreadable("unreadable: invalid file name") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Unreadable("not a regular file (a FIFO, device or folder): not read")
    return os.fdopen(fd, "rb")


def _reason(e: Exception) -> str:
    lines = str(e).splitlines()
    return lines[0][:160] if lines else type(e).__name__


def loads(raw: bytes):
    """json.loads that turns every way hostile bytes fail into ValueError: deep nesting
    (RecursionError), integers past Python's digit limit, bad UTF-8."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8: {e.reason}") from None


def read_json(path: Path, report: Report, required: bool) -> dict | None:
    if not os.path.lexists(path):
        if required:
            report.add(path.name, "missing")
        return None
    try:
        with open_regular(path) as f:
            raw = f.read(MAX_JSON + 1)
    except Unreadable as e:
        report.add(path.name, str(e))
        return None
    except OSError as e:
        report.add(path.name, f"unreadable: {e.strerror or e}")
        return None
    if len(raw) > MAX_JSON:
        report.add(path.name, f"larger than {MAX_JSON >> 20} MiB: not a real config, not parsed")
        return None
    try:
        data = loads(raw)
    except ValueError as e:
        report.add(path.name, f"not valid JSON: {_reason(e)}")
        return None
    if not isinstance(data, dict):
        report.add(path.name, "not a JSON object")
        return None
    return data


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (JSON object, `__metadata__` included) and the offset its
    data section starts at; ValueError saying why when the file is not one. The one reader
    of the format on the host (tests use it too); bounded, so any bytes are safe to give it."""
    try:
        header, base, _ = _header(path)
    except Unreadable as e:
        raise ValueError(str(e)) from None
    return header, base


def _header(shard: Path) -> tuple[dict, int, int]:
    """(header, data start, file size), or Unreadable with the one problem of the file."""
    try:
        with open_regular(shard) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise Unreadable(f"truncated: {size} bytes, not even the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise Unreadable(f"header length {n} is implausible: not a safetensors file")
            if n > size - 8:
                raise Unreadable(f"truncated: header says {n} bytes of JSON, the file has {size - 8}")
            raw = f.read(n)
    except OSError as e:
        raise Unreadable(f"unreadable: {e.strerror or e}")
    try:
        header = loads(raw)
    except ValueError as e:
        raise Unreadable(f"header is not valid JSON: {_reason(e)}")
    if not isinstance(header, dict):
        raise Unreadable("header is not a JSON object")
    return header, 8 + n, size


def read_header(shard: Path, report: Report) -> dict[str, TensorInfo]:
    """Parse and validate one shard's header against the file's size.

    Tensors whose data lies past the end of the file, or whose offsets span more or less
    than their dtype and shape need, stay in the result (their header entries are still
    checked) but are marked not intact, so nothing reads them: a span is judged from the
    header alone, before any read. The file or tensor gets the one problem.
    """
    name = shard.name
    header, base, size = _header(shard)
    data_size = size - base
    infos: dict[str, TensorInfo] = {}
    spans = []
    for n_entry, (key, entry) in enumerate(header.items()):
        if n_entry % 4096 == 4095:
            in_time(report)
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = entry["dtype"], entry["shape"], entry["data_offsets"]
            # bool is an int to Python, not to safetensors; u64 bounds every offset and dim
            if not (isinstance(shape, list) and len(shape) <= 16
                    and all(type(d) is int and 0 <= d < MAX_U64 for d in shape)
                    and type(b) is int and type(e) is int and 0 <= b <= e < MAX_U64):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            report.add(key, f"malformed header entry in {name}: {short(entry)}")
            continue
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            report.add(key, f"unknown dtype {short(dtype)} in {name}")
            continue
        need = math.prod(shape) * DTYPE_BITS[dtype] // 8
        if need >= MAX_U64:
            report.add(key, f"shape {short(shape)} declares more than 2^64 bytes ({name})")
            continue
        if e - b != need:
            report.add(key, f"data_offsets span {e - b} bytes but {dtype} {short(shape)} needs {need} ({name})")
        spans.append((b, e, key))
        infos[key] = TensorInfo(key, shard, dtype, tuple(shape), base + b, base + e,
                                intact=e <= data_size and e - b == need)

    # safetensors requires the tensors to tile the data section exactly; it refuses
    # the file otherwise, and a gap or overlap means a broken writer.
    end = 0
    for b, e, key in sorted(spans):
        if b != end:
            what = "overlaps the previous tensor" if b < end else f"leaves a gap of {b - end} bytes"
            report.add(key, f"data_offsets [{b}, {e}] {what} in {name}")
        end = max(end, e)
    if end > data_size:
        lost = sorted(k for b, e, k in spans if e > data_size)
        report.add(name, f"truncated: tensor data should end at byte {base + end} but the file has "
                         f"{size} bytes ({len(lost)} tensor(s) cut off, first {lost[0]})")
    elif end < data_size:
        report.add(name, f"{data_size - end} unexpected bytes after the last tensor")
    return infos


@dataclass
class Tensors:
    by_name: dict[str, TensorInfo]
    damaged: set[Path]     # shards whose header has a problem: safetensors would refuse them
    unavailable: set[str]  # names the index puts in a missing or unreadable shard


def load_tensors(ckpt: Path, report: Report) -> Tensors:
    """Every tensor of the checkpoint, with the index checked against the shards."""
    index_path = ckpt / INDEX_NAME
    on_disk = sorted(p.name for p in ckpt.glob("*.safetensors"))
    index = read_json(index_path, report, required=False)
    weight_map: dict[str, str] | None = None
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            report.add(INDEX_NAME, "has no weight_map object")
            weight_map = None
    if weight_map is None and index_path.exists():
        shard_names = on_disk
    elif weight_map is not None:
        outside = sorted({v for v in weight_map.values() if not _plain_name(v)})
        for v in outside:
            report.add(INDEX_NAME, f"maps tensors to {short(v)}, which is not a file in the checkpoint "
                                   "folder: not followed")
        shard_names = sorted(set(weight_map.values()) - set(outside))
        for extra in sorted(set(on_disk) - set(shard_names)):
            report.add(extra, f"not referenced by {INDEX_NAME}: engines will ignore it")
    else:
        shard_names = on_disk
        if not on_disk:
            report.add(str(ckpt), "no *.safetensors files")
        elif len(on_disk) > 1:
            report.add(INDEX_NAME, f"missing: {len(on_disk)} shards need an index")

    tensors: dict[str, TensorInfo] = {}
    shard_of: dict[str, str] = {}
    damaged: set[Path] = set()
    # shards missing, unreadable or outside the folder: reported once, as files
    lost: set[str] = {v for v in (weight_map or {}).values() if not _plain_name(v)}
    for shard in shard_names:
        path = ckpt / shard
        if not os.path.lexists(path):
            report.add(shard, f"listed in {INDEX_NAME} but missing")
            lost.add(shard)
            continue
        before = len(report.problems)
        try:
            infos = read_header(path, report)
        except Unreadable as e:
            report.add(shard, str(e))
            lost.add(shard)
            continue
        if len(report.problems) > before:
            damaged.add(path)
        report.shards += 1
        in_time(report)
        for key, info in infos.items():
            if key in tensors:
                report.add(key, f"stored twice: in {shard_of[key]} and {shard}")
                continue
            tensors[key] = info
            shard_of[key] = shard
    if weight_map is not None:
        for key, shard in sorted(weight_map.items()):
            if shard in lost or shard_of.get(key) == shard:
                continue
            elsewhere = f" (it is in {shard_of[key]})" if key in shard_of else ""
            report.add(key, f"{INDEX_NAME} maps it to {shard} but that shard has no such tensor{elsewhere}")
        for key in sorted(set(shard_of) - set(weight_map)):
            report.add(key, f"in {shard_of[key]} but not in {INDEX_NAME}: engines will not load it")
        meta = index.get("metadata")
        total = meta.get("total_size") if isinstance(meta, dict) else None
        actual = sum(t.nbytes for t in tensors.values())
        if isinstance(total, int) and report.shards == len(shard_names) and total != actual:
            report.add(INDEX_NAME, f"metadata.total_size is {total} but the shards hold {actual} bytes of tensors")
    report.tensors = len(tensors)
    report.total_bytes = sum(t.nbytes for t in tensors.values())
    unavailable = {k for k, v in (weight_map or {}).items() if v in lost}
    return Tensors(tensors, damaged, unavailable)


def _plain_name(name: str) -> bool:
    """An index entry must name a file IN the checkpoint folder: no `..`, no separator, no
    absolute path. (The file itself may be a symlink: HF cache snapshots are.)"""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")
