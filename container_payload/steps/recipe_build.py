"""A recipe name (recipes.py) -> its steps, with ModelOpt's configuration for the Calibrate step.

Every recipe ends in ModelOpt's quantizer state, so the export path is always
`export_hf_checkpoint` and the checkpoint stays the standard format. steps.py runs the steps.

Works with the ModelOpt of NVIDIA's 2025 images (0.37: presets whose `quant_cfg` is a
dict of wildcard -> attributes) as well as newer ones (0.45+: a list of entries); what a
recipe needs beyond that is refused by recipes.shortfalls before any weights load.
"""
import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import modelopt.torch.quantization as mtq

from ..core import recipes
from ..core.events import PayloadError
from . import moe


@dataclass
class BuiltRecipe:
    name: str
    preset: str
    config: object                       # the Calibrate step's: a dict, or ModelOpt's QuantizeConfig (YAML)
    steps: tuple = ()                    # recipes' typed steps, Calibrate among them
    check: Callable | None = None        # after calibration: refuse a model ModelOpt left half calibrated


def build(fmt: str, recipe: str, kv_cache: str, device: str = "cuda", params: dict | None = None,
          steps: tuple | None = None) -> BuiltRecipe:
    """`recipe` with ModelOpt's configuration. `steps`: its typed steps as the caller resolved them
    (quantize.resolve_steps, once per run); else they are resolved here from `params`."""
    if recipes.is_modelopt_recipe(recipe):
        if params:
            raise PayloadError("recipe parameters apply to this project's recipes, not to ModelOpt's YAML "
                               "recipes (edit the YAML instead)", kind="input")
        return _modelopt_library(recipe, kv_cache)
    known = recipes.RECIPES.get(recipe)
    if known is None:
        raise PayloadError(recipes.check_name(recipe), kind="input")
    if steps is None:
        try:
            steps = recipes.with_params(recipe, params or {})
        except ValueError as e:
            raise PayloadError(str(e), kind="input") from None
    known = replace(known, steps=steps)  # the job's preset and needs (a calibrate.preset parameter decides them)
    if fmt != "nvfp4" and recipe != "default":
        raise PayloadError(f"recipe {recipe!r} applies to nvfp4 (W4A4) only", kind="input")
    if known.needs.gpu and device != "cuda":
        cpu_ok = [n for n, r in recipes.RECIPES.items() if not r.needs.gpu]
        raise PayloadError(f"recipe {recipe!r}{' with preset ' + known.preset if params else ''} needs a GPU "
                           f"({known.needs.why[0]}); on a CPU use one "
                           f"of: {', '.join(cpu_ok)}", kind="input")
    if known.origin == "moe":
        cfg = moe.build_config(known.preset, mtq)
        if kv_cache == "fp8":
            cfg["quant_cfg"] = with_entries(cfg["quant_cfg"], mtq.FP8_KV_CFG["quant_cfg"])
        return BuiltRecipe(name=recipe, preset=known.preset, config=cfg, steps=steps, check=moe.check_calibrated)
    preset = recipes.FORMAT_PRESETS.get(fmt, known.preset)
    cfg = _preset(preset)
    if kv_cache == "fp8":
        cfg["quant_cfg"] = with_entries(cfg["quant_cfg"], mtq.FP8_KV_CFG["quant_cfg"])
    steps = tuple(recipes.Calibrate(preset) if isinstance(s, recipes.Calibrate) else s for s in steps)
    return BuiltRecipe(name=recipe, preset=preset, config=cfg, steps=steps)


def with_entries(quant_cfg, extra):
    """`quant_cfg` plus `extra`, later entries winning, in the form this ModelOpt uses:
    a dict (0.37-era presets) or a list of entries (0.45+)."""
    if isinstance(quant_cfg, dict):
        return {**quant_cfg, **copy.deepcopy(dict(extra))}
    return list(quant_cfg) + copy.deepcopy(list(extra))


def _preset(name: str) -> dict:
    cfg = getattr(mtq, name, None)
    if cfg is None:
        import modelopt
        raise PayloadError(f"this ModelOpt ({modelopt.__version__}) has no {name}; use an image "
                           "with a newer nvidia-modelopt (the launcher derives one)", kind="input")
    return copy.deepcopy(cfg)


def _modelopt_library(recipe: str, kv_cache: str) -> BuiltRecipe:
    """One of ModelOpt's YAML recipes: a library name (general/ptq/...) or a file the
    launcher mounted. Its KV-cache choice is part of the recipe itself."""
    try:
        from modelopt.recipe import load_recipe
    except ImportError:
        raise PayloadError("this ModelOpt has no YAML recipe library (modelopt.recipe, 0.45+)",
                           kind="input") from None
    if kv_cache != "none":
        raise PayloadError("a ModelOpt YAML recipe sets its own KV cache: leave --kv-cache at none",
                           kind="input")
    try:
        loaded = load_recipe(Path(recipe) if recipe.startswith("/") else recipe)
    except (ValueError, OSError) as e:
        raise PayloadError(f"ModelOpt cannot load recipe {recipe!r}: {str(e).splitlines()[0]}",
                           kind="input") from None
    quantize = getattr(loaded, "quantize", None)
    if quantize is None:
        raise PayloadError(f"{recipe!r} is not a post-training quantization (ptq) recipe", kind="input")
    return BuiltRecipe(name=recipe, preset="modelopt-recipe", config=quantize,
                       steps=(recipes.Calibrate("modelopt-recipe"),))
