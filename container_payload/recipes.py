"""Quantization recipes: a name -> a ModelOpt config (plus, for our own methods, a
step that runs after ModelOpt's calibration on ModelOpt's own quantizers).

Every recipe ends in ModelOpt's quantizer state, so the export path is always
`export_hf_checkpoint` and the checkpoint stays the standard format.
"""
import copy
from dataclasses import dataclass
from typing import Callable

import modelopt.torch.quantization as mtq

from .events import PayloadError

# recipe name -> ModelOpt preset for NVFP4 W4A4
_NVFP4_PRESETS = {
    "default": "NVFP4_DEFAULT_CFG",
    "awq-lite": "NVFP4_AWQ_LITE_CFG",
    "awq-clip": "NVFP4_AWQ_CLIP_CFG",
    "mse": "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG",
    "four-over-six": "NVFP4_FOUR_OVER_SIX_CFG",
}
# ModelOpt 0.47 runs these searches with CUDA or Triton kernels only ("amax must be a CUDA tensor
# for dynamic block quantization", "static_blockwise_fp4_fake_quant requires triton"), so on a
# CPU they fail mid-calibration; refuse them before the model loads.
_GPU_ONLY = {"awq-lite", "awq-clip", "mse", "four-over-six"}
_FORMAT_PRESETS = {
    "nvfp4-w4a16": "W4A16_NVFP4_CFG",
    "fp8": "FP8_DEFAULT_CFG",
}


@dataclass
class Recipe:
    name: str
    preset: str
    config: dict
    # Runs after mtq.quantize's calibration, on the calibrated model (our own methods).
    refine: Callable | None = None
    # Runs before mtq.quantize, on the bf16 model: (model, forward_loop) -> None (smoothing).
    prepare: Callable | None = None


def _preset(name: str) -> dict:
    cfg = getattr(mtq, name, None)
    if cfg is None:
        raise PayloadError(f"this ModelOpt ({_modelopt_version()}) has no {name}; "
                           "use an image with nvidia-modelopt 0.47 or newer", kind="input")
    return copy.deepcopy(cfg)


def _modelopt_version() -> str:
    import modelopt
    return getattr(modelopt, "__version__", "?")


def _custom_recipes() -> dict:
    # Our own algorithms on top of ModelOpt's quantizers (container_payload/algorithms).
    try:
        from .algorithms import CUSTOM_RECIPES
    except ImportError:
        return {}
    return CUSTOM_RECIPES


def build(fmt: str, recipe: str, kv_cache: str, device: str = "cuda") -> Recipe:
    refine = prepare = None
    if device != "cuda" and fmt == "nvfp4" and recipe in _GPU_ONLY:
        cpu_ok = sorted((set(_NVFP4_PRESETS) | set(_custom_recipes())) - _GPU_ONLY)
        raise PayloadError(f"recipe {recipe!r} needs a GPU (ModelOpt runs its search with CUDA/Triton "
                           f"kernels only); on a CPU use one of: {', '.join(cpu_ok)}", kind="input")
    if fmt in _FORMAT_PRESETS:
        if recipe != "default":
            raise PayloadError(f"recipe {recipe!r} applies to nvfp4 (W4A4) only", kind="input")
        preset = _FORMAT_PRESETS[fmt]
    elif fmt == "nvfp4":
        custom = _custom_recipes()
        if recipe in _NVFP4_PRESETS:
            preset = _NVFP4_PRESETS[recipe]
        elif recipe in custom:
            preset, refine, *rest = custom[recipe]
            prepare = rest[0] if rest else None
        else:
            known = sorted(set(_NVFP4_PRESETS) | set(custom))
            raise PayloadError(f"unknown recipe {recipe!r}; known: {', '.join(known)}", kind="input")
    else:
        raise PayloadError(f"unknown format {fmt!r}", kind="input")
    cfg = _preset(preset)
    if kv_cache == "fp8":
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    return Recipe(name=recipe, preset=preset, config=cfg, refine=refine, prepare=prepare)
