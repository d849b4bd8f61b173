"""emulate.py's Mixture-of-Experts parts.

transformers 5 holds a layer's experts as two fused 3-D parameters (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I]) whose forward indexes them per expert; a checkpoint
(ModelOpt's export, and the Hub's) stores them per expert: `experts.N.gate_proj` / `up_proj` /
`down_proj`, or Mixtral's `w1` / `w3` / `w2`. Such a module is replaced by EmulatedExperts:
one EmulatedLinear per expert and projection, and the same routing loop as transformers', so
each expert's weights and input scales are the checkpoint's own. (transformers 4.57 builds
experts as nn.Linear modules, which emulate.py replaces one by one as any Linear.)
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.events import PayloadError
from .emulate import EmulatedLinear, _set_module, activation

# the checkpoint's names for (gate, up, down), in the orders the architectures use
EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


class EmulatedExperts(nn.Module):
    """A fused experts module as the engines compute it: forward(hidden_states, top_k_index,
    top_k_weights) like transformers 5's, over per-expert EmulatedLinear modules."""

    def __init__(self, gate: list, up: list, down: list, act_fn, names=EXPERT_NAMES[0]):
        super().__init__()
        self.gate, self.up, self.down = nn.ModuleList(gate), nn.ModuleList(up), nn.ModuleList(down)
        self.num_experts = len(gate)
        self.act_fn = act_fn
        self.names = tuple(names)  # the checkpoint's (gate, up, down) names, for per-expert reports

    def per_expert(self, reference: nn.Module):
        """(checkpoint name suffix 'N.proj', EmulatedLinear, the reference's weight) of every
        expert, the reference being the original fused experts module."""
        inter = self.gate[0].out_features
        for e in range(self.num_experts):
            ref = (reference.gate_up_proj[e][:inter], reference.gate_up_proj[e][inter:], reference.down_proj[e])
            for name, mods, w in zip(self.names, (self.gate, self.up, self.down), ref):
                yield f"{e}.{name}", mods[e], w

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            pos, token = torch.where(mask[e])
            x = hidden_states[token]
            h = self.act_fn(self.gate[e](x)) * self.up[e](x)
            y = self.down[e](h) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, torch.Tensor) and p.dim() == 3 and getattr(module, "down_proj", None) is not None


def _linear(fmt, tensors: dict, prefix: str, module_tensors) -> nn.Module:

    if prefix + ".weight_scale" in tensors or prefix + ".weight_packed" in tensors:
        kind, w, input_scale = module_tensors(fmt, tensors, prefix)
        return EmulatedLinear(w, tensors.pop(prefix + ".bias", None), kind,
                              activation(fmt, prefix, kind, input_scale), input_scale)
    weight = tensors.pop(prefix + ".weight", None)  # an unquantized expert: bf16 as stored
    if weight is None:
        raise PayloadError(f"{prefix}: the checkpoint has no weight for this expert", kind="input")
    return EmulatedLinear(weight, tensors.pop(prefix + ".bias", None), "bf16", None, None)


def replace_fused_experts(model: nn.Module, fmt, tensors: dict, module_tensors) -> dict:
    """Swap every fused experts module for EmulatedExperts built from the per-expert tensors
    (consumed from `tensors`); returns {per-expert module name: EmulatedLinear}."""

    made = {}
    for name, module in list(model.named_modules()):
        if not _is_fused_experts(module):
            continue
        n = module.gate_up_proj.shape[0]
        names = next((trio for trio in EXPERT_NAMES if f"{name}.0.{trio[0]}.weight" in tensors
                      or f"{name}.0.{trio[0]}.weight_packed" in tensors), None)
        if names is None:
            raise PayloadError(f"{name}: fused experts in the model but no per-expert tensors "
                               f"({name}.0.gate_proj or .w1) in the checkpoint", kind="input")
        parts = {role: [] for role in names}
        for e in range(n):
            for role in names:
                prefix = f"{name}.{e}.{role}"
                parts[role].append(made.setdefault(prefix, _linear(fmt, tensors, prefix, module_tensors)))
        _set_module(model, name, EmulatedExperts(*(parts[r] for r in names), module.act_fn, names))
    return made


def rename_to_model(model: nn.Module, tensors: dict, fmt) -> dict:
    """Checkpoint names -> this transformers' module names, with its own renaming rules
    (transformers 5: Mixtral's `block_sparse_moe.` is `mlp.`); the experts' per-expert tensors
    keep their index and projection, which replace_fused_experts reads. transformers 4.57 has
    no such rules and names modules as its checkpoints do."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):
        return tensors
    if not renamings:
        return tensors

    def rename(key: str) -> str:
        for r in renamings:
            key = r.rename_source_key(key)[0]
        return key

    if fmt.layers:
        fmt.layers = {rename(k + ".weight")[:-len(".weight")]: v for k, v in fmt.layers.items()}
    return {rename(k): v for k, v in tensors.items()}
