"""Mixture-of-Experts recipes: which Linear gets which format, as ModelOpt wildcard entries.

    moe-w4a16-experts  routed and shared experts NVFP4 weight-only, attention FP8 (W8A8
                       per-tensor), FP8 KV cache: the layout of nvidia/Qwen3.6-35B-A3B-NVFP4.
                       ModelOpt exports it as quant_algo MIXED_PRECISION with per-layer formats.
                       Hybrid models (Qwen3.5/3.6-MoE's Gated DeltaNet `linear_attn` layers): the
                       large projections in_proj_qkv, in_proj_z and out_proj FP8; in_proj_a,
                       in_proj_b (a few rows each) and conv1d bf16.
    moe-w4a4-experts   routed experts NVFP4 W4A4; attention, shared experts and all else bf16.

Routers (`mlp.gate`, `block_sparse_moe.gate`, `router`, `shared_expert_gate`) and lm_head stay
bf16 through the preset's own disable entries, which come after ours and so win.

The entries are built from ModelOpt's own presets (NVFP4_DEFAULT_CFG, FP8_DEFAULT_CFG): the
quantizer attributes and the disable list are the ones this ModelOpt ships, in the form it uses
(0.37: a dict of wildcard -> attributes; 0.45+: a list of entries). ModelOpt strips the expert
index from the per-expert quantizers of transformers 5's fused experts
(`experts.gate_up_proj_weight_quantizers.3` matches `*weight_quantizer`), so one pattern covers
per-expert Linears (transformers 4.57) and fused experts (5.x) alike.
"""
from __future__ import annotations

import copy

from torch import nn

from ..core.events import PayloadError

# routed experts: Qwen/Mixtral/DeepSeek `.experts.`; shared experts: Qwen's `shared_expert.`,
# DeepSeek's `shared_experts.` (Qwen's `shared_expert_gate` matches too, but the preset's own
# disable entry for it comes later and wins: it stays bf16, as the published checkpoint has it)
ROUTED = "*.experts.*"
SHARED = "*shared_expert*"
ATTENTION = "*self_attn.*"
# Gated DeltaNet projections that nvidia/Qwen3.6-35B-A3B-NVFP4 stores FP8. Its module formats
# (ModelOpt's tools/recipe_backfill/published_checkpoints.json, read from the checkpoint's
# hf_quant_config.json and tensors): linear_attn.in_proj_qkv / in_proj_z / out_proj FP8,
# in_proj_a / in_proj_b / conv1d bf16, self_attn FP8, routed and shared experts W4A16_NVFP4,
# mlp.gate and shared_expert_gate bf16, kv_cache_quant_algo FP8; ModelOpt's recipe that
# reproduces it is huggingface/qwen3_5_moe/ptq/w4a16_nvfp4-fp8_attn-kv_fp8_cast. (Its lm_head is
# W4A16_NVFP4 too; ours stays bf16, as in every other recipe here.)
LINEAR_ATTENTION = ("*linear_attn.in_proj_qkv.", "*linear_attn.in_proj_z.", "*linear_attn.out_proj.")

# recipe -> [(module pattern, format of its weight_quantizer, of its input_quantizer)]
LAYOUTS = {
    "moe-w4a16-experts": [(ROUTED, "nvfp4", None), (SHARED, "nvfp4", None), (ATTENTION, "fp8", "fp8"),
                          *((m, "fp8", "fp8") for m in LINEAR_ATTENTION)],
    "moe-w4a4-experts": [(ROUTED, "nvfp4", "nvfp4")],
}
KV_FP8 = {"moe-w4a16-experts": True, "moe-w4a4-experts": False}
QUANTIZERS = ("*weight_quantizer", "*input_quantizer")


def _entries(quant_cfg):
    """[(pattern, attributes)] of a preset in either form (0.37 dict, 0.45+ list)."""
    if isinstance(quant_cfg, dict):
        return list(quant_cfg.items())
    return [(e.get("quantizer_name"), e) for e in quant_cfg]


def _attributes(preset: dict, pattern: str) -> dict:
    """The quantizer attributes a preset gives `pattern` ('*weight_quantizer' ...), as the
    0.37 dict value or the 0.45+ entry's cfg."""
    for name, value in _entries(preset["quant_cfg"]):
        if name == pattern:
            return copy.deepcopy(value["cfg"] if "quantizer_name" in value and "cfg" in value else value)
    raise PayloadError(f"this ModelOpt's preset has no {pattern!r} entry to build the MoE recipe from",
                       kind="input")


def build_config(recipe: str, mtq) -> dict:
    """ModelOpt's quantize config for one of LAYOUTS, in this ModelOpt's form."""
    fmt = {"nvfp4": mtq.NVFP4_DEFAULT_CFG, "fp8": mtq.FP8_DEFAULT_CFG}
    base = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    ours = []
    for module, weight, act in LAYOUTS[recipe]:
        for quantizer, kind in zip(QUANTIZERS, (weight, act)):
            if kind is not None:
                ours.append((module + quantizer.lstrip("*"), _attributes(fmt[kind], quantizer)))
    if KV_FP8[recipe]:
        ours += [(n, v.get("cfg", v) if "quantizer_name" in v else v)
                 for n, v in _entries(mtq.FP8_KV_CFG["quant_cfg"]) if n != "default"]
    # Ours replace the preset's global weight/input entries where they stood: after the preset's
    # leading "*" disable (0.45+), before its router/lm_head disables, which must win.
    quant_cfg = base["quant_cfg"]
    if isinstance(quant_cfg, dict):
        out, placed = {}, False
        for name, value in quant_cfg.items():
            if name in QUANTIZERS:
                if not placed:
                    out.update({n: {**a, "enable": True} for n, a in ours})
                    placed = True
                continue
            out[name] = value
        base["quant_cfg"] = out
    else:
        out, placed = [], False
        for entry in quant_cfg:
            if entry.get("quantizer_name") in QUANTIZERS:
                if not placed:
                    out += [{"quantizer_name": n, "cfg": a} for n, a in ours]
                    placed = True
                continue
            out.append(entry)
        base["quant_cfg"] = out
    # Every calibration token reaches every expert (ModelOpt's moe_calib_experts_ratio, 0.47+: the
    # router's top_k raised for the calibration pass only), so an expert the router rarely picks
    # still gets its statistics from the whole text; the outputs use the real routing.
    base["algorithm"] = {"method": "max", "moe_calib_experts_ratio": ALL_EXPERTS}
    return base


ALL_EXPERTS = 1.0


# ---------------------------------------------------------------- after calibration

def uncalibrated_quantizers(model) -> list[str]:
    """Every enabled static quantizer without a usable amax: an expert (or any Linear) whose
    input never saw a calibration token, or a weight that was never measured. The export would
    otherwise write a default or fail; one such name is enough to stop the job."""
    import torch
    from modelopt.torch.quantization.nn import TensorQuantizer

    bad = []
    for name, q in model.named_modules():
        if not isinstance(q, TensorQuantizer) or not q.is_enabled:
            continue
        if getattr(q, "_dynamic", False):
            continue  # scales computed at run time: nothing to calibrate
        amax = getattr(q, "amax", None)
        if amax is None:
            bad.append(f"{name} (no amax)")
        elif not bool(torch.isfinite(amax).all()) or not bool((amax > 0).all()):
            bad.append(f"{name} (amax {amax.flatten()[:4].tolist()})")
    return bad


def share_expert_input_amax(model) -> None:
    """One input amax per projection across the experts of a layer (their max), as the engines
    use one per layer: ModelOpt syncs them itself unless every expert was calibrated on every
    token (moe_calib_experts_ratio), which is what build_config asks for. Per-expert Linears
    (transformers 4.57) only; transformers 5's fused experts share one input quantizer already."""
    from modelopt.torch.quantization.utils.core_utils import sync_moe_expert_amax

    for module in model.modules():
        experts = getattr(module, "experts", None)
        if getattr(module, "_moe_calib_experts_ratio", None) is not None and isinstance(experts, nn.ModuleList):
            sync_moe_expert_amax(experts)


def check_calibrated(model) -> None:
    """After ModelOpt's calibration: the experts' input amax shared per layer, then every enabled
    quantizer must hold a measured amax."""
    share_expert_input_amax(model)
    bad = uncalibrated_quantizers(model)
    if bad:
        raise PayloadError(f"{len(bad)} quantizer(s) were not calibrated, first {bad[0]}: no calibration "
                           "token reached them; give more or longer calibration windows "
                           "(--calib-samples, --calib-seq-len)", kind="input")
