"""Per-channel smoothing folded into the weights before NVFP4 calibration (W4A4).

Why: in W4A4 the engines quantize each Linear's input in blocks of 16 values with one FP8 scale
per block. A few input channels (the residual stream's outliers, after the RMSNorm) are tens of
times larger than the rest, so in their blocks the other 15 values round to a handful of levels.
Dividing channel j of the input by s_j and multiplying column j of the weight by s_j leaves the
product unchanged and moves part of that range into the weights, whose 16-blocks are quantized
offline. The division is folded into what produces the input, so the checkpoint stays standard:
  RMSNorm weight  -> q/k/v, gate/up   (input_layernorm, post_attention_layernorm)
  up_proj rows    -> down_proj        (down's input is act(gate) * up, linear in up)
s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)  (SmoothQuant's rule). On the embedded model,
with round-to-nearest weights, alpha 0.65 was the best of 0.25 / 0.5 / 0.65 / 0.8; before
activation-aware GPTQ a milder alpha compounds better (recipes.Smooth;
benchmarks/results/recipes.md).

Only for decoder layers whose norm is a plain RMSNorm (weight * x / rms): llama, mistral, qwen2,
qwen3. Other architectures are left as they are, with a log line.
"""
import torch

from .events import emit
from .linear_compute import float32_linears

SUPPORTED_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
SCALE_RANGE = (1e-2, 1e2)  # keep any one channel's move bounded


def smoothing_groups(model) -> list[tuple[torch.nn.Module, list[torch.nn.Linear]]]:
    """(what produces the input, the Linears that read it) for each decoder layer."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    groups = []
    for layer in getattr(decoder, "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if attn is None or mlp is None or any(type(n).__name__ not in SUPPORTED_NORMS for n in norms):
            return []
        try:
            groups += [(norms[0], [attn.q_proj, attn.k_proj, attn.v_proj]),
                       (norms[1], [mlp.gate_proj, mlp.up_proj]),
                       (mlp.up_proj, [mlp.down_proj])]
        except AttributeError:
            return []
    return groups


def input_channel_absmax(groups, forward_loop, model) -> list[torch.Tensor]:
    """max |x_j| over the calibration data at the input of each group (its first Linear)."""
    stats = [None] * len(groups)

    def hook_for(i):
        def hook(_mod, args):
            x = args[0].detach()
            m = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
            stats[i] = m if stats[i] is None else torch.maximum(stats[i], m)
        return hook

    hooks = [lins[0].register_forward_pre_hook(hook_for(i)) for i, (_, lins) in enumerate(groups)]
    try:
        with float32_linears(model):  # the same products, faster on a CPU (linear_compute.py)
            forward_loop(model)
    finally:
        for h in hooks:
            h.remove()
    return stats


def smoothing_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_absmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(*SCALE_RANGE)


@torch.no_grad()
def apply_scales(producer: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """Input channel j: producer's output / s_j, each Linear's column j * s_j."""
    if isinstance(producer, torch.nn.Linear):  # its output rows (and bias) carry channel j
        producer.weight.copy_((producer.weight.float() / s.to(producer.weight.device)[:, None]))
        if producer.bias is not None:
            producer.bias.copy_(producer.bias.float() / s.to(producer.bias.device))
    else:  # RMSNorm: weight * x / rms(x)
        producer.weight.copy_(producer.weight.float() / s.to(producer.weight.device))
    for lin in linears:
        lin.weight.copy_(lin.weight.float() * s.to(lin.weight.device)[None, :])


def smooth(model, forward_loop, alpha: float, log: bool = True) -> int:
    """Fold smoothing scales into the model in place; returns how many groups were smoothed.
    log=False: no log lines (the streamed path calls this once per layer)."""
    groups = smoothing_groups(model)
    if not groups:
        if log:
            emit("log", message=f"smoothing: skipped ({type(model).__name__}: decoder layers without a plain RMSNorm "
                            "or the q/k/v, gate/up, down layout)")
        return 0
    stats = input_channel_absmax(groups, forward_loop, model)
    for (producer, linears), x_absmax in zip(groups, stats):
        apply_scales(producer, linears, smoothing_scales(x_absmax, [lin.weight for lin in linears], alpha))
    if log:
        emit("log", message=f"smoothing: {len(groups)} groups, alpha {alpha}")
    return len(groups)
