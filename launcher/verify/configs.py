"""Each format's quantization config: ModelOpt's hf_quant_config.json and config.json (which
must agree), compressed-tensors' config.json, and which of the two a checkpoint is."""
from __future__ import annotations

from pathlib import Path

from .checkpoint_files import TensorInfo, read_json
from .findings import Report, short
from .layouts import COMPRESSED_TENSORS, CT_FORMAT, GROUP_SIZE, MODELOPT, NVFP4_ALGOS


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


def kv_scheme(value, where: str, report: Report) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict) and value.get("num_bits") == 8 and value.get("type") == "float":
        return "FP8"
    report.add(where, f"unsupported KV cache scheme {short(value)} (only FP8 or null)")
    return "?"


def check_modelopt_config(ckpt: Path, qc: dict | None, report: Report) -> tuple[bool | None, list[str]]:
    """hf_quant_config.json (TensorRT-LLM) and config.json (vLLM, SGLang) must agree."""
    hf = read_json(ckpt / "hf_quant_config.json", report, required=True)
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
        kv = kv_scheme(qc["kv_cache_scheme"], "config.json", report)
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
    report.kv_cache = kv_scheme(qc.get("kv_cache_scheme"), "config.json", report)
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
