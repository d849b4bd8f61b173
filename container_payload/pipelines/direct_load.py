"""Read a safetensors checkpoint straight into device tensors, while Python is still importing.

Why not from_pretrained's loader: it maps each shard and copies tensor by tensor out of pageable
memory, and it can only start once torch and transformers are imported (~10 s on an 8B run,
benchmarks/notes-gpu.md). This reader needs torch alone, so the payload starts it in a thread right
after `import torch`; its work is os.preadv (releases the GIL) into two pinned buffers and
asynchronous copies into each tensor's bytes, one sequential pass per shard, so the disk read
overlaps the transformers / ModelOpt imports. The bytes are the file's bytes: nothing converts.

    state_dict = read_state_dict(checkpoint_files(model_dir), "cuda")

The payload then builds the model around these tensors (loading.model_from_state_dict); anything unusual
(other dtypes, a missing key) makes it fall back to from_pretrained.
"""
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# safetensors dtype names -> torch dtypes (the format's own table)
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# 4 readers of 32 MB reads: the fastest read of the variants measured on the 8B run (one reader
# of 8 MB reads read at 0.8 GB/s on a 1.1 GB/s disk and became the critical path; notes-gpu.md).
CHUNK = 32 << 20  # bytes per read; two pinned per reader
READERS = 4  # shards read at once


class UnsupportedCheckpoint(Exception):
    """This checkpoint needs from_pretrained's loader (e.g. a dtype missing from DTYPES)."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The shards the checkpoint's index names (not every *.safetensors in the folder: some repos
    also ship a consolidated copy), or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise UnsupportedCheckpoint(f"no model.safetensors or index in {model_dir}")


def read_header(path: Path) -> tuple[int, list[tuple[str, torch.dtype, list[int], int, int]]]:
    """(offset of the data section, [(name, dtype, shape, begin, end)] sorted by begin)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise UnsupportedCheckpoint(f"{path.name}: tensor {name} has dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries.append((name, dtype, list(info["shape"]), begin, end))
    entries.sort(key=lambda e: e[3])
    return 8 + n, entries


def _read_into(fd: int, view: memoryview, pos: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], pos + done)
        if got <= 0:
            raise UnsupportedCheckpoint(f"file ended at byte {pos + done}, its header says more")
        done += got


def read_state_dict(files: list[Path], device: str, readers: int = READERS,
                    chunk: int = CHUNK) -> dict[str, torch.Tensor]:
    """Every tensor of every file, each in its own allocation on `device`."""
    out: dict[str, torch.Tensor] = {}
    if torch.device(device).type == "cuda":
        _read_cuda(files, torch.device(device), out, readers, chunk)
    else:
        _read_host(files, out)
    return out


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _read_host(files, out) -> None:
    # Host memory: read each tensor's bytes into its own storage directly.
    for path in files:
        start, entries = read_header(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            for name, dtype, shape, begin, end in entries:
                t = torch.empty(shape, dtype=dtype)
                if end > begin:
                    _read_into(fd, memoryview(_bytes_of(t).numpy()), start + begin)
                out[name] = t
        finally:
            os.close(fd)


def _read_cuda(files, device, out, readers, chunk) -> None:
    # `readers` shards at once, each in its own thread (more readers fill the disk's queue
    # deeper, which delays the imports' page faults: see READERS).

    with ThreadPoolExecutor(max_workers=max(1, min(readers, len(files)))) as pool:
        for part in pool.map(lambda f: _read_shard_cuda(f, device, chunk), files):
            out.update(part)


def _read_shard_cuda(path: Path, device, chunk: int) -> dict[str, torch.Tensor]:
    # Double-buffered: while the GPU copies chunk i out of one pinned buffer, the disk fills the
    # other. A chunk's bytes land in the tensors it overlaps (a tensor may span several chunks).
    stream = torch.cuda.Stream(device)
    pinned = [torch.empty(chunk, dtype=torch.uint8).pin_memory() for _ in range(2)]
    views = [memoryview(b.numpy()) for b in pinned]
    done = [None, None]
    i = 0
    start, entries = read_header(path)
    out, targets = {}, []
    for name, dtype, shape, begin, end in entries:
        t = torch.empty(shape, dtype=dtype, device=device)
        out[name] = t
        if end > begin:
            targets.append((begin, end, _bytes_of(t)))
    stream.wait_stream(torch.cuda.current_stream(device))  # allocations before copies
    data_end = max((e for _, e, _ in targets), default=0)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        k = 0  # first target not yet fully copied
        for c0 in range(0, data_end, chunk):
            c1 = min(c0 + chunk, data_end)
            if done[i] is not None:
                done[i].synchronize()  # the GPU has finished reading this buffer
            _read_into(fd, views[i][:c1 - c0], start + c0)
            with torch.cuda.stream(stream):
                j = k
                while j < len(targets) and targets[j][0] < c1:
                    b, e, dst = targets[j]
                    lo, hi = max(b, c0), min(e, c1)
                    dst[lo - b:hi - b].copy_(pinned[i][lo - c0:hi - c0], non_blocking=True)
                    if e <= c1:
                        k = j + 1
                    j += 1
                done[i] = stream.record_event()
            i ^= 1
    finally:
        os.close(fd)
    stream.synchronize()  # every copy has landed before the tensors are handed out
    return out
