"""Mixed-precision ModelOpt checkpoints (quant_algo MIXED_PRECISION).

MIXED_PRECISION (ModelOpt's export when layers differ in format, e.g. attention FP8 and experts
NVFP4 weight-only): hf_quant_config.json `quantization.quantized_layers` (TensorRT-LLM) and
config.json `quantization_config.quantized_layers` (vLLM reads it first) map a module, or the
parent of fused experts (`model.layers.0.mlp.experts`), to {"quant_algo": ..., "group_size": 16}.
A Linear in no entry is loaded unquantized, so nothing needs excluding. Per format:

| quant_algo  | weight            | weight_scale             | weight_scale_2 | input_scale |
|-------------|-------------------|--------------------------|----------------|-------------|
| NVFP4       | U8 [out, in/2]    | F8_E4M3 [out, in/16]     | F32 []         | F32 []      |
| W4A16_NVFP4 | U8 [out, in/2]    | F8_E4M3 [out, in/16]     | F32 []         | none        |
| FP8         | F8_E4M3 [out, in] | F32 [] (per tensor)      | none           | F32 []      |

Fused GEMMs (q/k/v, gate/up, Mixtral's w1/w3) need one quant_algo (vLLM raises otherwise) and
the shared scales of tensors.check_fused (docs/nvfp4-format.md §4). The experts' own rules
are in experts.py.
"""
from __future__ import annotations

from collections import defaultdict

from .checkpoint_files import Tensors, read_json
from .configs import kv_scheme
from .excludes import Excludes
from .findings import Report, in_time, short
from .layouts import FUSED, GROUP_SIZE
from .scales import ScaleReader, check_block_scales, check_positive
from .tensors import check_dtype_shape, check_fused, missing

MIXED = "MIXED_PRECISION"
ALGOS = ("NVFP4", "W4A16_NVFP4", "FP8")


def is_mixed(ckpt, qc: dict | None) -> bool:
    if isinstance(qc, dict) and qc.get("quant_algo") == MIXED:
        return True
    hf = ckpt / "hf_quant_config.json"
    if not hf.is_file():
        return False
    quiet = Report(path=str(ckpt))  # problems are reported by the real read below
    data = read_json(hf, quiet, required=False) or {}
    hq = data.get("quantization")
    return isinstance(hq, dict) and hq.get("quant_algo") == MIXED


# ---------------------------------------------------------------- configs

def _layers(where: str, value, report: Report) -> dict[str, dict] | None:
    if not isinstance(value, dict) or not value:
        report.add(where, "MIXED_PRECISION needs a non-empty quantized_layers object (vLLM refuses the "
                          "checkpoint without one)")
        return None
    out = {}
    for name, cfg in value.items():
        algo = cfg.get("quant_algo") if isinstance(cfg, dict) else None
        if algo not in ALGOS:
            report.add(f"{where}.{name}", f"quant_algo {short(algo)} is not one of {', '.join(ALGOS)}")
            continue
        if algo != "FP8" and cfg.get("group_size", GROUP_SIZE) != GROUP_SIZE:
            report.add(f"{where}.{name}", f"group_size {short(cfg.get('group_size'))}, NVFP4 needs {GROUP_SIZE}")
        out[name] = algo
    return out


def check_config(ckpt, qc: dict | None, report: Report) -> tuple[dict[str, str], list[str]]:
    """(module -> quant_algo, exclude patterns) from both config files, which must agree."""
    report.quant_algo = MIXED
    hf = read_json(ckpt / "hf_quant_config.json", report, required=True)
    hq = hf.get("quantization") if hf else None
    if hf is not None and not isinstance(hq, dict):
        report.add("hf_quant_config.json", "has no 'quantization' object")
        hq = None
    layers = excludes = None
    if hq is not None:
        if hq.get("quant_algo") != MIXED:
            report.add("hf_quant_config.json", f"quant_algo is {short(hq.get('quant_algo'))}, config.json says {MIXED}")
        layers = _layers("hf_quant_config.json quantization.quantized_layers", hq.get("quantized_layers"), report)
        excludes = hq.get("exclude_modules")
        kv = hq.get("kv_cache_quant_algo")
        if kv not in (None, "FP8"):
            report.add("hf_quant_config.json", f"kv_cache_quant_algo {short(kv)} is not supported here (null or FP8)")
        report.kv_cache = kv if kv in (None, "FP8") else "?"
    if qc is not None:
        if qc.get("quant_algo") != MIXED:
            report.add("config.json", f"quantization_config.quant_algo is {short(qc.get('quant_algo'))}, "
                                      f"hf_quant_config.json says {MIXED}")
        theirs = _layers("config.json quantization_config.quantized_layers", qc.get("quantized_layers"), report)
        if layers is None:
            layers = theirs
        elif theirs is not None and theirs != layers:
            diff = sorted(set(layers.items()) ^ set(theirs.items()))
            report.add("config.json", f"quantization_config.quantized_layers differs from hf_quant_config.json's "
                                      f"(first difference: {short(diff[0])}): vLLM and TensorRT-LLM would load "
                                      "different formats")
        kv = kv_scheme(qc.get("kv_cache_scheme"), "config.json", report)
        if hq is None:
            report.kv_cache = kv
        elif kv != report.kv_cache:
            report.add("config.json", f"quantization_config.kv_cache_scheme says {kv or 'no'} KV cache "
                                      f"quantization, hf_quant_config.json says {report.kv_cache or 'none'}")
        if excludes is None:
            excludes = qc.get("ignore")
    if excludes is not None and not (isinstance(excludes, list) and all(isinstance(x, str) for x in excludes)):
        report.add("hf_quant_config.json", "exclude_modules is not a list of module names")
        excludes = []
    return layers or {}, excludes or []


# ---------------------------------------------------------------- tensors

def _entry(module: str, layers: dict[str, str]) -> tuple[str, str] | None:
    """The quantized_layers entry covering `module`: its own name, else its nearest parent
    (fused experts are listed once, as `...mlp.experts`)."""
    name = module
    while name:
        if name in layers:
            return name, layers[name]
        name = name.rpartition(".")[0]
    return None


def _scalar(name: str, ts: Tensors, reader: ScaleReader, report: Report, role: str) -> float | None:
    t = ts.by_name.get(name)
    if check_dtype_shape(name, "F32", (), ts, report, role):
        report.quantized_bytes += t.nbytes
        return check_positive(name, reader.f32(t), report)
    return None


def check_tensors(layers: dict[str, str], excludes: Excludes, ts: Tensors, reader: ScaleReader,
                  report: Report) -> dict[str, str]:
    """Every quantized module against its quantized_layers entry; returns module -> quant_algo."""
    tensors = ts.by_name
    modules = {k.rsplit(".", 1)[0] for k in tensors if k.endswith((".weight_scale", ".weight_scale_2", ".input_scale"))}
    modules |= {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight") and tensors[k].dtype in ("U8", "F8_E4M3")}
    report.quantized_linears = len(modules)
    algo_of: dict[str, str] = {}
    globals_: dict[str, float | None] = {}
    inputs: dict[str, float | None] = {}
    counts: dict[str, int] = defaultdict(int)
    for m in sorted(modules):
        in_time(report)
        if m in excludes:
            report.add(m, "is in the exclude/ignore list but is quantized")
        hit = _entry(m, layers)
        if hit is None:
            report.add(m, "has quantized tensors but no quantized_layers entry covers it: engines would "
                          "build it unquantized and fail on its tensors")
            continue
        algo = algo_of[m] = hit[1]
        counts[algo] += 1
        w = tensors.get(f"{m}.weight")
        if w is None:
            missing(f"{m}.weight", f"weight of a {algo} Linear", ts, report)
            continue
        if len(w.shape) != 2:
            report.add(f"{m}.weight", f"shape {short(list(w.shape))}, expected a 2-D Linear weight")
            continue
        if algo == "FP8":
            if w.dtype != "F8_E4M3":
                report.add(f"{m}.weight", f"dtype {w.dtype}, an FP8 layer stores F8_E4M3")
                continue
            out, in_ = w.shape
            report.quantized_bytes += w.nbytes
            report.quantized_params += out * in_
            _scalar(f"{m}.weight_scale", ts, reader, report, "FP8 per-tensor weight scale")
            inputs[m] = _scalar(f"{m}.input_scale", ts, reader, report, "FP8 static activation scale")
            if f"{m}.weight_scale_2" in tensors:
                report.add(f"{m}.weight_scale_2", "present on an FP8 layer (an NVFP4 tensor)")
            continue
        if w.dtype != "U8":
            report.add(f"{m}.weight", f"dtype {w.dtype}, a {algo} layer stores U8 (packed E2M1 pairs)")
            continue
        out, in_ = w.shape[0], w.shape[1] * 2
        if in_ % GROUP_SIZE:
            report.add(f"{m}.weight", f"in_features {in_} is not a multiple of {GROUP_SIZE}: engines cannot run it")
        report.quantized_bytes += w.nbytes
        report.quantized_params += out * in_
        bs = tensors.get(f"{m}.weight_scale")
        if check_dtype_shape(f"{m}.weight_scale", "F8_E4M3", (out, in_ // GROUP_SIZE), ts, report,
                                "FP8 block scales"):
            check_block_scales(bs, report, no_negative=True)
        if bs is not None:
            report.quantized_bytes += bs.nbytes
        globals_[m] = _scalar(f"{m}.weight_scale_2", ts, reader, report, "per-tensor global scale")
        if algo == "NVFP4":
            inputs[m] = _scalar(f"{m}.input_scale", ts, reader, report, "activation scale, W4A4")
        elif f"{m}.input_scale" in tensors:
            report.add(f"{m}.input_scale", "present, but quantized_layers says W4A16_NVFP4 (weight-only)")
    for name in sorted(set(layers) - {h[0] for h in (_entry(m, layers) for m in modules) if h}):
        report.add(name, f"listed in quantized_layers as {layers[name]} but has no quantized tensors")
    report.layer_formats = dict(sorted(counts.items()))
    _check_fused_algos(algo_of, tensors, report)
    check_fused(globals_, "weight_scale_2", report)
    check_fused(inputs, "input_scale", report)
    return algo_of


def _check_fused_algos(algo_of: dict[str, str], tensors: dict, report: Report) -> None:
    """Members of one fused GEMM in one format (an unquantized member counts as bf16)."""
    groups: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for name in tensors:
        if not name.endswith(".weight"):
            continue
        m = name[:-len(".weight")]
        parent, _, leaf = m.rpartition(".")
        if leaf in FUSED:
            groups[(parent, FUSED[leaf])][leaf] = algo_of.get(m, "bf16")
    for (parent, members), got in sorted(groups.items()):
        if len(set(got.values())) > 1:
            detail = ", ".join(f"{leaf} {algo}" for leaf, algo in sorted(got.items()))
            report.add(parent, f"the fused {members.replace(',', '/')} GEMM mixes formats ({detail}): vLLM "
                               "refuses it; quantize the group alike")
