"""The one-pass weight methods, run on ModelOpt's quantizers after its calibration: GPTQ
("gptq", "gptq-aa") and the scale search alone ("scale-search"), unit by unit, from Hessians
gathered over the whole model (hessians.py).

The steps of recipes.py (ScaleSearch, Gptq) call into this module; steps.py runs them right
after ModelOpt's calibration. Every method ends in ModelOpt's own quantizer state, so the
checkpoint is written by `export_hf_checkpoint` unchanged (quantizers.py). The layer-sequential
GPTQ is sequential.py; the bf16 units, bf16_ranking.py.
"""
from __future__ import annotations

import time

import torch

from ..core.events import log as _log
from ..numerics.nvfp4 import E2M1_MAX, E4M3_MAX, global_amax, round_to_grid
from .fast_gptq import gptq_nvfp4_fast
from .gptq import Squares, activation_corrected_weight, gptq_nvfp4
from .hessians import collect_hessians
from .quantizers import fused_units, quantized_linears, set_static_weight_quantizer, unit_weight


def _gptq(w, h, ws2, block_size, damp, search, kernel: str = "auto", scales: str = "search", w_given: bool = False):
    """GPTQ on the NVFP4 grid: the batched implementation (fast_gptq; kernel auto, triton or
    torch), or this module's column-by-column reference (kernel "reference": same results, the
    tests compare them). scales "hessian": fast_gptq.hessian_block_scales (the reference has
    only the plain search; its torch twin runs then). h: a tensor, or a gptq.Squares (used up)."""
    hessian = scales == "hessian" and search
    if kernel == "reference" and not hessian:
        return gptq_nvfp4(w, h, ws2, block_size, damp, search, w_given=w_given)
    return gptq_nvfp4_fast(w, h, ws2, block_size, damp, search, hessian_scales=hessian, w_given=w_given,
                           use_triton={"auto": None, "triton": True, "torch": False, "reference": False}[kernel])


def quantize_unit(unit: list[str], linears: dict, hs: dict, gs: dict, originals: dict | None,
                  gptq: bool = True, search: bool = True, damp: float = 0.01,
                  block_size: int = 128, ridge: float | None = None, kernel: str = "auto",
                  scales: str = "search") -> None:
    """Quantize one fused unit in place: (activation-corrected) targets, one global amax for
    the unit, GPTQ (or rounding) with searched or max block scales; stores the original
    weights in `originals` (None: not kept, as the streamed pass needs) and consumes the unit's
    entries of hs / gs: their tensors are the unit's own (collect_hessians and the sequential pass
    make one pair per unit), freed as they are used up and overwritten on the way (gptq.Squares).
    gs: the activation correction's G = W (C - H) per group (hessians.SquareSums), [out, in] with
    the group's members' rows stacked in unit order, under each member's name (absent: no correction).

    Members that share one Hessian (and one G), as q/k/v and gate/up do, are corrected and
    quantized as one matrix, their rows stacked: GPTQ treats rows independently, so this is
    the same result in one call instead of one per member."""
    mods = [linears[n] for n in unit]
    for n, m in zip(unit, mods):
        if originals is not None:
            originals[n] = m.weight.detach().clone()
    # groups of members with the same H and G (the same tensors: collect_hessians and the
    # sequential pass hand one pair to the whole unit)
    groups: list[list[int]] = []
    for i, n in enumerate(unit):
        for grp in groups:
            k = unit[grp[0]]
            if hs.get(n) is hs.get(k) and gs.get(n) is gs.get(k):
                grp.append(i)
                break
        else:
            groups.append([i])
    # each group's H and G, handed over (gptq.Squares): the entries of hs / gs are consumed here,
    # so each is freed as soon as the correction or GPTQ has used it up
    squares = [Squares(hs.get(unit[grp[0]]), gs.get(unit[grp[0]])) for grp in groups]
    for n in unit:
        hs.pop(n, None)
        gs.pop(n, None)
    targets: dict = {}
    for grp, sq in zip(groups, squares):
        names = [unit[i] for i in grp]
        if sq.g is not None:  # V in G's storage, W added from the members' own weights
            wf = activation_corrected_weight([mods[i].weight.detach() for i in grp], sq,
                                             damp if ridge is None else ridge)
        else:
            wf = unit_weight([mods[i] for i in grp])
        targets[tuple(names)] = wf
    g = global_amax(list(targets.values()))
    ws2 = g / (E2M1_MAX * E4M3_MAX)
    for names, sq in zip(list(targets), squares):
        wf = targets.pop(names)
        if gptq and sq.h is not None:
            # wf handed over: GPTQ works in it (no copy of the target beside it; q comes back in it)
            q, s = _gptq(wf, sq, ws2.to(wf.device), block_size, damp, search, kernel, scales, w_given=True)
        else:
            q, s = round_to_grid(wf, ws2, search)
        del wf
        sq.h = None
        r0 = 0
        for n in names:
            m = linears[n]
            rows = m.weight.shape[0]
            m.weight.data.copy_(q[r0:r0 + rows].to(m.weight.dtype))
            set_static_weight_quantizer(m, s[r0:r0 + rows], g)
            r0 += rows


@torch.no_grad()
def quantize_weights(model, forward_loop, gptq: bool = True, search: bool = True,
                     quantized_input: bool = False, keep_batches: int = 0, damp: float = 0.01,
                     block_size: int = 128, act_aware: bool = False, ridge: float | None = None,
                     kernel: str = "auto", scales: str = "search"):
    """GPTQ (or plain rounding) with searched or max block scales, for every quantized
    Linear; writes on-grid weights and static scales into ModelOpt's quantizers.
    Returns (linears, originals, kept_ids)."""
    linears = quantized_linears(model)
    hs, kept, gs = ({}, [], {})
    if gptq or keep_batches:
        r = collect_hessians(model, forward_loop, linears if gptq else {},
                             quantized_input, keep_batches, act_aware=act_aware and gptq)
        hs, kept, gs = r if len(r) == 3 else (*r, {})
    originals = {}
    t0 = time.time()
    for unit in fused_units(linears):
        quantize_unit(unit, linears, hs, gs, originals, gptq=gptq, search=search, damp=damp,
                      block_size=block_size, ridge=ridge, kernel=kernel, scales=scales)
    _log(f"refine: {'GPTQ' if gptq else 'rounding'}{' (activation-aware)' if act_aware else ''} "
         f"({'searched' if search else 'max'} scales) "
         f"on {len(linears)} Linears in {time.time() - t0:.1f}s")
    return linears, originals, kept
