"""The experts of each MoE layer (`...experts.N.proj`): every expert present with the same
projections in the same format, each with its own complete scales (TensorRT-LLM reads every
expert's, a missing one fails the load), and one input_scale per projection across the
layer's experts: TensorRT-LLM uses the max over experts (ModelOpt writes them equal), so an
expert calibrated lower is quantized with another expert's scale."""
from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from .checkpoint_files import Tensors
from .findings import Report, in_time
from .layouts import FUSED
from .scales import ScaleReader

EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<idx>\d+)\.(?P<proj>[^.]+)$")


def check_experts(ts: Tensors, reader: ScaleReader, report: Report) -> None:
    """Completeness and shared input scales across the experts of each MoE layer."""
    tensors = ts.by_name
    layers: dict[str, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for name, t in tensors.items():
        if not name.endswith(".weight"):
            continue
        hit = EXPERT.match(name[:-len(".weight")])
        if hit:
            layers[hit["layer"]][int(hit["idx"])][hit["proj"]] = t.dtype
    for layer, experts in sorted(layers.items()):
        in_time(report)
        n = max(experts) + 1
        absent = [i for i in range(n) if i not in experts]
        if absent:
            report.add(f"{layer}.{absent[0]}", f"expert missing: {len(absent)} of experts 0-{n - 1} have no "
                                               "weights (the engines load every expert)")
        projs = sorted({p for e in experts.values() for p in e})
        for proj in projs:
            dtypes = {i: e.get(proj) for i, e in sorted(experts.items())}
            lacking = [i for i, d in dtypes.items() if d is None]
            if lacking:
                report.add(f"{layer}.{lacking[0]}.{proj}.weight",
                           f"missing: {len(lacking)} expert(s) lack {proj}, the others have it")
            kinds = sorted({d for d in dtypes.values() if d is not None})
            if len(kinds) > 1:
                report.add(f"{layer}.*.{proj}", f"experts store {proj} in different formats ({', '.join(kinds)}): "
                                                "one MoE layer runs one kernel format")
        _check_shared_inputs(layer, experts, projs, ts, reader, report)


def _check_shared_inputs(layer: str, experts: dict, projs: list[str], ts: Tensors, reader: ScaleReader,
                         report: Report) -> None:
    # gate/up (w1/w3) feed one fused GEMM: one scale across both and all experts; down (w2) another
    roles: dict[str, list[str]] = defaultdict(list)
    for proj in projs:
        roles[FUSED.get(proj, proj)].append(proj)
    for role, members in sorted(roles.items()):
        values = {}
        for i in sorted(experts):
            for proj in members:
                t = ts.by_name.get(f"{layer}.{i}.{proj}.input_scale")
                if t is not None and t.intact and t.dtype == "F32" and len(t.shape) == 0:
                    values[(i, proj)] = float(np.float32(reader.f32(t)[0]))
        if len(set(values.values())) < 2:
            continue
        top = max(values.values())
        low = sorted(k for k, x in values.items() if x != top)
        i, proj = low[0]
        report.add(f"{layer}.{i}.{proj}.input_scale",
                   f"is {np.float32(values[low[0]])!s} but the layer's largest is {np.float32(top)!s} "
                   f"({len(low)} of {len(values)} differ): engines use one input scale per MoE layer "
                   "(TensorRT-LLM takes the max over experts), so export them equal")
