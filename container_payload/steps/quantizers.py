"""ModelOpt's quantizers as our weight passes use them: which Linears are quantized, their fused
units, their input scales, turning them off for a while, and storing our block scales in
them (StaticBlockScaleQuantizer's state, which export_hf_checkpoint writes unchanged).

The chosen scales are stored as the STATIC per-block amax of ModelOpt's weight quantizer (the
same state its MSE / four-over-six calibrations leave), with `global_amax` shared by each fused
group (q/k/v, gate/up) BEFORE any block scale is chosen. Export then computes
weight_scale = fp8(amax_b * 448 / global_amax) = exactly our scale and
weight_scale_2 = global_amax / 2688, and re-rounds the (already on-grid) weights to exactly
the codes GPTQ picked.
"""
from __future__ import annotations

import torch

from ..numerics.nvfp4 import BLOCK, E2M1_MAX, E4M3_MAX

# Fused groups the engines build for Llama-style blocks (docs/nvfp4-format.md §4).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _quantizers(model):
    from modelopt.torch.quantization.nn import TensorQuantizer
    return [m for m in model.modules() if isinstance(m, TensorQuantizer)]


class QuantizersOff:
    """Temporarily disable every enabled ModelOpt quantizer (the refine passes run the
    original model; ModelOpt's CPU fake-quant kernels need CUDA anyway). A quantizer turned
    off here still counts as enabled for unit_input_scale: our emulation needs its scale."""

    def __init__(self, model):
        self.qs = [q for q in _quantizers(model) if q.is_enabled]

    def __enter__(self):
        for q in self.qs:
            q.disable()
            _PAUSED.add(id(q))

    def __exit__(self, *exc):
        for q in self.qs:
            q.enable()
            _PAUSED.discard(id(q))


_PAUSED: set[int] = set()  # ids of the quantizers a QuantizersOff holds off


def is_fp8_per_tensor(q) -> bool:
    """A quantizer the mixed-precision ranking turned into FP8 per-tensor (bf16_ranking.set_fp8)."""
    return getattr(q, "num_bits", None) == (4, 3) and not getattr(q, "block_sizes", None)


def quantized_linears(model) -> dict:
    """The NVFP4 Linears our weight steps handle (units the ranking made FP8 are done: export
    rounds them itself)."""
    out = {}
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is not None and getattr(wq, "is_enabled", False) and hasattr(m, "weight") \
                and m.weight.dim() == 2 and m.weight.shape[1] % BLOCK == 0 and not is_fp8_per_tensor(wq):
            out[name] = m
    return out


def modules_out_of_reach(model, linears: dict) -> list:
    """Modules whose weights ModelOpt quantizes but that are not among `linears` (the 2-D Linears
    our weight steps handle). transformers 5 keeps a Mixture-of-Experts layer's experts as fused
    3-D parameters, which ModelOpt quantizes per expert (a ModuleList of weight quantizers) but
    GPTQ, the scale search and the bf16 ranking do not reach: they keep ModelOpt's round-to-nearest
    with max scales."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    modules = dict(model.named_modules())
    handled = {id(m) for m in linears.values()}
    owners = {}
    for name, q in modules.items():
        if not isinstance(q, TensorQuantizer) or not q.is_enabled:
            continue
        parts = name.split(".")
        at = next((i for i, p in enumerate(parts) if "weight_quantizer" in p), None)
        owner = modules.get(".".join(parts[:at])) if at is not None else None
        if owner is not None and id(owner) not in handled and not is_fp8_per_tensor(q):
            owners[id(owner)] = owner
    return list(owners.values())


def weights_out_of_reach(model, linears: dict) -> dict[str, int]:
    """modules_out_of_reach counted by kind, e.g. {"Qwen3MoeExperts (fused 3-D expert weights)": 2}."""
    out: dict[str, int] = {}
    for m in modules_out_of_reach(model, linears):
        name = type(m).__name__  # ModelOpt's QuantX subclasses X: name the model's own class
        name = next((c.__name__ for c in type(m).__mro__[1:] if c.__name__ == name.removeprefix("Quant")), name)
        fused = any(p.dim() == 3 for p in m.parameters(recurse=False))
        what = f"{name} ({'fused 3-D expert weights' if fused else 'not a 2-D Linear of 16-multiple inputs'})"
        out[what] = out.get(what, 0) + 1
    return out


def fused_units(names) -> list[list[str]]:
    """Quantized Linear names grouped into the units the engines fuse (q/k/v, gate/up);
    every other Linear is a unit of its own."""
    names = list(names)
    left, units = set(names), []
    for n in names:
        if n not in left:
            continue
        parent, _, leaf = n.rpartition(".")
        unit = [n]
        for group in FUSED_GROUPS:
            if leaf in group:
                unit = [f"{parent}.{g}" if parent else g for g in group]
                unit = [u for u in unit if u in left]
                break
        for u in unit:
            left.discard(u)
        units.append(unit)
    return units


def _input_amax(m) -> torch.Tensor | None:
    iq = getattr(m, "input_quantizer", None)
    if iq is None or not (iq.is_enabled or id(iq) in _PAUSED) or getattr(iq, "amax", None) is None:
        return None
    return iq.amax.detach().float().reshape(-1).max()


def unit_input_scale(mods) -> torch.Tensor | None:
    """The input scale the export writes for a fused unit (one, shared: max of the members'
    calibrated input amax / (6 * 448)), or None when its input is not quantized."""
    amaxes = [a for a in (_input_amax(m) for m in mods) if a is not None]
    return torch.stack(amaxes).max() / (E2M1_MAX * E4M3_MAX) if amaxes else None


def row_pieces(ws, elements: int | None = None):
    """(first row, rows) of weights stacked by rows, as the fused unit's matrix stacks its members'
    (`ws`: a list, or one tensor): each member whole, or at most `elements` at a time."""
    r0 = 0
    for w in ([ws] if torch.is_tensor(ws) else ws):
        step = w.shape[0] if elements is None else max(1, elements // w.shape[1])
        for a in range(0, w.shape[0], step):
            yield r0 + a, w[a:a + step]
        r0 += w.shape[0]


def stacked_rows(ws) -> int:
    """The rows of row_pieces' stacked matrix."""
    return sum(w.shape[0] for w in ([ws] if torch.is_tensor(ws) else ws))


def unit_weight(mods) -> torch.Tensor:
    """The members' weights stacked by rows in float32 (the matrix GPTQ and the activation
    correction work on), written row block by row block: no float32 copy of a member beside it."""
    ws = [m.weight.detach() for m in mods]
    out = torch.empty(stacked_rows(ws), ws[0].shape[1], dtype=torch.float32, device=ws[0].device)
    for r0, w in row_pieces(ws):
        out[r0:r0 + w.shape[0]].copy_(w)
    return out


def set_static_weight_quantizer(m, scales: torch.Tensor, global_amax: torch.Tensor) -> None:
    """Store per-block FP8 scales as the static per-block amax of m's weight quantizer so
    that export writes weight_scale == scales and weight_scale_2 == global_amax / 2688."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import StaticBlockScaleQuantizer

    wq = m.weight_quantizer
    bs = dict(wq.block_sizes)
    bs["type"] = "static"
    wq.block_sizes = bs
    StaticBlockScaleQuantizer.from_tensor_quantizer(wq, global_amax=global_amax.float().reshape(()))
    g = global_amax.float().reshape(())
    # export: fp8(amax_b / 6 * 448 / (G / 6)) = fp8(amax_b * 448 / G) -> scales exactly
    amax = scales.float() * g / E4M3_MAX
    if getattr(wq, "_amax", None) is not None:
        delattr(wq, "_amax")  # the dynamic quantizer's scalar amax; ours is per block
    wq.amax = amax.reshape(-1, 1).contiguous()
