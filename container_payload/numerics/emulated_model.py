"""A quantized checkpoint loaded as the engines compute it (emulate.py's layers, emulate_moe.py's
experts), or its bf16 reference: what evaluate.py scores and serve.py answers with."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .emulate import (EmulatedLinear, PayloadError, _module_tensors, _set_module, activation, detect_format,
                      quantization_config, read_tensors)
from .emulate_moe import rename_to_model, replace_fused_experts


def _empty_model(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        # Our modules replace transformers' own quantizers; it must not load them.
        del config.quantization_config
    try:
        from accelerate import init_empty_weights
    except ImportError:  # without accelerate: a random init first, slower but correct
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    # Parameters on the meta device, buffers (rotary frequencies) real.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)


def load_emulated(model_dir, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False):
    """Quantized checkpoint -> (model with EmulatedLinear modules, info dict). trust_remote_code:
    the checkpoint's own code (auto_map) may be imported (the launcher decided: --trust-remote-code)."""
    model_dir = Path(model_dir)
    qc = quantization_config(model_dir)
    if qc is None:
        raise PayloadError(f"{model_dir} has no quantization_config; load it with load_reference",
                           kind="input")
    fmt = detect_format(qc)
    tensors = read_tensors(model_dir)
    model = _empty_model(model_dir, trust_remote_code)


    tensors = rename_to_model(model, tensors, fmt)
    quantized = sorted({k.rsplit(".", 1)[0] for k in tensors
                        if k.endswith((".weight_packed", ".weight_scale"))})
    modules = {}
    # transformers 5 keeps experts as fused 3-D parameters; the checkpoint has them per expert
    modules.update(replace_fused_experts(model, fmt, tensors, _module_tensors))
    quantized = [q for q in quantized if q not in modules]
    for prefix in quantized:
        old = model.get_submodule(prefix)
        if not isinstance(old, nn.Linear):
            raise PayloadError(f"{prefix} has quantized weights but is a {type(old).__name__}, "
                               "not a Linear", kind="input")
        kind, w, input_scale = _module_tensors(fmt, tensors, prefix)
        if tuple(w.shape) != (old.out_features, old.in_features):
            raise PayloadError(f"{prefix}: dequantized weight {tuple(w.shape)} does not match the "
                               f"model's {(old.out_features, old.in_features)}", kind="input")
        bias = tensors.pop(prefix + ".bias", None)
        pre_quant_scale = tensors.pop(prefix + ".pre_quant_scale", None)  # NVFP4_AWQ (emulate.EmulatedLinear)
        act = activation(fmt, prefix, kind, input_scale)
        modules[prefix] = _set_module(model, prefix, EmulatedLinear(w, bias, kind, act, input_scale,
                                                                     pre_quant_scale))

    # Everything else (embeddings, norms, lm_head, unquantized Linears) as stored.
    rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    expected = set(model.state_dict())
    ignored = sorted(k for k in rest if k not in expected)
    model.load_state_dict({k: v for k, v in rest.items() if k in expected}, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        if out is not None and out.weight.is_meta:
            out.weight = model.get_input_embeddings().weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise PayloadError(f"{model_dir}: no tensors for {len(missing)} parameters "
                           f"(first: {', '.join(missing[:3])})", kind="input")
    model.to(device).eval()
    info = {"quantized": True, "naming": fmt.naming, "algo": fmt.algo,
            "activations": sorted({m.act or "none" for m in modules.values()}),
            "quantized_modules": len(modules), "ignored_tensors": ignored, "notes": fmt.notes}
    return model, info


def load_reference(model_dir, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False):
    """The original (unquantized) model, computing in `dtype`."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if quantization_config(model_dir) is not None:
        raise PayloadError(f"{model_dir} is a quantized checkpoint, not an original model",
                           kind="input")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), {"quantized": False}


def load_any(model_dir, device: str = "cpu", dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A quantized checkpoint emulated, or an original model as it is."""
    if quantization_config(Path(model_dir)) is None:
        return load_reference(model_dir, device, dtype, trust_remote_code)
    return load_emulated(model_dir, device, dtype, trust_remote_code)
