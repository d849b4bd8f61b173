"""verify_checkpoint: every check of one checkpoint folder, in order, within the report's deadline."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from . import mixed_precision
from .checkpoint_files import load_tensors, read_json
from .configs import check_ct_config, check_modelopt_config, detect_format
from .excludes import Excludes
from .experts import check_experts
from .findings import VERIFY_SECONDS, OutOfTime, Problem, Report
from .layouts import MODELOPT
from .scales import ScaleReader
from .tensors import check_kv_scales, check_linears


def verify_checkpoint(path: Path) -> Report:
    path = Path(path)
    report = Report(path=str(path))
    try:
        _verify(path, report)
    except OutOfTime:  # first, so that it is printed whatever else was found
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
    config = read_json(path / "config.json", report, required=True)
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
    if fmt == MODELOPT and mixed_precision.is_mixed(path, qc):
        layers, patterns = mixed_precision.check_config(path, qc, report)
        excludes = Excludes(patterns, report, "hf_quant_config.json")
        with ExitStack() as stack:
            reader = ScaleReader(stack, ts.damaged, report)
            try:
                mixed_precision.check_tensors(layers, excludes, ts, reader, report)
                check_experts(ts, reader, report)
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
                check_experts(ts, reader, report)
            check_kv_scales(fmt, ts, reader, report)
        except (OSError, ValueError) as e:
            # A shard that passed the header checks but that safetensors or the OS
            # still cannot read (permissions, I/O error, a corrupt header detail).
            report.add(str(path), f"cannot read the scale tensors: {e}")
