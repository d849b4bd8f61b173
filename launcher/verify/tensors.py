"""The tensors of an NVFP4 checkpoint against its format: every quantized Linear complete
with well-formed scales, fused q/k/v and gate/up sharing theirs, no Linear left neither
quantized nor excluded, the KV cache scales the config promises."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from .checkpoint_files import TensorInfo, Tensors
from .excludes import Excludes
from .findings import Report, in_time, short
from .layouts import COMPRESSED_TENSORS, FLOAT_DTYPES, FUSED, GROUP_SIZE, LAYOUTS, MODELOPT
from .scales import ScaleReader, check_block_scales, check_positive


def missing(name: str, role: str, ts: Tensors, report: Report) -> None:
    # A tensor in a lost shard is not reported again: the shard's problem covers it.
    if name not in ts.unavailable:
        report.add(name, f"missing ({role})")


def check_dtype_shape(name: str, dtype: str, shape: tuple, ts: Tensors, report: Report, role: str) -> bool:
    t = ts.by_name.get(name)
    if t is None:
        missing(name, role, ts, report)
        return False
    ok = t.intact  # a cut-off tensor's values cannot be read (its file is reported)
    if t.dtype != dtype:
        report.add(name, f"dtype {t.dtype}, expected {dtype} ({role})")
        ok = False
    if t.shape != shape:
        report.add(name, f"shape {short(list(t.shape))}, expected {list(shape)} ({role})")
        ok = False
    return ok


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
        in_time(report)
        if m in excludes:
            report.add(m, "is in the exclude/ignore list but is quantized")
        packed_name = f"{m}.{lay.packed}"
        packed = tensors.get(packed_name)
        if fmt == COMPRESSED_TENSORS and f"{m}.weight" in tensors:
            report.add(f"{m}.weight", "unpacked weight next to weight_packed")
        if packed is None:
            missing(packed_name, "packed NVFP4 weight of a quantized Linear", ts, report)
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
        if check_dtype_shape(bs_name, "F8_E4M3", (out, in_ // GROUP_SIZE), ts, report, "FP8 block scales"):
            check_block_scales(bs, report, no_negative=(fmt == MODELOPT))
        if bs is not None:
            report.quantized_bytes += bs.nbytes

        gs_name = f"{m}.{lay.global_scale}"
        gs = tensors.get(gs_name)
        if check_dtype_shape(gs_name, "F32", lay.scalar_shape, ts, report, "per-tensor global scale"):
            globals_[m] = check_positive(gs_name, reader.f32(gs), report)
        if gs is not None:
            report.quantized_bytes += gs.nbytes

        is_name = f"{m}.{lay.input_scale}"
        is_ = tensors.get(is_name)
        if w4a4 or (w4a4 is None and is_ is not None):
            if check_dtype_shape(is_name, "F32", lay.scalar_shape, ts, report, "activation scale, W4A4"):
                inputs[m] = check_positive(is_name, reader.f32(is_), report)
        elif is_ is not None and w4a4 is False:
            report.add(is_name, "present, but the config says weight-only (W4A16)")
        if is_ is not None:
            report.quantized_bytes += is_.nbytes

    check_fused(globals_, lay.global_scale, report)
    check_fused(inputs, lay.input_scale, report)
    _check_unquantized(modules, excludes, tensors, report)


def check_fused(values: dict[str, float | None], suffix: str, report: Report) -> None:
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
        in_time(report)
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
        in_time(report)
        for proj, scale in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
            names = [f"{a}.{proj}.{scale}", f"{a}.{scale}"]
            if LAYOUTS[fmt].kv_owner == "attn":
                names.reverse()
            t = next((tensors[n] for n in names if n in tensors), None)
            if t is None:
                missing(names[0], "the config quantizes the KV cache to FP8", ts, report)
            elif t.dtype != "F32" or math.prod(t.shape) != 1:
                report.add(t.name, f"{t.dtype} {short(list(t.shape))}, expected one F32 value")
            elif t.intact:
                check_positive(t.name, reader.f32(t), report)
