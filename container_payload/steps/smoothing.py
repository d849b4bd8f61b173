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

Which norms: any whose weight scales its output per channel, found by running it (norm_fold),
not from its class or the model's name: weight * x / rms(x) (Llama, Mistral, Qwen2/3) or
(1 + weight) * x / rms(x) (Gemma 1-3, whose stored weight is the offset from 1); a scale s folds
into the first as w / s and into the second as (1 + w) / s - 1. Which producer feeds which
Linears is proven on the first calibration batch, not assumed: the norm's output must be exactly
what q_proj (gate_proj) reads, and down_proj's input act(gate) * up. So Gemma 2/3's
post_attention_layernorm (it normalizes the attention output before the residual add) is never
taken for gate/up: their pre_feedforward_layernorm is. Qwen3's q_norm / k_norm come after q/k,
so the q/k/v input is smoothed as in Llama. A part that does not fit (a Mixture-of-Experts MLP,
whose experts are fused 3-D weights, not Linears; another norm) is left as it is and said so in
the step's line of the model card (steps.py).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..core.events import emit
from ..numerics.linear_compute import float32_linears

SCALE_RANGE = (1e-2, 1e2)  # keep any one channel's move bounded
# How a norm's weight w becomes the factor its normalized input is multiplied by, and back.
FOLDS = {"weight": (lambda w: w, lambda f: f), "one_plus_weight": (lambda w: 1 + w, lambda f: f - 1)}


@dataclass
class Group:
    """One input smoothed: `producer` writes it (a norm, or up_proj's rows), `linears` read it."""
    part: str                      # "q/k/v input", "gate/up input", "down_proj input"
    producer: torch.nn.Module
    linears: list
    fold: str                      # a FOLDS key (a norm), or "rows" (up_proj -> down_proj)
    mlp: torch.nn.Module | None = None   # "rows": down_proj must read mlp.act_fn(gate) * up


@dataclass
class Smoothed:
    """What smooth() did: how many groups, by part, and what it left alone (and why)."""
    groups: int = 0
    parts: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)   # "part (reason)" -> layers
    folds: set = field(default_factory=set)

    def add(self, other: "Smoothed") -> "Smoothed":
        """This report and `other`'s together (the streamed path smooths one layer at a time)."""
        self.groups += other.groups
        self.parts.update(other.parts)
        self.skipped.update(other.skipped)
        self.folds |= other.folds
        return self

    def line(self) -> str:
        """One line for the model card: what applied and what did not, on this architecture."""
        done = ", ".join(f"{p} in {n} layers" for p, n in self.parts.items())
        out = f"{self.groups} groups smoothed ({done})" if self.groups else "skipped: no group fits"
        if "one_plus_weight" in self.folds:
            out += "; norms folded as (1 + weight) / s - 1"
        if self.skipped:
            out += "; not smoothed: " + ", ".join(f"{p} in {n} layers" for p, n in self.skipped.items())
        return out


@torch.no_grad()
def norm_fold(module) -> str | None:
    """How `module` applies its weight, found by running it on a probe with the weight set to 0,
    then 1: "weight" (y = w * x / rms(x)), "one_plus_weight" (y = (1 + w) * x / rms(x)), or None
    (a LayerNorm's mean and bias, no 1-D weight, anything else): a fold there would be wrong."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.is_meta or getattr(module, "bias", None) is not None:
        return None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, w.numel(), generator=gen).to(w.device, w.dtype)
    xf = x.float()
    unit = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True))
    saved = w.detach().clone()
    try:
        out = {}
        for v in (0.0, 1.0):
            w.fill_(v)
            y = module(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                return None
            out[v] = y.float()
    finally:
        w.copy_(saved)

    def near(a, b):
        return (a - b).norm() <= 2e-2 * b.norm() + 1e-6

    if out[0.0].abs().max() <= 1e-6 and near(out[1.0], unit):
        return "weight"
    if near(out[0.0], unit) and near(out[1.0], 2 * unit):
        return "one_plus_weight"
    return None


def smoothing_groups(model, report: Smoothed | None = None) -> list[Group]:
    """The groups of every decoder layer that fit; each part that does not goes into `report`."""
    report = Smoothed() if report is None else report
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    groups = []
    for layer in getattr(decoder, "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or getattr(layer, "post_attention_layernorm", None)
        wanted = (("q/k/v input", getattr(layer, "input_layernorm", None), attn, ("q_proj", "k_proj", "v_proj")),
                  ("gate/up input", mlp_norm, mlp, ("gate_proj", "up_proj")),
                  ("down_proj input", getattr(mlp, "up_proj", None), mlp, ("down_proj",)))
        for part, producer, owner, names in wanted:
            linears = [getattr(owner, n, None) for n in names]
            if not all(isinstance(lin, torch.nn.Linear) for lin in linears):
                report.skipped[f"{part} ({type(owner).__name__} has no {'/'.join(names)} Linears)"] += 1
                continue
            if part == "down_proj input":
                # down_proj(act(gate_proj(x)) * up_proj(x)): linear in up's rows (a plain act(up) is not)
                if not isinstance(producer, torch.nn.Linear) or not isinstance(getattr(owner, "gate_proj", None),
                                                                             torch.nn.Linear) \
                        or not callable(getattr(owner, "act_fn", None)):
                    report.skipped[f"{part} ({type(owner).__name__}: no gate_proj, up_proj and act_fn)"] += 1
                    continue
                groups.append(Group(part, producer, linears, "rows", mlp=owner))
                continue
            fold = norm_fold(producer) if producer is not None else None
            if fold is None:
                report.skipped[f"{part} ({type(producer).__name__} does not scale its output by a weight "
                               "per channel)"] += 1
                continue
            groups.append(Group(part, producer, linears, fold))
    return groups


def input_channel_absmax(groups, forward_loop, model) -> tuple[list[torch.Tensor], list[bool]]:
    """max |x_j| over the calibration data at the input of each group (its first Linear), and
    whether, on the first batch, that input is what the group's producer made: the norm's output,
    or act(gate) * up for down_proj (to 1%: recomputing the product may round otherwise)."""
    stats = [None] * len(groups)
    made = [None] * len(groups)      # the producer's output (and gate's, for "rows") of the first batch
    fits = [None] * len(groups)

    def made_by(i, key):
        def hook(_mod, _args, out):
            if fits[i] is None:
                made[i] = {**(made[i] or {}), key: out.detach()}
        return hook

    def stat_for(i):
        def hook(_mod, args):
            x = args[0].detach()
            if fits[i] is None:  # first batch: is this input what the producer made?
                got = made[i] or {}
                g = groups[i]
                want = (g.mlp.act_fn(got["gate"]) * got["out"]) if g.fold == "rows" and "gate" in got else got.get("out")
                fits[i] = want is not None and want.shape == x.shape and \
                    bool((want.float() - x.float()).norm() <= 1e-2 * x.float().norm() + 1e-6)
                made[i] = None
            m = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
            stats[i] = m if stats[i] is None else torch.maximum(stats[i], m)
        return hook

    hooks = []
    for i, g in enumerate(groups):
        hooks.append(g.producer.register_forward_hook(made_by(i, "out")))
        if g.fold == "rows":
            hooks.append(g.mlp.gate_proj.register_forward_hook(made_by(i, "gate")))
        hooks.append(g.linears[0].register_forward_pre_hook(stat_for(i)))
    try:
        with float32_linears(model):  # the same products, faster on a CPU (linear_compute.py)
            forward_loop(model)
    finally:
        for h in hooks:
            h.remove()
    return stats, [bool(f) for f in fits]


def smoothing_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_absmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(*SCALE_RANGE)


@torch.no_grad()
def apply_scales(producer: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor,
                 fold: str = "weight") -> None:
    """Input channel j: producer's output / s_j, each Linear's column j * s_j."""
    s = s.float().to(producer.weight.device)
    if fold == "rows":  # up_proj: its output rows (and bias) carry channel j
        producer.weight.copy_((producer.weight.float() / s[:, None]))
        if producer.bias is not None:
            producer.bias.copy_(producer.bias.float() / s)
    else:  # a norm: factor(w) * x / rms(x)
        factor, weight_of = FOLDS[fold]
        old = factor(producer.weight.float())
        new = weight_of(old / s).to(producer.weight.dtype)
        # The scale the stored weight really applies: with (1 + w) a bf16 w near -1 is coarse
        # relative to 1 + w, so the Linears take this one and the product stays as it was.
        stored = factor(new.float())
        s = torch.where(stored != 0, old / stored, s)
        producer.weight.copy_(new)
    for lin in linears:
        lin.weight.copy_(lin.weight.float() * s.to(lin.weight.device)[None, :])


def smooth(model, forward_loop, alpha: float, log: bool = True, scales: dict | None = None) -> Smoothed:
    """Fold smoothing scales into the model in place; returns what was smoothed and what not.
    log=False: no log line (the streamed path calls this once per layer and adds the reports).
    scales: filled with {group index: the scales it got}, which refold() folds again."""
    report = Smoothed()
    groups = smoothing_groups(model, report)
    stats, fits = input_channel_absmax(groups, forward_loop, model) if groups else ([], [])
    for i, (g, x_absmax, ok) in enumerate(zip(groups, stats, fits)):
        if not ok or x_absmax is None:
            why = "never reached" if x_absmax is None else f"its input is not what {type(g.producer).__name__} writes"
            report.skipped[f"{g.part} ({why})"] += 1
            continue
        s = smoothing_scales(x_absmax, [lin.weight for lin in g.linears], alpha)
        apply_scales(g.producer, g.linears, s, g.fold)
        if scales is not None:
            scales[i] = s
        report.groups += 1
        report.parts[g.part] += 1
        report.folds.add(g.fold)
    if log:
        emit("log", message=f"smoothing ({type(model).__name__}, alpha {alpha}): {report.line()}")
    return report


def refold(model, scales: dict) -> None:
    """smooth()'s folds again from the scales it gave (its `scales`), on the same weights: the same
    arithmetic, so the same bits, without the statistics' forward (the streamed final pass repeats
    what its ranking pass did to a copy of the layer)."""
    groups = smoothing_groups(model)
    for i, s in scales.items():
        apply_scales(groups[i].producer, groups[i].linears, s, groups[i].fold)
