"""Mixed precision ("gptq-mp", "smooth-gptq-seq-mp"): the fused units (qkv, o, gate/up, down)
whose quantization costs the most KL on calibration text, per byte kept, stay in bf16 within a
size budget (9% of the default checkpoint by default, the issue allows 10%). A unit kept in
bf16 has its quantizers disabled, so export stores it in the original dtype and lists it in
`exclude_modules` / `ignore` (the standard way). Whole fused groups only, so the engines can
still fuse q/k/v and gate/up. Before a sequential GPTQ the units are ranked on round-to-nearest
weights (round_weights).
"""
from __future__ import annotations

import time

import torch

from ..core import memory_plan
from ..core.events import log as _log
from ..numerics.emulate import fake_quant_nvfp4
from ..numerics.linear_compute import float32_linears, linear, patch_forward
from ..numerics.nvfp4 import BLOCK, E2M1_MAX, E4M3_MAX, global_amax, round_to_grid
from .quantizers import QuantizersOff, fused_units, modules_out_of_reach, unit_input_scale

CANDIDATES = 12      # units measured directly (one KL pass each), the top of the emulated ranking
MAX_TOKENS = memory_plan.RANKING_TOKENS    # calibration tokens the ranking runs on (the plan counts their logits)


def _nvfp4_bytes(numel: int) -> float:
    return numel * 0.5 + numel / BLOCK + 8


def model_bytes_default(model, linears: dict) -> float:
    """Estimated weight bytes of the default NVFP4 checkpoint (everything else as stored). Weights
    quantized out of our reach (fused experts) count as NVFP4 too: counted as bf16, a MoE's
    experts would make the bf16 budget several times what it promises."""
    qweights = {id(m.weight) for m in linears.values()}
    qweights |= {id(p) for m in modules_out_of_reach(model, linears) for p in m.parameters(recurse=False)
                 if p.dim() >= 2}
    total = 0.0
    for p in model.parameters():  # parameters() yields a tied weight once
        total += _nvfp4_bytes(p.numel()) if id(p) in qweights else p.numel() * p.element_size()
    return total


class Emulation:
    """In-process W4A4 emulation for ranking: weights are already on the grid (bf16);
    inputs are fake-quantized per docs/nvfp4-format.md §3 with the unit's shared input scale.
    Optionally records each Linear's relative output error vs its original weights."""

    def __init__(self, linears: dict, units: list[list[str]], originals: dict | None = None):
        self.handles, self.err = {}, {}
        for unit in units:
            scale = unit_input_scale([linears[n] for n in unit])
            shared = {}  # q/k/v (gate/up) read the same tensor: quantize it once for the unit
            for n in unit:
                self._hook(n, linears[n], scale, None if originals is None else originals[n],
                           fake_quant_nvfp4, shared)

    def _hook(self, name, mod, scale, orig, fq, shared):
        def fwd(m, args, kwargs):
            x = args[0]
            if scale is None:
                xq = x
            elif shared.get("x") is x:
                xq = shared["xq"]
            else:
                xq = fq(x, scale).to(x.dtype)
                shared["x"], shared["xq"] = x, xq
            y = linear(xq, m.weight, m.bias)
            if orig is not None:
                y0 = linear(x, orig, m.bias).float()
                e = ((y.float() - y0) ** 2).sum().item() / max((y0 ** 2).sum().item(), 1e-30)
                self.err[name] = self.err.get(name, 0.0) + e
            return y
        # the module's forward replaced (a forward hook would let the unquantized product run
        # first, then throw it away)
        self.handles[name] = patch_forward(mod, lambda *args, **kwargs: fwd(mod, args, kwargs))

    def remove(self):
        for undo in reversed(list(self.handles.values())):
            undo()
        self.handles = {}


def kl_to(ref_logp: list, logits) -> float:
    """Mean KL(reference || model) per token: `ref_logp` the reference's log-probabilities per
    batch, `logits` the model's logits per batch (an iterable, in the same order)."""
    tot, n = 0.0, 0
    for lp, logit in zip(ref_logp, logits):
        lq = torch.log_softmax(logit.float(), dim=-1)
        tot += (lp.exp() * (lp - lq)).sum().item()
        n += lq.shape[0] * lq.shape[1]
    return tot / max(n, 1)


def model_logits(model, ids_list):
    """The model's logits per batch (no KV cache: a scoring pass)."""
    return (model(input_ids=ids, use_cache=False).logits for ids in ids_list)


def limit_tokens(ids_list, max_tokens: int = MAX_TOKENS):
    """At most max_tokens of the kept batches: whole windows while they fit, else one cut."""
    out, left = [], max_tokens
    for ids in ids_list:
        if left <= 0:
            break
        rows = max(1, min(len(ids), left // ids.shape[1]))
        part = ids[:rows, :min(ids.shape[1], left)]
        out.append(part)
        left -= part.numel()
    return out


def unit_extra_bytes(unit, weights: dict) -> float:
    """What keeping `unit` in bf16 adds to the checkpoint (weights: its Linears' weights, by name)."""
    return sum(weights[n].numel() * weights[n].element_size() - _nvfp4_bytes(weights[n].numel()) for n in unit)


# The ranking's decision, shared by both pipelines (steps.py on the whole model, streamed_steps.py
# layer by layer): scores per unit -> the shortlist measured directly -> the units kept.

def shortlist(units: list, err: dict, extra: dict, budget: float, candidates: int = CANDIDATES) -> list:
    """The units measured one by one: those that fit the budget alone, by their Linears' largest
    emulated output error (`err`, by Linear; ties in model order), the first `candidates`.
    `extra`: unit_extra_bytes by the unit's first Linear."""
    fits = [u for u in units if extra[u[0]] <= budget]
    fits.sort(key=lambda u: -max(err.get(n, 0.0) for n in u))
    return fits[:candidates]


def decide(base: float, measured: list, extra: dict, budget: float, batches: int, t0: float) -> list:
    """The units kept in bf16: `measured` holds (unit, its KL when it alone stays bf16) in
    shortlist order; they are taken by KL saved per extra byte while the budget lasts (`base`:
    the KL with every unit quantized)."""
    gains = [((base - kl) / extra[u[0]], base - kl, extra[u[0]], u) for u, kl in measured]
    gains.sort(key=lambda g: -g[0])
    kept, used = [], 0.0
    for per_byte, gain, more, unit in gains:
        if gain > 0 and used + more <= budget:
            kept.append(unit)
            used += more
    short = lambda u: u[0].rsplit(".", 1)[0] + ":" + "+".join(x.rsplit(".", 1)[1] for x in u)  # noqa: E731
    _log(f"refine: mixed precision: emulated KL {base:.4f} on {batches} batches; "
         f"candidates {[(short(g[3]), round(g[1], 4)) for g in gains]}; kept in bf16 "
         f"{[short(u) for u in kept]} ({used / 1e6:.2f} MB of {budget / 1e6:.2f} MB budget) "
         f"in {time.time() - t0:.1f}s")
    return kept


def keep_in_bf16(linears: dict, units: list, originals: dict | None = None) -> None:
    """The units' quantizers off (export stores them in bf16 and lists them as excluded), their
    original weights back when `originals` has them."""
    for unit in units:
        for n in unit:
            m = linears[n]
            if originals is not None:
                m.weight.data.copy_(originals[n])
            m.weight_quantizer.disable()
            if getattr(m, "input_quantizer", None) is not None:
                m.input_quantizer.disable()


@torch.no_grad()
def keep_sensitive_in_bf16(model, linears: dict, originals: dict, ids_list, budget_frac: float,
                           candidates: int = CANDIDATES, max_tokens: int = MAX_TOKENS):
    """Choose fused units to keep in bf16 within budget_frac of the default checkpoint's
    weight bytes. One emulated pass ranks units by their Linears' relative output error;
    the top `candidates` are then each measured directly: the KL (vs the original model,
    on the calibration windows kept) saved when that unit alone stays bf16. Units are
    taken by KL saved per extra byte until the budget is spent."""
    units = fused_units(linears)
    budget = budget_frac * model_bytes_default(model, linears)
    if not ids_list or budget <= 0:
        return []
    t0 = time.time()
    ids_list = limit_tokens(ids_list, max_tokens)
    quant_w = {n: linears[n].weight.detach().clone() for n in linears}
    extra = {u[0]: unit_extra_bytes(u, originals) for u in units}

    def set_weights(src, names):
        for n in names:
            linears[n].weight.data.copy_(src[n])

    with QuantizersOff(model), float32_linears(model):
        set_weights(originals, linears)
        ref = [torch.log_softmax(logits.float(), dim=-1) for logits in model_logits(model, ids_list)]
        set_weights(quant_w, linears)
        emu = Emulation(linears, units, originals)
        try:
            base = kl_to(ref, model_logits(model, ids_list))
        finally:
            emu.remove()
        measured = []
        for unit in shortlist(units, emu.err, extra, budget, candidates):
            set_weights(originals, unit)
            emu = Emulation(linears, [u for u in units if u is not unit])
            try:
                measured.append((unit, kl_to(ref, model_logits(model, ids_list))))
            finally:
                emu.remove()
                set_weights(quant_w, unit)
    kept = decide(base, measured, extra, budget, len(ids_list), t0)
    keep_in_bf16(linears, kept, originals)
    return kept


@torch.no_grad()
def round_weights(linears: dict) -> None:
    """Weights only, no quantizer state: each fused unit rounded to the NVFP4 grid with
    searched block scales under the unit's global scale (a quick stand-in for ranking)."""
    for unit in fused_units(linears):
        g = global_amax([linears[n].weight for n in unit])
        ws2 = g / (E2M1_MAX * E4M3_MAX)
        for n in unit:
            w = linears[n].weight
            w.data.copy_(round_to_grid(w.detach().float(), ws2)[0].to(w.dtype))
