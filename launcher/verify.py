"""Check an NVFP4 checkpoint against what the serving engines require, on the host.

    python -m launcher.verify CKPT [--json OUT]      (the CLI exposes it as `launcher verify`)

Two formats, told apart by config.json: ModelOpt's unified Hugging Face checkpoint
(docs/nvfp4-format.md §5) and compressed-tensors, llm-compressor's output (docs/nvfp4-format.md §6).
Only safetensors headers and the small scale tensors are read, never the packed
weights' data, so an 8B checkpoint costs a few MB of reads. No torch: the host never
has it; numpy + ml_dtypes decode what little is read.

Every finding is a `Problem(tensor_or_file, message)`; the checkpoint passes only
when there is none.
"""
from __future__ import annotations

import errno
import fnmatch
import json
import math
import os
import re
import reprlib
import stat
import struct
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import regex

from .errors import ConfigError
from .files import atomic_write_text
from .untrusted import link_out_of, printable

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
GROUP_SIZE = 16
INDEX_NAME = "model.safetensors.index.json"
NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4")   # ModelOpt quant_algo: W4A4, weight-only
CT_FORMAT = "nvfp4-pack-quantized"
FLOAT_DTYPES = ("BF16", "F16", "F32")
# Engines fuse these into one GEMM, so the members must share their global scales.
FUSED = {"q_proj": "q_proj,k_proj,v_proj", "k_proj": "q_proj,k_proj,v_proj",
         "v_proj": "q_proj,k_proj,v_proj", "gate_proj": "gate_proj,up_proj",
         "up_proj": "gate_proj,up_proj", "w1": "w1,w3", "w3": "w1,w3"}  # w1/w3: Mixtral's expert gate/up
# Bits per element of each safetensors dtype (F4 packs two elements a byte).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
              "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
              "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4}
# safetensors refuses headers over 100 MB; a hostile one that size can parse into GBs of
# Python objects, so we stop at 16 MiB (real shards hold a few thousand tensors: < 1 MB).
MAX_HEADER = 16 * 2**20
MAX_JSON = 16 * 2**20      # config.json, hf_quant_config.json and the index: real ones are KBs
MAX_U64 = 2**64            # safetensors stores offsets and dims as u64
MAX_PATTERNS = 1024        # exclude/ignore entries: real lists are tens
REGEX_TIMEOUT = 0.2        # seconds per match of a `re:` exclude pattern before it is refused
REGEX_BUDGET = 2.0         # seconds for all `re:` matches of one verification
MAX_PRINTED = 200          # problem lines printed; the JSON report keeps them all
# Whatever the files declare, a verification ends within this many seconds: a real 671B
# checkpoint takes well under one; only a crafted one (200k tensors x 1000 exclude
# patterns) can need more, and that is reported as a problem, never waited for.
VERIFY_SECONDS = 6.0
CHUNK = 16 * 2**20         # bytes of block scales decoded at a time

# Every E4M3 byte decoded once; classifying a tensor's bytes is then a histogram.
_E4M3 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
_E4M3_NAN = np.isnan(_E4M3)            # 0x7F and 0xFF; E4M3FN has no infinities
_E4M3_NEG = _E4M3 < 0                  # sign bit set, except -0.0 (0x80)
_E4M3_ZERO = _E4M3 == 0


@dataclass(frozen=True)
class Problem:
    tensor_or_file: str
    message: str

    def __str__(self) -> str:
        # names and values come from the checkpoint: never raw control characters on a terminal
        return printable(f"{self.tensor_or_file}: {self.message}")


@dataclass(frozen=True)
class Layout:
    """The tensor names of one quantized Linear in one checkpoint format."""
    packed: str          # uint8 [out, in/2]
    global_scale: str    # float32, per tensor
    input_scale: str     # float32, per tensor, W4A4 only
    scalar_shape: tuple  # shape of the two per-tensor scales
    kv_owner: str        # where k_scale / v_scale hang: "proj" (k_proj.k_scale) or "attn"


LAYOUTS = {
    MODELOPT: Layout("weight", "weight_scale_2", "input_scale", (), "proj"),
    COMPRESSED_TENSORS: Layout("weight_packed", "weight_global_scale", "input_global_scale", (1,), "attn"),
}


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


@dataclass
class Report:
    path: str
    format: str | None = None
    quant_algo: str | None = None
    weight_only: bool | None = None
    kv_cache: str | None = None
    quantized_linears: int = 0
    shards: int = 0
    tensors: int = 0
    total_bytes: int = 0        # tensor data in all shards
    quantized_bytes: int = 0    # packed weights + block scales + global/input scales
    quantized_params: int = 0   # weight elements of the quantized Linears
    layer_formats: dict = field(default_factory=dict)  # MIXED_PRECISION: quant_algo -> quantized Linears
    problems: list[Problem] = field(default_factory=list)
    deadline: float = field(default_factory=lambda: time.monotonic() + VERIFY_SECONDS, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("deadline")
        d["ok"] = self.ok
        return d


class _Unreadable(Exception):
    """A file cannot be used at all; the message is the problem."""


class _OutOfTime(Exception):
    """The checks ran past Report.deadline."""


def _in_time(report: "Report") -> None:
    if time.monotonic() > report.deadline:
        raise _OutOfTime


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong, _SHORT.maxlevel = 80, 80, 40, 3


def short(value) -> str:
    """A bounded repr of a value read from the checkpoint: a hostile config or header can
    hold megabytes in one field, and a message stays one short line."""
    try:
        return _SHORT.repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__}>"


def open_regular(path: Path):
    """Open a file of the checkpoint folder for reading only if it is a regular file in it. A
    symlink out of the folder is not followed (untrusted.link_out_of; an HF cache snapshot's
    links into its blobs/ are fine); a FIFO, socket or device would block or never end."""
    escape = link_out_of(path)
    if escape:
        raise _Unreadable(escape)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _Unreadable("missing" if e.errno == errno.ENOENT else f"unreadable: {e.strerror or e}") from None
    except ValueError:  # a NUL byte in the name
        raise _Unreadable("unreadable: invalid file name") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _Unreadable("not a regular file (a FIFO, device or folder): not read")
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


# ---------------------------------------------------------------- files and headers

def _read_json(path: Path, report: Report, required: bool) -> dict | None:
    if not os.path.lexists(path):
        if required:
            report.add(path.name, "missing")
        return None
    try:
        with open_regular(path) as f:
            raw = f.read(MAX_JSON + 1)
    except _Unreadable as e:
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
    except _Unreadable as e:
        raise ValueError(str(e)) from None
    return header, base


def _header(shard: Path) -> tuple[dict, int, int]:
    """(header, data start, file size), or _Unreadable with the one problem of the file."""
    try:
        with open_regular(shard) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _Unreadable(f"truncated: {size} bytes, not even the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise _Unreadable(f"header length {n} is implausible: not a safetensors file")
            if n > size - 8:
                raise _Unreadable(f"truncated: header says {n} bytes of JSON, the file has {size - 8}")
            raw = f.read(n)
    except OSError as e:
        raise _Unreadable(f"unreadable: {e.strerror or e}")
    try:
        header = loads(raw)
    except ValueError as e:
        raise _Unreadable(f"header is not valid JSON: {_reason(e)}")
    if not isinstance(header, dict):
        raise _Unreadable("header is not a JSON object")
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
            _in_time(report)
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
    index = _read_json(index_path, report, required=False)
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
        except _Unreadable as e:
            report.add(shard, str(e))
            lost.add(shard)
            continue
        if len(report.problems) > before:
            damaged.add(path)
        report.shards += 1
        _in_time(report)
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
        from safetensors import SafetensorError, safe_open

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


# ---------------------------------------------------------------- configs

class Excludes:
    """The exclude/ignore list of a config: fnmatch patterns, module prefixes, and
    compressed-tensors' `re:` regular expressions. The regexes come from the checkpoint,
    so they run under the `regex` module's timeout: one that backtracks for longer than
    REGEX_TIMEOUT is reported once and dropped, and all of them together get
    REGEX_BUDGET seconds, so many modules times a slow pattern cannot add up to a hang.
    The globs and prefixes are compiled into one regular expression (fnmatch's own
    translation), so a long list costs one match per module, not one per pattern."""

    def __init__(self, patterns: list[str], report: Report, where: str):
        self.report, self.where = report, where
        if len(patterns) > MAX_PATTERNS:
            report.add(where, f"{len(patterns)} exclude/ignore entries: more than {MAX_PATTERNS}, only "
                              f"the first {MAX_PATTERNS} are used")
            patterns = patterns[:MAX_PATTERNS]
        globs = [p for p in patterns if not p.startswith("re:")]
        # a glob matches the module itself; the plain name also matches its submodules
        alternatives = [fnmatch.translate(p) for p in globs] + [rf"(?s:{re.escape(p)}\..*)\Z" for p in globs]
        # stdlib re: fnmatch's translations need no timeout (atomic groups, no backtracking
        # blow-up), and re compiles a thousand of them in a fraction of regex's time
        self.globs = re.compile("|".join(alternatives)) if alternatives else None
        self.budget = REGEX_BUDGET
        self.regexes = {}
        for p in patterns:
            if p.startswith("re:"):
                try:
                    self.regexes[p] = regex.compile(p[3:], flags=regex.V0)
                except (regex.error, RecursionError, ValueError, OverflowError) as e:
                    report.add(where, f"exclude pattern {short(p)} is not a valid regular expression "
                                      f"({short(str(e))}): ignored")

    def __contains__(self, module: str) -> bool:
        if self.globs is not None and self.globs.match(module):
            return True
        for p, rx in list(self.regexes.items()):
            start = time.monotonic()
            try:
                if rx.match(module, timeout=min(REGEX_TIMEOUT, max(self.budget, 0.001))):
                    return True
            except TimeoutError:
                del self.regexes[p]
                self.report.add(self.where, f"exclude pattern {short(p)} takes over {REGEX_TIMEOUT} s to match "
                                            f"{short(module)}: refused (it would hang the engines' loaders too)")
            finally:
                self.budget -= time.monotonic() - start
            if self.budget <= 0 and self.regexes:
                self.report.add(self.where, f"the {len(self.regexes)} `re:` exclude pattern(s) took over "
                                            f"{REGEX_BUDGET} s in all: refused")
                self.regexes.clear()
        return False


def _check_fp4_args(where: str, args, report: Report, ct: bool, activations: bool = False) -> None:
    """One `weights` / `input_activations` entry of a config group."""
    if not isinstance(args, dict):
        report.add(where, f"is {short(args)}, expected an object")
        return
    want = {"num_bits": 4, "type": "float", "group_size": GROUP_SIZE}
    if ct:
        want |= {"strategy": "tensor_group", "symmetric": True}
        if activations:
            want["dynamic"] = "local"
    for key, value in want.items():
        if key not in args:
            report.add(where, f"missing field {key!r} (NVFP4 needs {value!r})")
        elif args[key] != value:
            report.add(f"{where}.{key}", f"is {short(args[key])}, NVFP4 needs {value!r}")
    sd = args.get("scale_dtype")
    if ct and sd is not None and not str(sd).endswith("float8_e4m3fn"):
        report.add(f"{where}.scale_dtype", f"is {short(sd)}, NVFP4 block scales are float8_e4m3fn")


def _config_groups(qc: dict, report: Report, ct: bool) -> bool | None:
    """Checks config.json's config_groups; returns whether activations are quantized."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        report.add("config.json", "quantization_config has no config_groups")
        return None
    w4a4 = set()
    for g, group in groups.items():
        where = f"config.json quantization_config.config_groups.{g}"
        if not isinstance(group, dict):
            report.add(where, "is not an object")
            continue
        _check_fp4_args(f"{where}.weights", group.get("weights"), report, ct)
        acts = group.get("input_activations")
        if acts is not None:
            _check_fp4_args(f"{where}.input_activations", acts, report, ct, activations=True)
        w4a4.add(acts is not None)
        if ct:
            fmt = group.get("format") or qc.get("format")
            if fmt != CT_FORMAT:
                report.add(f"{where}.format", f"is {short(fmt)}, NVFP4 is {CT_FORMAT!r}")
        if not group.get("targets"):
            report.add(where, "has no targets")
    if len(w4a4) > 1:
        report.add("config.json", "config groups disagree on whether activations are quantized")
        return None
    return w4a4.pop() if w4a4 else None


def _kv_scheme(value, where: str, report: Report) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict) and value.get("num_bits") == 8 and value.get("type") == "float":
        return "FP8"
    report.add(where, f"unsupported KV cache scheme {short(value)} (only FP8 or null)")
    return "?"


def check_modelopt_config(ckpt: Path, qc: dict | None, report: Report) -> tuple[bool | None, list[str]]:
    """hf_quant_config.json (TensorRT-LLM) and config.json (vLLM, SGLang) must agree."""
    hf = _read_json(ckpt / "hf_quant_config.json", report, required=True)
    hq = hf.get("quantization") if hf else None
    if hf is not None and not isinstance(hq, dict):
        report.add("hf_quant_config.json", "has no 'quantization' object")
        hq = None
    excludes: list[str] = []
    algo = None
    if hq is not None:
        for key in ("quant_algo", "group_size", "exclude_modules"):
            if key not in hq:
                report.add("hf_quant_config.json", f"missing field quantization.{key}")
        algo = hq.get("quant_algo")
        if "quant_algo" in hq and algo not in NVFP4_ALGOS:
            report.add("hf_quant_config.json", f"quant_algo is {short(algo)}, not NVFP4 ({' or '.join(NVFP4_ALGOS)})")
        if "group_size" in hq and hq["group_size"] != GROUP_SIZE:
            report.add("hf_quant_config.json", f"group_size is {short(hq['group_size'])}, NVFP4 needs {GROUP_SIZE}")
        excludes = hq.get("exclude_modules") or []
        if not isinstance(excludes, list) or not all(isinstance(x, str) for x in excludes):
            report.add("hf_quant_config.json", "exclude_modules is not a list of module names")
            excludes = []
        kv = hq.get("kv_cache_quant_algo")
        if kv not in (None, "FP8"):
            report.add("hf_quant_config.json", f"kv_cache_quant_algo {short(kv)} is not supported here (null or FP8)")
        report.kv_cache = kv if kv in (None, "FP8") else "?"

    if qc is None:
        # Older ModelOpt exports have no quantization_config; vLLM falls back to hf_quant_config.json.
        report.quant_algo = algo
        return (algo == "NVFP4" if algo in NVFP4_ALGOS else None), excludes

    if "quant_algo" not in qc:
        report.add("config.json", "missing field quantization_config.quant_algo")
    elif hq is None or algo is None:
        algo = qc["quant_algo"]
        if algo not in NVFP4_ALGOS:
            report.add("config.json", f"quantization_config.quant_algo is {short(algo)}, not NVFP4")
    elif qc["quant_algo"] != algo:
        report.add("config.json", f"quantization_config.quant_algo {short(qc['quant_algo'])} contradicts "
                                  f"hf_quant_config.json's {short(algo)}")
    if "group_size" in qc and qc["group_size"] != GROUP_SIZE:
        report.add("config.json", f"quantization_config.group_size is {short(qc['group_size'])}, NVFP4 needs {GROUP_SIZE}")
    w4a4 = _config_groups(qc, report, ct=False)
    report.quant_algo = algo
    if algo in NVFP4_ALGOS and w4a4 is not None and w4a4 != (algo == "NVFP4"):
        report.add("config.json", f"config_groups {'quantize' if w4a4 else 'do not quantize'} input_activations "
                                  f"but quant_algo is {short(algo)}")
    ignore = qc.get("ignore")
    if ignore is not None and not (isinstance(ignore, list) and all(isinstance(x, str) for x in ignore)):
        report.add("config.json", "quantization_config.ignore is not a list of module names")
        ignore = []
    if hq is None:
        excludes = ignore or []
    elif ignore is None or set(ignore) != set(excludes):
        report.add("config.json", f"quantization_config.ignore {short(ignore)} differs from "
                                  f"hf_quant_config.json exclude_modules {short(excludes)}")
    if "kv_cache_scheme" in qc:
        kv = _kv_scheme(qc["kv_cache_scheme"], "config.json", report)
        if hq is None:
            report.kv_cache = kv
        elif kv != report.kv_cache:
            report.add("config.json", f"quantization_config.kv_cache_scheme says {kv or 'no'} KV cache "
                                      f"quantization, hf_quant_config.json says {report.kv_cache or 'none'}")
    elif report.kv_cache is not None and hq is not None:
        # vLLM reads config.json first: without kv_cache_scheme it leaves the KV cache unquantized.
        report.add("config.json", f"quantization_config has no kv_cache_scheme but hf_quant_config.json "
                                  f"has kv_cache_quant_algo {short(report.kv_cache)}")
    if algo in NVFP4_ALGOS:
        return algo == "NVFP4", excludes
    return w4a4, excludes


def check_ct_config(qc: dict, report: Report) -> tuple[bool | None, list[str]]:
    if qc.get("quantization_status") != "compressed":
        report.add("config.json", f"quantization_config.quantization_status is "
                                  f"{short(qc.get('quantization_status'))}, a packed checkpoint says 'compressed'")
    w4a4 = _config_groups(qc, report, ct=True)
    report.quant_algo = CT_FORMAT
    ignore = qc.get("ignore")
    if ignore is None:
        ignore = []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        report.add("config.json", "quantization_config.ignore is not a list of module names")
        ignore = []
    report.kv_cache = _kv_scheme(qc.get("kv_cache_scheme"), "config.json", report)
    return w4a4, ignore


def detect_format(qc: dict | None, ckpt: Path, tensors: dict[str, TensorInfo], report: Report) -> str | None:
    looks_ct = any(k.endswith(".weight_packed") for k in tensors)
    looks_mo = any(k.endswith(".weight_scale_2") for k in tensors)
    method = qc.get("quant_method") if qc is not None else None
    if method == MODELOPT or (qc is None and (ckpt / "hf_quant_config.json").exists()):
        fmt = MODELOPT
    elif method == COMPRESSED_TENSORS:
        fmt = COMPRESSED_TENSORS
    else:
        if qc is None:
            report.add("config.json", "has no quantization_config (and there is no hf_quant_config.json): "
                                      "engines would load the model unquantized")
        else:
            report.add("config.json", f"quantization_config.quant_method is {short(method)}, "
                                      f"expected {MODELOPT!r} or {COMPRESSED_TENSORS!r}")
        return None
    if fmt == MODELOPT and looks_ct and not looks_mo:
        report.add("config.json", "quant_method is modelopt but the tensors use compressed-tensors names (weight_packed)")
    if fmt == COMPRESSED_TENSORS and looks_mo and not looks_ct:
        report.add("config.json", "quant_method is compressed-tensors but the tensors use ModelOpt names (weight_scale_2)")
    return fmt


# ---------------------------------------------------------------- tensors

def _missing(name: str, role: str, ts: Tensors, report: Report) -> None:
    # A tensor in a lost shard is not reported again: the shard's problem covers it.
    if name not in ts.unavailable:
        report.add(name, f"missing ({role})")


def _check_dtype_shape(name: str, dtype: str, shape: tuple, ts: Tensors, report: Report, role: str) -> bool:
    t = ts.by_name.get(name)
    if t is None:
        _missing(name, role, ts, report)
        return False
    ok = t.intact  # a cut-off tensor's values cannot be read (its file is reported)
    if t.dtype != dtype:
        report.add(name, f"dtype {t.dtype}, expected {dtype} ({role})")
        ok = False
    if t.shape != shape:
        report.add(name, f"shape {short(list(t.shape))}, expected {list(shape)} ({role})")
        ok = False
    return ok


def _check_positive(name: str, values: np.ndarray, report: Report) -> float | None:
    if values.size != 1:
        return None
    v = float(values[0])
    if not math.isfinite(v) or v <= 0:
        report.add(name, f"is {v}, a scale must be finite and > 0")
        return None
    return v


def _check_block_scales(t: TensorInfo, report: Report, no_negative: bool) -> None:
    counts = ScaleReader.e4m3_histogram(t)
    total = int(counts.sum())
    nan = int(counts[_E4M3_NAN].sum())
    if nan:
        report.add(t.name, f"{nan} of {total} FP8 block scales are NaN (E4M3 byte 0x7F/0xFF)")
    neg = int(counts[_E4M3_NEG].sum())
    if no_negative and neg:
        report.add(t.name, f"{neg} of {total} FP8 block scales are negative")
    if total and int(counts[_E4M3_ZERO].sum()) == total:
        report.add(t.name, "every FP8 block scale is 0: the layer would compute zeros")


def check_linears(fmt: str, w4a4: bool | None, excludes: Excludes, ts: Tensors,
                  reader: ScaleReader, report: Report) -> None:
    lay = LAYOUTS[fmt]
    tensors = ts.by_name
    markers = (".weight_scale", f".{lay.global_scale}", f".{lay.input_scale}")
    modules = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(markers)}
    if fmt == COMPRESSED_TENSORS:
        modules |= {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")}
    else:
        modules |= {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight") and tensors[k].dtype == "U8"}
    if not modules:
        report.add(report.path, "no quantized Linear found (no weight_scale tensors)")
    report.quantized_linears = len(modules)

    globals_: dict[str, float | None] = {}
    inputs: dict[str, float | None] = {}
    for m in sorted(modules):
        _in_time(report)
        if m in excludes:
            report.add(m, "is in the exclude/ignore list but is quantized")
        packed_name = f"{m}.{lay.packed}"
        packed = tensors.get(packed_name)
        if fmt == COMPRESSED_TENSORS and f"{m}.weight" in tensors:
            report.add(f"{m}.weight", "unpacked weight next to weight_packed")
        if packed is None:
            _missing(packed_name, "packed NVFP4 weight of a quantized Linear", ts, report)
            continue
        if packed.dtype != "U8" or len(packed.shape) != 2:
            report.add(packed_name, f"{packed.dtype} {short(list(packed.shape))}, expected U8 [out, in/2] (packed E2M1 pairs)")
            continue
        out, in_ = packed.shape[0], packed.shape[1] * 2
        if in_ % GROUP_SIZE:
            report.add(packed_name, f"in_features {in_} is not a multiple of {GROUP_SIZE}: "
                                    "engines cannot run it; leave the layer unquantized and exclude it")
        report.quantized_params += out * in_
        report.quantized_bytes += packed.nbytes

        bs_name = f"{m}.weight_scale"
        bs = tensors.get(bs_name)
        if _check_dtype_shape(bs_name, "F8_E4M3", (out, in_ // GROUP_SIZE), ts, report, "FP8 block scales"):
            _check_block_scales(bs, report, no_negative=(fmt == MODELOPT))
        if bs is not None:
            report.quantized_bytes += bs.nbytes

        gs_name = f"{m}.{lay.global_scale}"
        gs = tensors.get(gs_name)
        if _check_dtype_shape(gs_name, "F32", lay.scalar_shape, ts, report, "per-tensor global scale"):
            globals_[m] = _check_positive(gs_name, reader.f32(gs), report)
        if gs is not None:
            report.quantized_bytes += gs.nbytes

        is_name = f"{m}.{lay.input_scale}"
        is_ = tensors.get(is_name)
        if w4a4 or (w4a4 is None and is_ is not None):
            if _check_dtype_shape(is_name, "F32", lay.scalar_shape, ts, report, "activation scale, W4A4"):
                inputs[m] = _check_positive(is_name, reader.f32(is_), report)
        elif is_ is not None and w4a4 is False:
            report.add(is_name, "present, but the config says weight-only (W4A16)")
        if is_ is not None:
            report.quantized_bytes += is_.nbytes

    _check_fused(globals_, lay.global_scale, report)
    _check_fused(inputs, lay.input_scale, report)
    _check_unquantized(modules, excludes, tensors, report)


def _check_fused(values: dict[str, float | None], suffix: str, report: Report) -> None:
    """Members of a fused GEMM must carry bit-identical scales (docs/nvfp4-format.md §4)."""
    groups: dict[tuple[str, str], dict[str, float | None]] = defaultdict(dict)
    for m, v in values.items():
        parent, _, leaf = m.rpartition(".")
        if leaf in FUSED:
            groups[(parent, FUSED[leaf])][leaf] = v
    for (parent, members), got in sorted(groups.items()):
        if any(v is None for v in got.values()) or len(set(got.values())) < 2:
            continue  # a bad value is already reported; one value is fine
        order = [x for x in members.split(",") if x in got]
        common, _ = Counter(got[x] for x in order).most_common(1)[0]
        same = [x for x in order if got[x] == common]
        for leaf in order:
            if got[leaf] != common:
                report.add(f"{parent}.{leaf}.{suffix}",
                           # float32's shortest repr: values that print alike are alike
                           f"is {np.float32(got[leaf])!s} but {', '.join(same)} "
                           f"{'has' if len(same) == 1 else 'have'} {np.float32(common)!s}: the fused "
                           f"{'/'.join(order)} GEMM needs one shared {suffix} "
                           "(TensorRT-LLM refuses it, vLLM/SGLang silently use the max)")


def _check_unquantized(modules: set[str], excludes: Excludes, tensors: dict[str, TensorInfo],
                       report: Report) -> None:
    for name, t in sorted(tensors.items()):
        _in_time(report)
        if not name.endswith(".weight"):
            continue
        m = name[:-len(".weight")]
        if m in modules:
            continue
        if m in excludes:
            if t.dtype not in FLOAT_DTYPES:
                report.add(name, f"module is excluded from quantization but the weight is {t.dtype}, "
                                 f"expected its original float dtype ({'/'.join(FLOAT_DTYPES)})")
        elif m.rpartition(".")[2].endswith("_proj") and len(t.shape) == 2:
            # A projection the engines will build as an NVFP4 Linear (not excluded) but
            # with no NVFP4 tensors: loading fails on the missing scales.
            report.add(name, "looks like a Linear that is neither quantized nor in the exclude/ignore list")
        parent, _, leaf = m.rpartition(".")
        if leaf in FUSED and any(f"{parent}.{x}" in modules for x in FUSED[leaf].split(",")):
            report.add(name, f"unquantized, but other members of the fused {FUSED[leaf]} group are quantized")


def check_kv_scales(fmt: str, ts: Tensors, reader: ScaleReader, report: Report) -> None:
    tensors = ts.by_name
    present = sorted(k for k in tensors if k.endswith((".k_scale", ".v_scale")))
    if report.kv_cache is None:
        for k in present:
            report.add(k, "KV cache scale present but the config has no KV cache quantization")
        return
    if report.kv_cache != "FP8" or not present:
        # No KV scale at all is ModelOpt's FP8 "cast" mode (its *-kv_fp8_cast recipes): the
        # engines cast K and V with a scale of 1.0. Some scales but not all is a broken export.
        return
    attn = sorted({k.rsplit(".", 2)[0] for k in tensors if ".k_proj." in k and k.endswith((".weight", ".weight_packed"))})
    for a in attn:
        _in_time(report)
        for proj, scale in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
            names = [f"{a}.{proj}.{scale}", f"{a}.{scale}"]
            if LAYOUTS[fmt].kv_owner == "attn":
                names.reverse()
            t = next((tensors[n] for n in names if n in tensors), None)
            if t is None:
                _missing(names[0], "the config quantizes the KV cache to FP8", ts, report)
            elif t.dtype != "F32" or math.prod(t.shape) != 1:
                report.add(t.name, f"{t.dtype} {short(list(t.shape))}, expected one F32 value")
            elif t.intact:
                _check_positive(t.name, reader.f32(t), report)


# ---------------------------------------------------------------- entry points

def verify_checkpoint(path: Path) -> Report:
    path = Path(path)
    report = Report(path=str(path))
    try:
        _verify(path, report)
    except _OutOfTime:  # first, so that it is printed whatever else was found
        report.problems.insert(0, Problem(str(path), f"verification stopped after {VERIFY_SECONDS:.0f} s: the "
                                          f"files declare more ({report.tensors or 'too many'} tensors) than any "
                                          "real checkpoint needs checked"))
    return report


def _verify(path: Path, report: Report) -> None:
    if not path.exists():
        report.add(str(path), "no such folder")
        return
    if not path.is_dir():
        report.add(str(path), "not a folder (give the checkpoint's folder)")
        return
    config = _read_json(path / "config.json", report, required=True)
    if config is not None and not isinstance(config.get("model_type"), str):
        # transformers (and so vLLM and SGLang) pick the architecture by it; save_pretrained always writes it
        report.add("config.json", "has no model_type string: no engine can tell what model this is")
    qc = config.get("quantization_config") if config else None
    if config is not None and qc is not None and not isinstance(qc, dict):
        report.add("config.json", "quantization_config is not an object")
        qc = None
    ts = load_tensors(path, report)
    if config is None:
        return
    fmt = detect_format(qc, path, ts.by_name, report)
    report.format = fmt
    if fmt is None:
        return
    from . import verify_mixed

    if fmt == MODELOPT and verify_mixed.is_mixed(path, qc):
        layers, patterns = verify_mixed.check_config(path, qc, report)
        excludes = Excludes(patterns, report, "hf_quant_config.json")
        with ExitStack() as stack:
            reader = ScaleReader(stack, ts.damaged, report)
            try:
                verify_mixed.check_tensors(layers, excludes, ts, reader, report)
                verify_mixed.check_experts(ts, reader, report)
                check_kv_scales(fmt, ts, reader, report)
            except (OSError, ValueError) as e:
                report.add(str(path), f"cannot read the scale tensors: {e}")
        return
    if fmt == MODELOPT:
        w4a4, patterns = check_modelopt_config(path, qc, report)
    else:
        w4a4, patterns = check_ct_config(qc, report)
    excludes = Excludes(patterns, report, "hf_quant_config.json" if fmt == MODELOPT else "config.json")
    report.weight_only = None if w4a4 is None else not w4a4
    with ExitStack() as stack:
        reader = ScaleReader(stack, ts.damaged, report)
        try:
            check_linears(fmt, w4a4, excludes, ts, reader, report)
            if fmt == MODELOPT:
                verify_mixed.check_experts(ts, reader, report)
            check_kv_scales(fmt, ts, reader, report)
        except (OSError, ValueError) as e:
            # A shard that passed the header checks but that safetensors or the OS
            # still cannot read (permissions, I/O error, a corrupt header detail).
            report.add(str(path), f"cannot read the scale tensors: {e}")


def _summary(r: Report) -> str:
    """One line, printable whatever the checkpoint holds."""
    return printable(_summary_text(r))


def _summary_text(r: Report) -> str:
    if r.format is None:
        return f"{r.path}: not verified as NVFP4"
    mode = {None: "?", True: "W4A16 (weight-only)", False: "W4A4"}[r.weight_only]
    if r.layer_formats:  # MIXED_PRECISION
        mode = "per layer: " + ", ".join(f"{n} {algo}" for algo, n in r.layer_formats.items())
    kv = f", KV cache {r.kv_cache}" if r.kv_cache else ""
    bits = f", {8 * r.quantized_bytes / r.quantized_params:.3f} bits/weight" if r.quantized_params else ""
    algo = r.quant_algo if isinstance(r.quant_algo, str) and len(r.quant_algo) <= 80 else short(r.quant_algo)
    return (f"{r.path}: {r.format} {algo or '?'} {mode}{kv}; {r.quantized_linears} quantized Linears"
            f"{bits}; {r.tensors} tensors in {r.shards} shard(s), {r.total_bytes / 2**20:.1f} MiB")


def print_report(report: Report, console) -> None:
    """The summary line, the first MAX_PRINTED problems and the verdict."""
    from rich.markup import escape

    console.print(escape(_summary(report)), highlight=False, soft_wrap=True)
    for p in report.problems[:MAX_PRINTED]:
        console.print(f"[red]problem[/red] {escape(str(p))}", highlight=False, soft_wrap=True)
    if len(report.problems) > MAX_PRINTED:
        console.print(f"[red]problem[/red] {len(report.problems) - MAX_PRINTED} more (all in --json-out)")
    if report.ok:
        engines = "TensorRT-LLM, vLLM and SGLang" if report.format == MODELOPT else "vLLM and SGLang"
        console.print(f"[green]ok[/green]: meets what {engines} require")
    else:
        console.print(f"[red]{len(report.problems)} problem(s)[/red]")


def write_report(report: Report, json_out: Path) -> None:
    """The full report as JSON (a file the user named: a one-line error if it cannot be written)."""
    try:
        atomic_write_text(Path(json_out), json.dumps(report.to_json(), indent=2) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write the report: {e.strerror or e}", where=str(json_out),
                          advice="choose a writable --json-out path") from None
