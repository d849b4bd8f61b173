"""Exact emulation of an NVFP4 (or FP8) checkpoint in plain PyTorch, for evaluation.

The checkpoint is loaded into the stock transformers model, with every quantized
Linear replaced by `EmulatedLinear`: its weight dequantized once (docs/nvfp4-format.md §1, §5,
§6) and, for W4A4, its input fake-quantized per 16-block with the static input_scale
(§3). All of it in float32, so the result is what the engines compute on Blackwell up
to float32 summation order, and it runs on any CPU or GPU.

Both formats hold the same bytes (§6): ModelOpt's unified HF checkpoint and
llm-compressor's compressed-tensors, which stores the two global scales as
reciprocals. Which one a folder is comes from config.json's quantization_config.
Not emulated: an FP8 KV cache (k_scale / v_scale); those scales are reported as ignored.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.events import PayloadError

BLOCK = 16
FP8_MAX = 448.0
E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ---------------------------------------------------------------- number formats

def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """E2M1 round-to-nearest, ties to the even mantissa, saturating at 6 (§2 step 4):
    |y| <= 0.25 -> 0; < 0.75 -> 0.5; <= 1.25 -> 1; < 1.75 -> 1.5; <= 2.5 -> 2; < 3.5 -> 3;
    <= 5 -> 4; else 6. Computed as RNE on the grid of y's binade (one mantissa bit: step
    0.5 below 2, 1 in [2, 4), 2 above), which is that ladder in fewer tensor passes."""
    if y.dtype == torch.float32:
        return _e2m1_round_f32(y)
    a = y.abs().clamp_max(6.0)
    _, e = torch.frexp(a)                                   # a = m * 2**e, m in [0.5, 1)
    step = torch.exp2(((e - 1).clamp_min(0) - 1).to(a.dtype))
    q = (torch.round(a / step) * step).clamp_max(6.0)       # torch.round: half to even
    return torch.where(y < 0, -q, q)


def _e2m1_round_f32(y: torch.Tensor) -> torch.Tensor:
    """e2m1_round of a float32 tensor, bit for bit, in about a third of its time (the emulated
    inputs of the sequential GPTQ and of evaluation are most of the CPU path's elementwise work):
    adding and subtracting 2**22, 2**23 or 2**24, whose float32 spacing is the binade's step
    (0.5, 1, 2), rounds to that step half to even. The constant comes from |y|'s exponent bits."""
    a = y.abs().clamp_(max=6.0)
    m = (a.view(torch.int32) >> 23).clamp_(127, 129).add_(22).bitwise_left_shift_(23).view(torch.float32)
    q = a.add_(m).sub_(m)
    return torch.where(y < 0, q.neg(), q)


def fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to FP8 E4M3 (RNE) and back to float32. Clamped first: torch's cast turns
    values past the top of the range into NaN, the engines saturate at 448."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> float32 [..., n]; element 2j is the LOW nibble (§2 step 5)."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).long()
    mag = torch.tensor(E2M1_LEVELS, dtype=torch.float32, device=packed.device)[codes & 7]
    return torch.where((codes & 8) != 0, -mag, mag)  # code 8 is -0 and decodes to 0


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor,
                     global_scale: torch.Tensor) -> torch.Tensor:
    """e2m1(code) * float(fp8 block scale) * global scale, as float32 [out, in]."""
    values = unpack_e2m1(packed)
    out, n = values.shape
    blocks = values.view(out, n // BLOCK, BLOCK) * block_scale.float().unsqueeze(-1)
    return (blocks * global_scale.float().reshape(())).view(out, n)


def fake_quant_nvfp4(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """W4A4 activation quantization (§3): dynamic fp8 scale per 16-block under the
    static per-tensor input_scale; values past the calibrated range clip at 6."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    step = fp8_e4m3((amax / 6.0) / input_scale) * input_scale
    # A block whose scale rounds to 0 quantizes to 0 (the engines multiply by a
    # reciprocal that they define as 0 there); never divide by it: x / inf is a zero that
    # rounds to +0, as a where() on the whole tensor would give, for 1/16 of its cost.
    safe = torch.where(step > 0, step, torch.full_like(step, float("inf")))
    return (e2m1_round(xb / safe) * step).reshape(shape)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return fp8_e4m3(x.float() / scale) * scale


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    # compressed-tensors FP8_DYNAMIC: one scale per token, amax / 448.
    scale = x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return fp8_e4m3(x.float() / safe) * scale


# ---------------------------------------------------------------- the module

class EmulatedLinear(nn.Module):
    """A quantized Linear as the engines compute it, in float32.

    act: None (weight-only), "nvfp4" (static input_scale), "fp8" (static per-tensor),
    "fp8-dynamic" (per token)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kind: str,
                 act: str | None, input_scale: torch.Tensor | None,
                 pre_quant_scale: torch.Tensor | None = None):
        super().__init__()
        self.kind, self.act = kind, act
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        scale = torch.tensor(1.0) if input_scale is None else input_scale.float().reshape(())
        self.register_buffer("input_scale", scale)
        # NVFP4_AWQ: ModelOpt exports AWQ's per-channel activation scale as `pre_quant_scale`
        # wherever it could not fold it into the norm or the Linear before; the engines multiply
        # the input by it before the input quantizer (ModelOpt's TensorQuantizer does the same).
        self.pre_quant_scale = None if pre_quant_scale is None else \
            nn.Parameter(pre_quant_scale.float().reshape(-1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.pre_quant_scale is not None:
            x = x.float() * self.pre_quant_scale
        if self.act == "nvfp4":
            xq = fake_quant_nvfp4(x, self.input_scale)
        elif self.act == "fp8":
            xq = fake_quant_fp8(x, self.input_scale)
        elif self.act == "fp8-dynamic":
            xq = fake_quant_fp8_per_token(x)
        else:
            xq = x.float()
        return nn.functional.linear(xq, self.weight, self.bias).to(dtype)

    def extra_repr(self) -> str:
        pqs = ", pre_quant_scale" if self.pre_quant_scale is not None else ""
        return f"{self.in_features}, {self.out_features}, kind={self.kind}, act={self.act}{pqs}"


# ---------------------------------------------------------------- checkpoint formats

@dataclass
class Format:
    naming: str                   # "modelopt" | "compressed-tensors"
    algo: str                     # e.g. "NVFP4", "W4A16_NVFP4", "FP8", "nvfp4-pack-quantized"
    act_quant: bool               # W4A4 / W8A8: activations are quantized too
    act_dynamic: bool = False     # per-token dynamic activation scales (FP8_DYNAMIC)
    notes: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)  # MIXED_PRECISION: module (or experts parent) -> quant_algo

    def act_quant_of(self, module: str) -> bool:
        """Whether `module`'s input is quantized: the format's, or its quantized_layers entry's."""
        if not self.layers:
            return self.act_quant
        name = module
        while name and name not in self.layers:
            name = name.rpartition(".")[0]
        return self.layers.get(name) in ("NVFP4", "NVFP4_AWQ", "FP8")


def quantization_config(model_dir: Path) -> dict | None:
    """config.json's quantization_config, else an older export's hf_quant_config.json."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if qc:
        return qc
    hf = model_dir / "hf_quant_config.json"
    if hf.exists():
        q = json.loads(hf.read_text()).get("quantization", {})
        return {"quant_method": "modelopt", "quant_algo": q.get("quant_algo"),
                "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
                "quantized_layers": q.get("quantized_layers")}
    return None


def detect_format(qc: dict) -> Format:
    method = qc.get("quant_method")
    groups = list((qc.get("config_groups") or {}).values())
    if method == "modelopt" and qc.get("quant_algo") == "MIXED_PRECISION":
        fmt = mixed_format(qc)
    elif method == "modelopt":
        algo = str(qc.get("quant_algo") or "")
        if algo not in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4", "FP8"):
            raise PayloadError(f"ModelOpt quant_algo {algo!r} is not emulated "
                               "(NVFP4, NVFP4_AWQ, W4A16_NVFP4 and FP8 are)", kind="input")
        act = algo in ("NVFP4", "NVFP4_AWQ", "FP8")
        if groups:  # the config groups say it exactly when present
            act = any(g.get("input_activations") for g in groups)
        fmt = Format("modelopt", algo, act)
    elif method == "compressed-tensors":
        algo = str(qc.get("format") or "")
        if algo not in ("nvfp4-pack-quantized", "float-quantized", "naive-quantized"):
            raise PayloadError(f"compressed-tensors format {algo!r} is not emulated", kind="input")
        acts = [g.get("input_activations") for g in groups if g.get("input_activations")]
        # NVFP4 uses dynamic: "local" (per-block scales under a static global one);
        # only dynamic: true means per-token scales with nothing stored.
        fmt = Format("compressed-tensors", algo, bool(acts),
                     act_dynamic=any(a.get("dynamic") is True for a in acts))
        if qc.get("quantization_status") not in (None, "compressed", "frozen"):
            fmt.notes.append(f"quantization_status {qc.get('quantization_status')!r}")
    else:
        raise PayloadError(f"quantization method {method!r} is not emulated "
                           "(modelopt and compressed-tensors are)", kind="input")
    if qc.get("kv_cache_scheme") or qc.get("kv_cache_quant_algo"):
        fmt.notes.append("FP8/NVFP4 KV cache is not emulated (k/v scales ignored)")
    return fmt


def read_tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise PayloadError(f"no *.safetensors in {model_dir}", kind="input")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f), device="cpu"))
    return tensors


def _module_tensors(fmt: Format, t: dict, prefix: str) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """(kind, float32 weight, input_scale) of one quantized Linear, consuming its tensors."""
    if fmt.naming == "compressed-tensors" and prefix + ".weight_packed" in t:
        packed, bscale = t.pop(prefix + ".weight_packed"), t.pop(prefix + ".weight_scale")
        w = dequantize_nvfp4(packed, bscale, 1.0 / t.pop(prefix + ".weight_global_scale").float())
        igs = t.pop(prefix + ".input_global_scale", None)
        t.pop(prefix + ".weight_shape", None)
        return "nvfp4", w, None if igs is None else 1.0 / igs.float()
    weight = t.pop(prefix + ".weight")
    scale = t.pop(prefix + ".weight_scale")
    input_scale = t.pop(prefix + ".input_scale", None)
    if weight.dtype == torch.uint8:  # ModelOpt NVFP4
        return "nvfp4", dequantize_nvfp4(weight, scale, t.pop(prefix + ".weight_scale_2")), input_scale
    if weight.dtype == torch.float8_e4m3fn:  # FP8: per-tensor [] / per-channel [out, 1] scale
        s = scale.float()
        return "fp8", weight.float() * (s if s.dim() == 2 else s.reshape(())), input_scale
    raise PayloadError(f"{prefix}: weight dtype {weight.dtype} with a weight_scale is not "
                       "a format this emulation knows", kind="input")


def activation(fmt: Format, prefix: str, kind: str, input_scale) -> str | None:
    """How one quantized Linear's input is quantized (EmulatedLinear's act)."""
    if not fmt.act_quant_of(prefix):
        return None
    if kind == "fp8" and fmt.act_dynamic:
        return "fp8-dynamic"
    if input_scale is None:
        raise PayloadError(f"{prefix}: the checkpoint quantizes activations but has no "
                           "input scale for this layer", kind="input")
    return kind


# the formats a MIXED_PRECISION checkpoint's layers may have
ALGOS = ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4", "FP8")


def mixed_format(qc: dict):
    """Format of a ModelOpt MIXED_PRECISION checkpoint: per-layer formats from quantized_layers."""
    layers = qc.get("quantized_layers") or {}
    if not isinstance(layers, dict) or not layers:
        raise PayloadError("MIXED_PRECISION checkpoint without quantized_layers: run `launcher verify` "
                           "on it", kind="input")
    algos = {name: (cfg or {}).get("quant_algo") for name, cfg in layers.items()}
    bad = sorted({a for a in algos.values() if a not in ALGOS}, key=str)
    if bad:
        raise PayloadError(f"MIXED_PRECISION layer format {bad[0]!r} is not emulated "
                           f"({', '.join(ALGOS)} are)", kind="input")
    return Format("modelopt", "MIXED_PRECISION", any(a != "W4A16_NVFP4" for a in algos.values()),
                  layers=algos)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return module
