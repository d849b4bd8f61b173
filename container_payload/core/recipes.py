"""Every recipe, format and KV-cache option the payload offers, and what each needs.

Standard library only: the launcher imports this module to list and validate recipes and
to decide, from an image's probe (probe.py), whether that image can run a job as it is;
the payload checks the same thing before it loads any weights. recipe_build.py turns a
name into ModelOpt's configuration inside the container.

The minimum versions are what was measured, not what a changelog promises:
- ModelOpt 0.37 (NVIDIA's late-2025 images) has the NVFP4 presets, but its NVFP4 export
  calls torch.cuda.get_device_capability, so without CUDA it cannot export at all.
- Our own recipes store their block scales in StaticBlockScaleQuantizer (ModelOpt 0.46).
- Weight-only NVFP4 (W4A16_NVFP4_CFG) and the YAML recipe library came with 0.45.
- The payload runs on transformers 4.57 (the late-2025 images) and 5.x; older is untested.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace


def version_tuple(v: str) -> tuple[int, ...]:
    """The leading release numbers of a version: '2.9.0a0+nv25.10' -> (2, 9, 0)."""
    m = re.match(r"\d+(\.\d+)*", v.strip())
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def _newest(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return a if version_tuple(a) >= version_tuple(b) else b


def dist_key(name: str) -> str:
    """A distribution name as pip compares them: 'TensorRT_LLM' == 'tensorrt-llm'."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Needs:
    """Minimum versions of the image's packages (None: any), and whether CUDA is required."""
    modelopt: str | None = "0.37"
    modelopt_cpu: str | None = "0.47"      # ModelOpt on a CPU-only torch (0.37 cannot export there)
    transformers: str | None = "4.57"
    gpu: bool = False                      # ModelOpt runs its search with CUDA/Triton kernels only
    packages: tuple[str, ...] = ("accelerate",)  # distributions that must be installed (any version)
    why: tuple[str, ...] = field(default=(), compare=False)   # where each floor comes from

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(modelopt=_newest(self.modelopt, other.modelopt),
                     modelopt_cpu=_newest(self.modelopt_cpu, other.modelopt_cpu),
                     transformers=_newest(self.transformers, other.transformers),
                     gpu=self.gpu or other.gpu,
                     packages=tuple(dict.fromkeys(self.packages + other.packages)),
                     why=tuple(dict.fromkeys(self.why + other.why)))


# ---------------------------------------------------------------- steps
# A recipe is a composition of typed steps, run in order on the bf16 model (like llm-compressor's
# modifiers). Exactly one is Calibrate: ModelOpt's calibration with a preset; the steps before it
# change the bf16 model, the steps after it change ModelOpt's quantizer state, so every recipe
# ends in a checkpoint that export_hf_checkpoint writes in the standard format. Parameters are
# job fields (`--recipe-param gptq.ridge=3`), never environment variables.

@dataclass(frozen=True)
class Range:
    """The values a numeric step parameter accepts (each step declares its own in `ranges`, beside
    `choices`; the launcher refuses the rest before anything runs, the payload again)."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False      # `low` itself is refused (ridge > 0)

    def __contains__(self, v) -> bool:
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        return above and (self.high is None or v <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


_STATIC_BLOCK = Needs(modelopt="0.46", why=("StaticBlockScaleQuantizer (ModelOpt 0.46)",))


@dataclass(frozen=True)
class Plan:
    """What a step needs from a pipeline and what memory it adds; memory_plan's refusals and
    peaks and the pipelines read these, never the step's type (a new step declares its own)."""
    whole_only: str | None = None   # why it needs the whole model in memory; None: it runs layer by layer
    hidden_streams: int = 0         # copies of the calibration hidden states it keeps beside the model's
    unit_inputs: bool = False       # it holds one layer's unit inputs and the widest unit's H, G (GPTQ)
    ours: bool = True               # our own weight pass: the whole path keeps the original weights too
    layer_inputs: bool = False      # it wants the first layer's captured inputs (a sequential pass)
    ranking_batches: int = 0        # calibration batches to keep for a ranking pass over all layers
    on: str = "quantized"           # what it works on: "bf16" (before calibration), "calibrate", "quantized"
_GPU_SEARCH = Needs(gpu=True, why=("ModelOpt runs this search with CUDA/Triton kernels only",))


@dataclass(frozen=True)
class Smooth:
    """Per-channel smoothing folded into the norms and up_proj before calibration (smoothing.py).
    0.65 measured best alone; before activation-aware GPTQ, which moves part of the activation
    error into the weights anyway, a milder 0.5 did (benchmarks/results/recipes.md)."""
    alpha: float = 0.65
    key = "smooth"
    needs = Needs()
    ranges = {"alpha": Range(0, 1)}    # SmoothQuant's migration strength: 0 none, 1 all of it

    def plan(self) -> Plan:  # statistics from a stream of the unsmoothed model's hidden states
        return Plan(hidden_streams=1, on="bf16")


@dataclass(frozen=True)
class Calibrate:
    """ModelOpt's calibration (mtq.quantize) with one of its presets (max calibration unless the
    preset searches), or one of MOE_LAYOUTS (moe.py: formats by kind of layer)."""
    preset: str = "NVFP4_DEFAULT_CFG"
    key = "calibrate"

    @property
    def needs(self) -> Needs:
        return PRESET_NEEDS.get(self.preset, Needs())

    @property
    def choices(self) -> dict:
        return {"preset": PRESETS}     # (a property: the registry is built from RECIPES below)

    def plan(self) -> Plan:  # max calibration's amax are per layer; searches run the whole model
        return Plan(ours=False, on="calibrate", whole_only=None if self.preset in LAYERWISE_PRESETS
                    else f"calibrate({self.preset}) runs over the whole model")


@dataclass(frozen=True)
class ScaleSearch:
    """Per 16-block FP8 scale search on round-to-nearest weights, never worse than max scaling."""
    key = "scale_search"
    needs = _STATIC_BLOCK

    def plan(self) -> Plan:
        return Plan(whole_only=f"{self.key} was not moved to the streamed path")


@dataclass(frozen=True)
class Gptq:
    """GPTQ error compensation on the NVFP4 grid (gptq.py, fast_gptq.py; algorithms.py runs it in one pass).
    act_aware: fitted to the engine's NVFP4-rounded inputs (absorbs the W4A4 input rounding).
    sequential: layer by layer on the inputs the quantized layers before produce (sequential.py).
    ridge: the activation correction's pull towards the original weights, relative to mean
    diag(H); None: GPTQ's damping (0.01), or 1.0 when sequential (sequential.py says why).
    kernel: auto (Triton on CUDA, else batched torch) | triton | torch | reference (the column
    loop the others are tested against). hessian_tf32: H and G in TF32 on CUDA (sequential).
    scales: how each 16-block's FP8 scale is chosen: search (the block's rounding error, each
    column weighted by GPTQ's 1/U_jj^2) | hessian (each candidate scored by the block's own GPTQ
    pass, error feedback inside the block included: its cost under the layer's input Hessian,
    fast_gptq.hessian_block_scales)."""
    act_aware: bool = False
    sequential: bool = False
    ridge: float | None = None
    kernel: str = "auto"
    hessian_tf32: bool = True
    scales: str = "search"
    key = "gptq"
    needs = _STATIC_BLOCK
    choices = {"kernel": ("auto", "triton", "torch", "reference"), "scales": ("search", "hessian")}
    ranges = {"ridge": Range(0, low_open=True)}   # 0 would leave the correction unregularized

    def plan(self) -> Plan:  # sequential: two streams (original, quantized), layer by layer
        if self.sequential:
            return Plan(hidden_streams=2, unit_inputs=True, layer_inputs=True)
        return Plan(unit_inputs=True, whole_only="the one-pass gptq takes its Hessians from whole-model passes")


@dataclass(frozen=True)
class KeepBf16:
    """The fused units whose quantization costs the most KL per byte stay bf16, within `budget`
    (a fraction of the default checkpoint's size), ranked on `batches` calibration batches.
    Before a sequential Gptq it ranks round-to-nearest weights (after a sequential pass every
    later layer has compensated the earlier ones, so the choice has to come first).
    fp8: a unit may be kept FP8 (W8A8 per-tensor, half bf16's extra bytes) instead, whichever
    saves more KL per byte (bf16_ranking.decide); only before the Gptq (its units then stay
    out of the GPTQ). The budget counts each format's bytes."""
    budget: float = 0.09
    batches: int = 1
    fp8: bool = False
    key = "keep_bf16"
    needs = Needs()
    ranges = {"budget": Range(0, 1), "batches": Range(1)}   # a fraction of the size; at least one batch

    def plan(self) -> Plan:  # streamed: a ranking pass over the layers first (streamed_steps.py)
        return Plan(ranking_batches=self.batches)


STEPS = {cls.key: cls for cls in (Smooth, Calibrate, ScaleSearch, Gptq, KeepBf16)}
# ModelOpt presets whose calibration runs layer by layer (max calibration: amax per layer, on the
# unquantized inputs); the others search over the whole model.
LAYERWISE_PRESETS = ("NVFP4_DEFAULT_CFG",)

# ModelOpt presets that need more than the floor.
PRESET_NEEDS = {
    "NVFP4_AWQ_LITE_CFG": _GPU_SEARCH, "NVFP4_AWQ_CLIP_CFG": _GPU_SEARCH,
    "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG": _GPU_SEARCH | Needs(modelopt="0.46"),
    "NVFP4_FOUR_OVER_SIX_CFG": _GPU_SEARCH | Needs(modelopt="0.46"),
}


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    steps: tuple

    @property
    def origin(self) -> str:
        """"modelopt": one of ModelOpt's presets as it is; "moe": a per-layer-kind layout of ModelOpt's
        formats (moe.py); "ours": ModelOpt plus our own steps."""
        if not all(isinstance(s, Calibrate) for s in self.steps):
            return "ours"
        return "moe" if self.preset in MOE_LAYOUTS else "modelopt"

    @property
    def preset(self) -> str:
        return next(s.preset for s in self.steps if isinstance(s, Calibrate))

    @property
    def needs(self) -> Needs:
        out = Needs()
        for step in self.steps:
            out = out | step.needs
        return out


def _modelopt(name: str, preset: str, summary: str) -> Recipe:
    return Recipe(name, summary, (Calibrate(preset),))


_AA = Gptq(act_aware=True)
_SEQ = Gptq(act_aware=True, sequential=True)
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    _modelopt("default", "NVFP4_DEFAULT_CFG",
              "ModelOpt's default: max calibration, round-to-nearest (what NVIDIA's script does)"),
    _modelopt("awq-lite", "NVFP4_AWQ_LITE_CFG", "ModelOpt AWQ (lite search)"),
    _modelopt("awq-clip", "NVFP4_AWQ_CLIP_CFG", "ModelOpt AWQ with clipping search"),
    _modelopt("mse", "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", "ModelOpt block-scale MSE sweep"),
    _modelopt("four-over-six", "NVFP4_FOUR_OVER_SIX_CFG", "ModelOpt adaptive 4-or-6 block scaling"),
    Recipe("scale-search", "per-block FP8 scale search, never worse than max scaling",
           (Calibrate(), ScaleSearch())),
    Recipe("gptq", "GPTQ error compensation on the NVFP4 grid", (Calibrate(), Gptq())),
    Recipe("gptq-aa", "activation-aware GPTQ (absorbs the W4A4 input rounding)", (Calibrate(), _AA)),
    Recipe("gptq-mp", "gptq + the costliest fused units kept bf16 (~9% size)", (Calibrate(), Gptq(), KeepBf16())),
    Recipe("gptq-aa-mp", "gptq-aa + bf16 units", (Calibrate(), _AA, KeepBf16())),
    Recipe("smooth", "per-channel smoothing folded into norms / up_proj, then ModelOpt's default",
           (Smooth(), Calibrate())),
    Recipe("smooth-gptq-aa", "smoothing, then gptq-aa", (Smooth(0.5), Calibrate(), _AA)),
    Recipe("smooth-gptq-aa-mp", "smoothing, then gptq-aa-mp", (Smooth(0.5), Calibrate(), _AA, KeepBf16())),
    Recipe("gptq-seq", "layer-sequential gptq-aa: each layer fitted on the inputs the quantized layers before "
           "it produce (streams)", (Calibrate(), _SEQ)),
    Recipe("smooth-gptq-seq", "smoothing, then layer-sequential gptq-aa: make quantize's recipe without bf16 "
           "units (streams)", (Smooth(0.5), Calibrate(), _SEQ)),
    # make quantize's recipe. Issue 21's size bound is 1.06x the default's bytes: at 0.09 the GPU
    # table's run came to 1.086x. FP8 units (keep_bf16.fp8) lowered KL on both held-out texts at
    # the same size (docs/decisions.md); keep_bf16.fp8=false is the way back. Hessian-scored block
    # scales (gptq.scales=hessian) stay an option (benchmarks/peers_gpu.py has their rows).
    Recipe("smooth-gptq-seq-mp",
           "smoothing, bf16 / FP8 units chosen first (6% of the size), then layer-sequential gptq-aa "
           "(make quantize's recipe)",
           (Smooth(0.5), Calibrate(), KeepBf16(budget=0.06, fp8=True), _SEQ)),
)}
# Mixture-of-Experts layouts (container_payload/steps/moe.py builds them from ModelOpt's presets): one
# format per kind of layer, exported by ModelOpt as MIXED_PRECISION (or NVFP4 with the rest
# excluded). Their Calibrate step names the layout instead of a preset. Measured on the 2025
# stand-in (ModelOpt 0.37, transformers 4.57, CPU): the configs build and every expert is
# calibrated, but each expert keeps its own down_proj input amax (the engines use one per layer)
# and 0.37 has no weight-only NVFP4 export format; its NVFP4 export needs CUDA in any case.
# ModelOpt 0.47 over that same transformers 4.57 (what the derived image holds) exports both
# recipes and they verify.
_MOE = Needs(modelopt="0.47", why=("MoE expert calibration and MIXED_PRECISION export (ModelOpt 0.47)",))
MOE_LAYOUTS = ("moe-w4a16-experts", "moe-w4a4-experts")
LAYERWISE_PRESETS += MOE_LAYOUTS  # max calibration too (moe.build_config): each layer's experts on its tokens
PRESET_NEEDS.update({layout: _MOE for layout in MOE_LAYOUTS})
RECIPES.update({r.name: r for r in (
    Recipe("moe-w4a16-experts", "MoE: experts and shared experts NVFP4 weight-only, attention FP8, FP8 KV cache "
           "(nvidia/Qwen3.6-35B-A3B-NVFP4's layout)", (Calibrate("moe-w4a16-experts"),)),
    Recipe("moe-w4a4-experts", "MoE: routed experts NVFP4 W4A4, everything else bf16",
           (Calibrate("moe-w4a4-experts"),)),
)})
NAMES = tuple(RECIPES)
# The registry of presets a Calibrate step may name (`--recipe-param calibrate.preset=...`): ModelOpt's
# W4A4 NVFP4 presets our recipes use. (An MoE layout is chosen by its recipe's name: built by moe.py,
# it is no ModelOpt preset the other recipes' steps could follow.)
PRESETS = tuple(dict.fromkeys(r.preset for r in RECIPES.values() if r.preset not in MOE_LAYOUTS))


def describe(steps) -> str:
    """steps as one line: smooth(alpha=0.5) -> calibrate(preset=NVFP4_DEFAULT_CFG) -> ..."""
    return " -> ".join(f"{s.key}({', '.join(f'{f.name}={getattr(s, f.name)}' for f in fields(s))})"
                       for s in steps)


def _coerce(value, default, name: str):
    """A parameter's value from a flag, a config file or JSON, as the type of its default;
    numbers finite (NaN and inf are no setting), integers whole."""
    v = _as_type(value, default, name)
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{name} = {value} is not a finite number")
    if type(default) is int and isinstance(v, float):
        if not v.is_integer():
            raise ValueError(f"{name} = {value} must be a whole number")
        v = int(v)
    return v


def _as_type(value, default, name: str):
    kind = type(default) if default is not None else float
    if isinstance(value, str):
        text = value.strip().lower()
        if kind is bool:
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name} must be true or false")
        if kind in (int, float):
            if text == "none" and default is None:
                return None
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"{name} must be a number") from None
        return value
    if value is None and default is None:
        return None
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{name} must be a number")
    return kind(value) if kind is float else value


def with_params(recipe: str, params: dict) -> tuple:
    """The steps of RECIPES[recipe] with `params` ("step.param" -> value) applied; ValueError
    (one line) for a step the recipe has not, a parameter the step has not, or a bad value."""
    steps = list(RECIPES[recipe].steps)
    for dotted, value in params.items():
        key, _, param = str(dotted).partition(".")
        idx = [i for i, s in enumerate(steps) if s.key == key]
        if not idx:
            have = ", ".join(s.key for s in steps)
            raise ValueError(f"recipe {recipe!r} has no step {key!r} (its steps: {have})")
        step = steps[idx[0]]
        names = {f.name: f for f in fields(step)}
        if param not in names:
            raise ValueError(f"step {key!r} has no parameter {param!r} "
                             f"(its parameters: {', '.join(names) or 'none'})")
        v = _coerce(value, getattr(step, param), dotted)
        allowed = getattr(step, "choices", {}).get(param)
        if allowed and v not in allowed:
            raise ValueError(f"{dotted} = {v!r:.60} must be one of {', '.join(allowed)}")
        bounds = getattr(step, "ranges", {}).get(param)
        if bounds is not None and v is not None and v not in bounds:
            raise ValueError(f"{dotted} = {v:g} is outside its range {bounds}")
        for i in idx:
            steps[i] = replace(steps[i], **{param: v})
    if any(isinstance(s, KeepBf16) and s.fp8 and any(isinstance(p, (Gptq, ScaleSearch)) for p in steps[:i])
           for i, s in enumerate(steps)):
        raise ValueError("keep_bf16.fp8 needs keep_bf16 before the weight steps (smooth-gptq-seq-mp's order): "
                         "after them its units were already rounded to NVFP4")
    if any(isinstance(s, Gptq) and s.sequential and not s.act_aware for s in steps):
        raise ValueError("gptq.sequential needs gptq.act_aware: the sequential pass fits each layer to "
                         "the quantized inputs it will see")
    return tuple(steps)


def effective(recipe: str, params: dict | None = None) -> Recipe:
    """RECIPES[recipe] as a job runs it: its steps with `params` applied (so its preset, origin
    and needs are those of the job, not of the recipe's defaults)."""
    known = RECIPES[recipe]
    return replace(known, steps=with_params(recipe, params or {})) if params else known


# Formats other than W4A4 use one ModelOpt preset and only the default recipe.
FORMAT_PRESETS = {"nvfp4-w4a16": "W4A16_NVFP4_CFG", "fp8": "FP8_DEFAULT_CFG"}
FORMAT_NEEDS = {
    "nvfp4": Needs(),
    "nvfp4-w4a16": Needs(modelopt="0.45", why=("W4A16_NVFP4_CFG (ModelOpt 0.45)",)),
    "fp8": Needs(),
}
KV_CACHE_NEEDS = {"none": Needs(), "fp8": Needs()}

# ModelOpt's own YAML recipe library (modelopt_recipes, e.g. general/ptq/nvfp4_default-kv_fp8_cast),
# or a YAML file of the user's: passed to modelopt.recipe.load_recipe in the container.
MODELOPT_RECIPE_NEEDS = Needs(modelopt="0.45", packages=("omegaconf",),
                              why=("ModelOpt's YAML recipe library (ModelOpt 0.45)",))
_LIBRARY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)+")  # no '..' parts
YAML_SUFFIXES = (".yaml", ".yml")

# The embedded demo model is a GGUF that transformers converts with the `gguf` package.
EMBEDDED_NEEDS = Needs(packages=("gguf",), why=("the embedded model's GGUF conversion (gguf)",))


def is_modelopt_recipe(name: str) -> bool:
    """A ModelOpt library recipe (general/ptq/...) or a YAML recipe file."""
    return name.endswith(YAML_SUFFIXES) or bool(_LIBRARY_NAME.fullmatch(name))


def check_name(name: str) -> str | None:
    """None when `name` is a recipe the payload can be asked for, else why not (one line)."""
    if name in RECIPES or is_modelopt_recipe(name):
        return None
    return (f"unknown recipe {name!r}; choose one of {', '.join(NAMES)}, a ModelOpt library recipe "
            "such as general/ptq/nvfp4_default-kv_fp8_cast, or a .yaml recipe file")


def needs_for(recipe: str, fmt: str = "nvfp4", kv_cache: str = "none", *, embedded: bool = False,
              params: dict | None = None, steps: tuple | None = None) -> Needs:
    """Everything a job needs from its image: the recipe's (with its `params`: a preset may need
    more; `steps`: those already resolved), the format's and the KV cache's."""
    if is_modelopt_recipe(recipe):
        base = MODELOPT_RECIPE_NEEDS
    elif steps is not None:
        base = replace(RECIPES[recipe], steps=steps).needs
    else:
        base = effective(recipe, params).needs
    needs = base | FORMAT_NEEDS[fmt] | KV_CACHE_NEEDS[kv_cache]
    return needs | EMBEDDED_NEEDS if embedded else needs


@dataclass(frozen=True)
class Shortfall:
    dist: str                 # the distribution to install or upgrade
    have: str | None          # the image's version (None: not installed)
    need: str | None          # the minimum (None: any version)
    why: str                  # one phrase for the user

    def __str__(self) -> str:
        return self.why


def shortfalls(needs: Needs, installed: dict[str, str], *, cuda: bool) -> list[Shortfall]:
    """The packages `installed` (distribution name -> version, as probe.py reports it) lacks
    for `needs`; empty when the image can run the job as it is. (A GPU-only recipe on a
    machine without one is not a shortfall of the image: no package fixes it.)"""
    have = {dist_key(k): v for k, v in installed.items()}
    out = []
    modelopt_floor = needs.modelopt if cuda else _newest(needs.modelopt, needs.modelopt_cpu)
    for dist, floor in (("nvidia-modelopt", modelopt_floor), ("transformers", needs.transformers)):
        if floor is None:
            continue
        got = have.get(dist_key(dist))
        if got is None:
            out.append(Shortfall(dist, None, floor, f"{dist} is missing (need >= {floor})"))
        elif version_tuple(got) < version_tuple(floor):
            cpu = " to export without CUDA" if dist == "nvidia-modelopt" and not cuda and \
                version_tuple(floor) > version_tuple(needs.modelopt or "0") else ""
            out.append(Shortfall(dist, got, floor, f"{dist} {got} < {floor}{cpu}"))
    out += [Shortfall(p, None, None, f"{p} is missing") for p in needs.packages if dist_key(p) not in have]
    return out


def _everything() -> Needs:
    out = EMBEDDED_NEEDS | MODELOPT_RECIPE_NEEDS
    for part in (*(r.needs for r in RECIPES.values()), *FORMAT_NEEDS.values(), *KV_CACHE_NEEDS.values()):
        out = out | part
    return out


# What every recipe, format and option together need: a derived image (launcher/containers/derived_image.py)
# installs all of it at once, so one image per base serves every later job.
EVERYTHING = _everything()
