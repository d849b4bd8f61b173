"""Mixed precision ("gptq-mp", "smooth-gptq-seq-mp"): the fused units (qkv, o, gate/up, down)
whose quantization costs the most KL on calibration text, per byte kept, stay in bf16 within a
size budget (9% of the default checkpoint by default, the issue allows 10%). A unit kept in
bf16 has its quantizers disabled, so export stores it in the original dtype and lists it in
`exclude_modules` / `ignore` (the standard way). Whole fused groups only, so the engines can
still fuse q/k/v and gate/up. Before a sequential GPTQ the units are ranked on round-to-nearest
weights (round_weights).

With fp8=True a unit may instead go FP8 (W8A8, per-tensor scales, ModelOpt's FP8_DEFAULT_CFG
format; export writes MIXED_PRECISION as for the MoE layouts): half bf16's bytes, so the same
budget covers about twice the units. Each shortlisted unit is measured both ways and every
(unit, format) choice ranked by KL saved per extra byte (decide()).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..core import memory_plan
from ..core.events import PayloadError
from ..core.events import log as _log
from ..numerics.emulate import fake_quant_fp8, fake_quant_nvfp4, fp8_e4m3
from ..numerics.linear_compute import float32_linears, linear, patch_forward, weight_for_linear
from ..numerics.nvfp4 import BLOCK, E2M1_MAX, E4M3_MAX, global_amax, round_to_grid
from .quantizers import QuantizersOff, fused_units, modules_out_of_reach, unit_input_scale

CANDIDATES = memory_plan.RANKING_CANDIDATES  # units measured directly (one KL each), the top of the emulated ranking
MAX_TOKENS = memory_plan.RANKING_TOKENS    # calibration tokens the ranking runs on (the plan counts their streams)


def _nvfp4_bytes(numel: int) -> float:
    return numel * 0.5 + numel / BLOCK + 8   # codes, FP8 block scales, weight_scale_2 + input_scale


def _fp8_bytes(numel: int) -> float:
    return numel + 8                          # FP8 weight, weight_scale + input_scale (float32)


FP8_MAX = 448.0

# Elements per row chunk of the ranking's elementwise work on a weight or an activation (rounding,
# fake quantization), so its float32 temporaries never span a whole tensor: rounding a 14336 x 4096
# weight at once held 1.23 GiB (the block-scale search costs about 270 bytes an element), an 8B
# down_proj input of 1024 tokens fake-quantized at once about 0.5 GB. Rows are independent in all
# of it (blocks of 16 along a row, per-tensor scales): chunked, the same values.
CHUNK_ELEMENTS = 1 << 19
# fake_quant_rows' chunk: it runs on every emulated input of every batch, where the rounding runs
# once a layer. At 2**19 elements the ranking and the sequential GPTQ launched thousands of small
# kernels a batch: on an H100 at 8B keep_bf16 took 54.6 s and the GPTQ 86.9 s, against 11.5 s and
# 47.3 s unchunked. 2**23 (two chunks of a 4096-wide input of 2048 tokens): about 0.2 GB of float32
# temporaries, where the whole 14336-wide input took 0.5 GB.
ACTIVATION_CHUNK_ELEMENTS = 1 << 23


def row_chunks(*ts: torch.Tensor, elements: int | None = None):
    """Row slices of equally shaped tensors [..., n] (as [rows, n]), about `elements` at a time:
    views of a 2-D tensor (written in place by the callers) or of a contiguous one."""
    n = ts[0].shape[-1]
    rows = max(1, (elements or CHUNK_ELEMENTS) // max(n, 1))
    flat = [t if t.dim() == 2 else t.reshape(-1, n) for t in ts]
    for r in range(0, flat[0].shape[0], rows):
        yield tuple(f[r:r + rows] for f in flat)


def fake_quant_rows(fq, x: torch.Tensor, scale, elements: int | None = None) -> torch.Tensor:
    """fq(x, scale).to(x.dtype) (emulate.fake_quant_nvfp4 / fake_quant_fp8: per row), in row chunks
    of about `elements` (None: ACTIVATION_CHUNK_ELEMENTS, read at call time; fq's temporaries,
    ~5x a chunk in float32, are the chunk's size)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for xr, orr in row_chunks(x, out, elements=elements or ACTIVATION_CHUNK_ELEMENTS):
        orr.copy_(fq(xr, scale))
    return out


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

    def __init__(self, linears: dict, units: list[list[str]], originals: dict | None = None,
                 fp8_units: list[list[str]] = ()):
        self.handles, self.err = {}, {}
        for unit in units:
            scale = unit_input_scale([linears[n] for n in unit])
            shared = {"size": len(unit)}  # q/k/v (gate/up) read the same tensor: quantize it once for the unit
            for n in unit:
                self._hook(n, linears[n], scale, None if originals is None else originals[n],
                           fake_quant_nvfp4, shared)
        for unit in fp8_units:  # weights already FP8-rounded (fp8_weights); inputs per-tensor FP8
            scale = unit_input_scale([linears[n] for n in unit])
            scale = None if scale is None else scale * E4M3_MAX * E2M1_MAX / FP8_MAX
            shared = {"size": len(unit)}
            for n in unit:
                self._hook(n, linears[n], scale, None, fake_quant_fp8, shared)

    def _hook(self, name, mod, scale, orig, fq, shared):
        def fwd(m, args, kwargs):
            x = args[0]
            if scale is None:
                xq = x
            elif shared.get("x") is x:
                xq = shared["xq"]
                shared["left"] -= 1
                if not shared["left"]:  # the unit's last member: let x and xq go (kept until the
                    del shared["x"], shared["xq"]  # next batch, at 8B on 2048 tokens down_proj's took 117 MB)
            else:
                xq = fake_quant_rows(fq, x, scale)
                if shared["size"] > 1:
                    shared.update(x=x, xq=xq, left=shared["size"] - 1)
            y = linear(xq, m.weight, m.bias)
            if orig is not None:
                y0 = linear(x, orig.to(x.device, non_blocking=True), m.bias)  # (host memory, streamed)
                # one float32 output at a time, in place (y0 widened as it is read): the same values
                # and sums as ((y.float() - y0.float()) ** 2).sum() and (y0.float() ** 2).sum(),
                # which held four (at 8B, gate_proj on 2048 tokens: 117 MB each)
                d = y.to(torch.float32, copy=True).sub_(y0)
                num = d.pow_(2).sum().item()
                e = num / max(d.copy_(y0).pow_(2).sum().item(), 1e-30)
                del y0, d
                self.err[name] = self.err.get(name, 0.0) + e
            return y
        # the module's forward replaced (a forward hook would let the unquantized product run
        # first, then throw it away)
        self.handles[name] = patch_forward(mod, lambda *args, **kwargs: fwd(mod, args, kwargs))

    def remove(self):
        for undo in reversed(list(self.handles.values())):
            undo()
        self.handles = {}


# Head rows per chunk of the ranking's KL: at 8B (1024 tokens) 64 MiB of float32 logits a copy,
# where the whole vocabulary (128256) took 0.5 GB a copy and five copies at a time.
VOCAB_CHUNK = memory_plan.RANKING_VOCAB_CHUNK


class _HeadReached(Exception):
    """Raised by head_input's hook: the forward stops where the output head would run."""


def head_input(model, forward) -> torch.Tensor:
    """The hidden states that enter the model's output head during `forward()` (one forward of
    `model`): its input is recorded and the forward stops there, so the head never runs over the
    whole vocabulary (mean_kls runs it in chunks)."""
    got = []

    def hook(_module, args):
        got.append(args[0])
        raise _HeadReached

    head = model.get_output_embeddings()
    if head is None:
        raise PayloadError(f"{type(model).__name__} has no output embeddings for the bf16 ranking's KL; "
                           "use a recipe without keep_bf16", kind="input")
    handle = head.register_forward_pre_hook(hook)
    try:
        forward()
    except _HeadReached:
        pass
    finally:
        handle.remove()
    if not got:
        raise PayloadError("the bf16 ranking found no output head call in the model's forward", kind="input")
    return got[0]


def logits_post(model):
    """What the model's forward does to the head's output (elementwise, in the logits' dtype), as
    transformers writes it: Cohere's logit_scale, Granite's logits_scaling, Gemma 2/3's
    final_logit_softcapping."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale, divide, cap = (getattr(config, key, None)
                          for key in ("logit_scale", "logits_scaling", "final_logit_softcapping"))

    def post(z):
        if scale is not None:
            z = z * scale
        if divide is not None:
            z = z / divide
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        return z
    return post


@torch.no_grad()
def mean_kls(head, post, ref: list, streams: list, device, chunk: int = VOCAB_CHUNK) -> list[float]:
    """Each stream's mean KL(reference || stream) per token, from the hidden states that enter the
    output head (head_input): `ref` and each of `streams` one tensor per ranking batch. The logits
    (head(h), then `post`) are computed `chunk` vocabulary rows at a time, never whole, in one pass
    (as flash attention's softmax): per token the running log-sum-exp of the reference (r) and of
    each stream, and A = sum_v exp(z_ref - r) (z_ref - z_q), rescaled by exp(r_old - r_new) when r
    grows; at the end KL = A - lse_ref + lse_q. (Two passes, the log-sum-exps first, cost twice
    the head products: measured 2.3x the full-logits time on the CPU.) Vocabulary chunks are the
    outer loop, so each chunk of the head's weight (host memory in streamed mode) goes to `device`
    once. Both pipelines call this, on the same tensors: their decisions are the same."""
    weight, bias = head.weight, getattr(head, "bias", None)

    def logits(h, w, b):  # as the model's head computes them (in h's dtype), then float32
        return post(linear(h.to(device, non_blocking=True), w, b)).float()

    r = [None] * len(ref)                                   # per batch, the reference's running lse
    lse = [[None] * len(ref) for _ in streams]              # per stream and batch, its running lse
    acc = [[None] * len(ref) for _ in streams]              # per stream and batch, A (float64)
    for a in range(0, weight.shape[0], chunk):
        w = weight_for_linear(weight[a:a + chunk].to(device, non_blocking=True))
        b = None if bias is None else bias[a:a + chunk].to(device, non_blocking=True)
        for j in range(len(ref)):
            zr = logits(ref[j], w, b)
            part = torch.logsumexp(zr, dim=-1)
            grown = part if r[j] is None else torch.logaddexp(r[j], part)
            pr = zr.sub(grown.unsqueeze(-1)).exp_()
            shrink = None if r[j] is None else (r[j] - grown).exp_().double()
            for s, stream in enumerate(streams):
                zq = logits(stream[j], w, b)
                part = torch.logsumexp(zq, dim=-1)
                lse[s][j] = part if lse[s][j] is None else torch.logaddexp(lse[s][j], part)
                term = zq.neg_().add_(zr).mul_(pr).sum(dim=-1, dtype=torch.float64)  # p (z_ref - z_q)
                acc[s][j] = term if shrink is None else acc[s][j].mul_(shrink).add_(term)
            r[j] = grown
            del zr, pr
    tokens = sum(h.shape[0] * h.shape[1] for h in ref)
    return [sum((acc[s][j] - r[j].double() + lse[s][j].double()).sum().item() for j in range(len(ref)))
            / max(tokens, 1) for s in range(len(streams))]


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


def unit_extra_bytes(unit, weights: dict, fmt: str = "bf16") -> float:
    """What keeping `unit` in `fmt` (bf16 or fp8) adds over NVFP4 (weights: its Linears' weights, by name)."""
    kept = (lambda w: w.numel() * w.element_size()) if fmt == "bf16" else (lambda w: _fp8_bytes(w.numel()))
    return sum(kept(weights[n]) - _nvfp4_bytes(weights[n].numel()) for n in unit)


@dataclass(frozen=True)
class Costs:
    """What each unit may be kept in and what that adds, for both pipelines' ranking: `fmts`,
    the extra bytes by (unit's first Linear, fmt), the cheapest of them by the unit's first Linear
    (what shortlist() checks against the budget), and how many units the shortlist measures
    (twice as many with fp8: an FP8 unit stores half a bf16 one's bytes)."""
    fmts: tuple
    extra: dict
    cheapest: dict
    width: int


def unit_costs(units: list, weights: dict, fp8: bool, candidates: int = CANDIDATES) -> Costs:
    """Costs of `units` (weights: their Linears' weights by name; shapes and dtypes are all it reads)."""
    fmts = ("bf16", "fp8") if fp8 else ("bf16",)
    extra = {(u[0], f): unit_extra_bytes(u, weights, f) for u in units for f in fmts}
    cheapest = {u[0]: min(extra[u[0], f] for f in fmts) for u in units}
    return Costs(fmts, extra, cheapest, candidates * len(fmts))


def fp8_round_unit_(unit, weights: dict) -> dict:
    """The fused unit's weights (`weights`: by name, each rounded in place and returned) as its FP8
    export stores them: one per-tensor scale for the unit, amax / 448 (ModelOpt's export gives
    q/k/v and gate/up one shared weight scale), in row chunks."""
    scale = (global_amax([weights[n] for n in unit]) / FP8_MAX).clamp_min(1e-12)
    for n in unit:
        w, sc = weights[n], scale.to(weights[n].device)
        for (wr,) in row_chunks(w):
            wr.copy_((fp8_e4m3(wr.float() / sc) * sc).to(w.dtype))
    return weights


def fp8_weights(unit, originals) -> dict:
    """The unit's weights as its FP8 export stores them, as copies (fp8_round_unit_)."""
    return fp8_round_unit_(unit, {n: originals[n].detach().clone() for n in unit})


# The ranking's decision, shared by both pipelines (steps.py on the whole model, streamed_steps.py
# layer by layer): scores per unit -> the shortlist measured directly -> the (unit, format) kept.

def shortlist(units: list, err: dict, extra: dict, budget: float, candidates: int = CANDIDATES) -> list:
    """The units measured one by one: those that fit the budget alone, by their Linears' largest
    emulated output error (`err`, by Linear; ties in model order), the first `candidates`.
    `extra`: a unit's cheapest extra bytes (unit_extra_bytes), by the unit's first Linear."""
    fits = [u for u in units if extra[u[0]] <= budget]
    fits.sort(key=lambda u: -max(err.get(n, 0.0) for n in u))
    return fits[:candidates]


def decide(base: float, measured: list, budget: float, batches: int, t0: float) -> list:
    """The units kept in higher precision: `measured` holds (unit, fmt, its KL when it alone is
    kept in fmt, the extra bytes that costs); the best KL saved per byte first, at most one format
    per unit, while the budget lasts (`base`: the KL with every unit quantized). Returns [(unit, fmt)]."""
    gains = sorted((((base - kl) / more, base - kl, more, unit, fmt) for unit, fmt, kl, more in measured),
                   key=lambda g: -g[0])
    kept, used, taken = [], 0.0, set()
    for per_byte, gain, more, unit, fmt in gains:
        if gain > 0 and used + more <= budget and unit[0] not in taken:
            kept.append((unit, fmt))
            used += more
            taken.add(unit[0])
    short = lambda u: u[0].rsplit(".", 1)[0] + ":" + "+".join(x.rsplit(".", 1)[1] for x in u)  # noqa: E731
    _log(f"refine: mixed precision: emulated KL {base:.4f} on {batches} batches; "
         f"candidates {[(short(g[3]), g[4], round(g[1], 4)) for g in gains]}; kept "
         f"{[(short(u), f) for u, f in kept]} ({used / 1e6:.2f} MB of {budget / 1e6:.2f} MB budget) "
         f"in {time.time() - t0:.1f}s")
    return kept


def set_fp8(mods: list, originals: dict, names: list) -> None:
    """Turn a unit's ModelOpt NVFP4 quantizers into FP8 per-tensor ones (FP8_DEFAULT_CFG's
    attributes), with the unit's shared weight amax and input amax, so that export writes the
    unit as FP8 in a MIXED_PRECISION checkpoint."""
    w_amax = global_amax([originals[n] for n in names])
    in_amax = [m.input_quantizer.amax.detach().float().reshape(-1).max() for m in mods
               if getattr(m, "input_quantizer", None) is not None and m.input_quantizer.amax is not None]
    for m in mods:
        for q in (m.weight_quantizer, getattr(m, "input_quantizer", None)):
            if q is not None:
                q.set_from_attribute_config({"num_bits": (4, 3), "axis": None, "block_sizes": None})
        m.weight_quantizer.amax = w_amax.to(m.weight.device)
        if in_amax:
            m.input_quantizer.amax = torch.stack(in_amax).max().to(m.weight.device)


def kept_line(kept: list, total: int) -> str:
    """What the ranking kept, for result.json's steps_applied (both pipelines): `kept` [(unit, fmt)]."""
    n = {f: sum(1 for _, g in kept if g == f) for f in ("bf16", "fp8")}
    fp8 = f", {n['fp8']} in FP8" if n["fp8"] else ""
    return f"{n['bf16']} of {total} fused units kept in bf16{fp8}"


def keep_units(linears: dict, kept: list, originals: dict | None = None) -> None:
    """The kept (unit, fmt): original weights back when `originals` has them; bf16: quantizers off
    (export stores the unit in bf16 and lists it as excluded); fp8: FP8 per-tensor quantizers (set_fp8)."""
    for unit, fmt in kept:
        mods = [linears[n] for n in unit]
        for n, m in zip(unit, mods):
            if originals is not None:
                m.weight.data.copy_(originals[n])
            if fmt == "bf16":
                m.weight_quantizer.disable()
                if getattr(m, "input_quantizer", None) is not None:
                    m.input_quantizer.disable()
        if fmt == "fp8":
            set_fp8(mods, originals if originals is not None else {n: linears[n].weight for n in unit}, unit)


@torch.no_grad()
def keep_sensitive_in_bf16(model, linears: dict, originals: dict, ids_list, budget_frac: float,
                           candidates: int = CANDIDATES, max_tokens: int = MAX_TOKENS, fp8: bool = False):
    """Choose fused units to keep in bf16 (or, with fp8, in bf16 or FP8) within budget_frac of
    the default checkpoint's bytes (extra bytes counted per format, unit_extra_bytes). One
    emulated pass ranks units by their Linears' relative output error; the top `candidates`
    (twice as many with fp8: each costs about half) are then each measured directly: the KL (vs
    the original model, on the calibration windows kept) saved when that unit alone stays
    bf16 (FP8). decide() takes them by KL saved per extra byte until the budget is spent.
    Returns [(unit, fmt)]; FP8 units get FP8 quantizers (set_fp8)."""
    units = fused_units(linears)
    budget = budget_frac * model_bytes_default(model, linears)
    if not ids_list or budget <= 0:
        return []
    t0 = time.time()
    ids_list = limit_tokens(ids_list, max_tokens)
    quant_w = {n: linears[n].weight.detach().clone() for n in linears}
    costs = unit_costs(units, originals, fp8, candidates)

    def set_weights(src, names):
        for n in names:
            linears[n].weight.data.copy_(src[n])

    def finals():  # the hidden states entering the head, per batch
        return [head_input(model, lambda: model(input_ids=ids, use_cache=False)) for ids in ids_list]

    with QuantizersOff(model), float32_linears(model):
        set_weights(originals, linears)
        ref = finals()
        set_weights(quant_w, linears)
        emu = Emulation(linears, units, originals)
        try:
            base = finals()
        finally:
            emu.remove()
        scored, streams = [], []
        for unit in shortlist(units, emu.err, costs.cheapest, budget, costs.width):
            for fmt in costs.fmts:
                set_weights(originals if fmt == "bf16" else fp8_weights(unit, originals), unit)
                emu = Emulation(linears, [u for u in units if u is not unit], fp8_units=[unit] if fmt == "fp8" else ())
                try:
                    streams.append(finals())
                    scored.append((unit, fmt))
                finally:
                    emu.remove()
                    set_weights(quant_w, unit)
        base, *kls = mean_kls(model.get_output_embeddings(), logits_post(model), ref, [base, *streams],
                              ref[0].device if ref else "cpu")
    measured = [(unit, fmt, kl, costs.extra[unit[0], fmt]) for (unit, fmt), kl in zip(scored, kls)]
    kept = decide(base, measured, budget, len(ids_list), t0)
    keep_units(linears, kept, originals)
    return kept


@torch.no_grad()
def round_weights(linears: dict) -> None:
    """Weights only, no quantizer state: each fused unit rounded to the NVFP4 grid with
    searched block scales under the unit's global scale (a quick stand-in for ranking), in row
    chunks (CHUNK_ELEMENTS: the search's temporaries are a chunk's)."""
    for unit in fused_units(linears):
        g = global_amax([linears[n].weight for n in unit])
        ws2 = g / (E2M1_MAX * E4M3_MAX)
        for n in unit:
            w = linears[n].weight.detach()
            for (wr,) in row_chunks(w):
                wr.copy_(round_to_grid(wr.float(), ws2)[0].to(w.dtype))
