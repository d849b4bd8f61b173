"""The statistics GPTQ fits to, gathered by hooks on the quantized Linears during calibration
passes: H = X^T X per fused unit (its inputs, NVFP4-rounded for activation-aware GPTQ) and the
cross term C, plus the calibration batches a later ranking pass needs."""
from __future__ import annotations

import torch

from ..numerics.emulate import fake_quant_nvfp4
from ..numerics.linear_compute import float32_linears
from .quantizers import QuantizersOff, fused_units, unit_input_scale


def keep_input_ids(model, kept: list, count: int):
    """Hook the decoder so that the first `count` input_ids batches of a pass land in `kept`
    (the mixed-precision ranking reuses them). Returns the hook's handle."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model

    def keep(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and len(kept) < count:
            kept.append(ids.detach().clone())
    return body.register_forward_pre_hook(keep, with_kwargs=True)


@torch.no_grad()
def collect_hessians(model, forward_loop, linears: dict, quantized_input: bool = False,
                     keep_batches: int = 0, act_aware: bool = False):
    """One calibration pass of the unquantized model; H = mean x^T x per Linear (float32),
    x fake-quantized as the engine quantizes the input when quantized_input or act_aware.
    With act_aware also C = mean x_orig^T x_q (for the activation-error correction).
    Also keeps the first `keep_batches` input_ids batches (for the sensitivity pass)."""

    hs = {n: None for n in linears}
    cs = {n: None for n in linears}
    counts = {n: 0 for n in linears}
    quantized_input = quantized_input or act_aware
    kept = []
    handles = []

    def hook_for(name, mods):
        scale = unit_input_scale(mods) if quantized_input else None

        def pre(mod, args):
            x0 = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            x = x0 if scale is None else fake_quant_nvfp4(x0, scale)
            h = x.T @ x
            hs[name] = h if hs[name] is None else hs[name].add_(h)
            if act_aware:
                c = x0.T @ x
                cs[name] = c if cs[name] is None else cs[name].add_(c)
            counts[name] += x.shape[0]
        return pre

    # the members of a fused unit (q/k/v, gate/up) read the same input: one Hessian each unit
    units = fused_units(linears)
    for unit in units:
        handles.append(linears[unit[0]].register_forward_pre_hook(hook_for(unit[0], [linears[n] for n in unit])))
    handles.append(keep_input_ids(model, kept, keep_batches))
    try:
        with QuantizersOff(model), float32_linears(model):
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    for n in hs:
        if hs[n] is not None:
            hs[n] = hs[n] / max(counts[n], 1)  # out of place: the hook ran in inference mode
        if cs[n] is not None:
            cs[n] = cs[n] / max(counts[n], 1)
    for unit in units:
        for n in unit[1:]:
            hs[n], cs[n] = hs[unit[0]], cs[unit[0]]
    if act_aware:
        return hs, kept, cs
    return hs, kept
