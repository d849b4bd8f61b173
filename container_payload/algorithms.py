"""Our own NVFP4 methods, run on ModelOpt's quantizers after its calibration.

The steps of recipes.py (ScaleSearch, Gptq, KeepBf16) call into this module; steps.py runs
them right after ModelOpt's calibration.

Every method ends in ModelOpt's own quantizer state, so the checkpoint is written by
`export_hf_checkpoint` unchanged:

* GPTQ on the NVFP4 grid ("gptq"): weights are rounded column by column with the
  classic GPTQ error feedback (inverse-Hessian updates). A 16-column block's FP8 scale
  is fixed when GPTQ reaches the block, from the already-updated weights, by searching
  the FP8 values at and just below the max-scaling choice for the one with the least
  (GPTQ-weighted) squared error. The chosen scales are stored as the STATIC per-block
  amax of ModelOpt's weight quantizer (StaticBlockScaleQuantizer, the same state its
  MSE / four-over-six calibrations leave), with `global_amax` shared by each fused
  group (q/k/v, gate/up) BEFORE any block scale is chosen. Export then computes
  weight_scale = fp8(amax_b * 448 / global_amax) = exactly our scale and
  weight_scale_2 = global_amax / 2688, and re-rounds the (already on-grid) weights to
  exactly the codes GPTQ picked.
* Scale search alone ("scale-search"): the same block-scale search without GPTQ.
* Mixed precision ("gptq-mp"): after GPTQ, the fused units (qkv, o, gate/up, down) whose
  quantization costs the most KL on calibration text, per byte kept, stay in bf16 within
  a size budget (9% of the default checkpoint by default, the issue allows 10%). A unit
  kept in bf16 has its quantizers disabled, so export stores it in the original dtype
  and lists it in `exclude_modules` / `ignore` (the standard way). Whole fused groups
  only, so the engines can still fuse q/k/v and gate/up.
* Layer-sequential GPTQ ("smooth-gptq-seq-mp", sequential.py): each layer fitted on the
  inputs the quantized layers before it produce; its bf16 units are chosen before it runs.

The numerics (E2M1 rounding, FP8 E4M3 scales, float32 arithmetic) follow
docs/nvfp4-format.md §2-4 and ModelOpt's NVFP4QTensor.
"""
from __future__ import annotations

import time

import torch

from .linear_compute import float32_linears, linear, patch_forward

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK = 16

# Fused groups the engines build for Llama-style blocks (docs/nvfp4-format.md §4).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


from .events import log as _log


# ---------------------------------------------------------------- numerics

def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """Round to the E2M1 grid, ties to even mantissa, saturating at 6 (ModelOpt _cast_fp4).
    The grid is uniform per binade: step 0.5 below 2, 1 in [2, 4), 2 from 4 on, so it is
    torch.round (half to even) at the binade's step: 0.25->0, 0.75->1, 1.25->1, 1.75->2,
    2.5->2, 3.5->4, 5->4."""
    a = y.abs()
    q = torch.where(a < 2, torch.round(a * 2) * 0.5,
                    torch.where(a < 4, torch.round(a), torch.round(a * 0.5) * 2)).clamp_(max=E2M1_MAX)
    return torch.where(y < 0, -q, q)


def fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round positive scales to FP8 E4M3 (RNE), clamped to [2**-9, 448] as ModelOpt does."""
    return x.float().clamp(min=2.0 ** -9, max=E4M3_MAX).to(torch.float8_e4m3fn).float()


_FP8_TABLES: dict = {}


def _fp8_table(device) -> torch.Tensor:
    """All positive finite FP8 E4M3 values, ascending (2**-9 ... 448)."""
    key = str(device)
    if key not in _FP8_TABLES:
        codes = torch.arange(1, 127, dtype=torch.uint8, device=device)
        _FP8_TABLES[key] = codes.view(torch.float8_e4m3fn).float()
    return _FP8_TABLES[key]


def block_scale_candidates(amax: torch.Tensor, ws2: torch.Tensor, down: int, up: int):
    """FP8 block-scale candidates per block: the max-scaling choice first (index 0), then
    `down` FP8 steps below it and `up` steps above it (duplicates at the table's ends are
    harmless). amax: [R] float32 block amax; returns [R, 1 + down + up] float32."""
    table = _fp8_table(amax.device)
    s0 = fp8_e4m3(amax.float() / (E2M1_MAX * ws2.float()))
    i0 = torch.searchsorted(table, s0.contiguous())  # exact: s0 is in the table
    steps = [0] + [-k for k in range(1, down + 1)] + list(range(1, up + 1))
    idx = torch.stack([(i0 + k).clamp(0, len(table) - 1) for k in steps], dim=-1)
    return table[idx]


def quantize_blocks(w: torch.Tensor, scale: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """Dequantized NVFP4 value of w [..., 16] with FP8 block scale `scale` [..., 1] (float32)
    and global scale ws2, computed as the export does: code = e2m1(w / (scale * ws2))."""
    dt = _work_dtype(w)
    step = scale.to(dt) * ws2.to(dt)
    return e2m1_round(w.to(dt) / step) * step


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    # float32 like the export; float64 only for the reference tests
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def search_block_scales(w: torch.Tensor, ws2: torch.Tensor, col_weight: torch.Tensor | None = None,
                        down: int = 8, up: int = 1) -> torch.Tensor:
    """Per block of 16, the FP8 scale (as float32) minimizing the (column-weighted) squared
    error. w: [R, 16]; col_weight: [16] or [R, 16] nonnegative, or None for plain MSE.
    The max-scaling scale is candidate 0 and is replaced only by a strictly better one, so
    the result is never worse than max scaling on any block."""
    w = w.to(_work_dtype(w))
    amax = w.abs().amax(dim=-1)
    cand = block_scale_candidates(amax, ws2, down, up)  # [R, C] float32
    q = quantize_blocks(w.unsqueeze(1), cand.unsqueeze(-1), ws2)  # [R, C, 16]
    err = (q - w.unsqueeze(1)) ** 2
    if col_weight is not None:
        cw = col_weight.to(w.dtype)
        err = err * (cw.unsqueeze(1) if cw.dim() == 2 else cw)
    err = err.sum(-1)  # [R, C]
    best = err.argmin(dim=-1)
    # keep the max-scaling choice unless strictly beaten (argmin returns the first minimum,
    # and candidate 0 is the max-scaling one)
    return cand.gather(1, best[:, None]).squeeze(1)


def max_block_scales(w: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """ModelOpt's default (max) block scale per block of 16: fp8(amax_b / (6 * ws2))."""
    return fp8_e4m3(w.float().abs().amax(dim=-1) / (E2M1_MAX * ws2.float()))


# ---------------------------------------------------------------- GPTQ on the NVFP4 grid

def hessian_inverse_factor(h: torch.Tensor, w: torch.Tensor, damp: float = 0.01):
    """Upper Cholesky factor of the damped inverse Hessian (GPTQ). Dead inputs (zero
    diagonal) get H_ii = 1 and their weight column zeroed. Returns (U, w)."""
    # Temporaries are freed as soon as the next one exists, and the damping is added to the
    # diagonal in place (the same values as h + d * I): at 8B, down_proj's H is 0.8 GB in float32
    # and a GPU budget (streamed mode) holds only a few of them.
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w = w.clone()
    w[:, dead] = 0
    d = damp * torch.mean(torch.diag(h))
    for tries in range(6):
        hd = h.clone()
        hd.diagonal().add_(d)
        try:
            l = torch.linalg.cholesky(hd)
            del hd
            hinv = torch.cholesky_inverse(l)
            del l
            u = torch.linalg.cholesky(hinv, upper=True)
            return u, w
        except torch.linalg.LinAlgError:
            d = d * 10 if d > 0 else 1e-6
    raise RuntimeError("GPTQ: Hessian not positive definite even with heavy damping")


def gptq_nvfp4(w: torch.Tensor, h: torch.Tensor, ws2: torch.Tensor, block_size: int = 128,
               damp: float = 0.01, search: bool = True, down: int = 8, up: int = 1):
    """GPTQ with NVFP4 rounding. w: [out, in]; h: [in, in] (X^T X); ws2: global scale.

    The scale of each 16-column block is chosen when GPTQ reaches it, from the updated
    weights (search over FP8 values, weighted by 1/d_j^2 like GPTQ's own error, or plain
    max scaling when search=False). Returns (q [out, in] dequantized, scales [out, in/16]).
    Arithmetic in w's dtype (float32 in the payload, float64 in the reference test)."""
    out_f, in_f = w.shape
    assert in_f % BLOCK == 0 and block_size % BLOCK == 0
    dtype = w.dtype
    u, w = hessian_inverse_factor(h.to(dtype), w, damp)
    q = torch.zeros_like(w)
    scales = torch.zeros(out_f, in_f // BLOCK, dtype=torch.float32, device=w.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for g in range(0, i2 - i1, BLOCK):
            blk = w1[:, g:g + BLOCK]
            if search:
                cw = 1.0 / torch.diag(u1)[g:g + BLOCK] ** 2
                s = search_block_scales(blk, ws2, cw, down, up)
            else:
                s = max_block_scales(blk, ws2)
            scales[:, (i1 + g) // BLOCK] = s
            step = s.to(dtype) * ws2.to(dtype)
            for j in range(g, g + BLOCK):
                col = w1[:, j]
                qc = e2m1_round(col / step).mul_(step)
                q[:, i1 + j] = qc
                e = (col - qc).div_(u1[j, j])
                w1[:, j:].addr_(e, u1[j, j:], alpha=-1)
                err1[:, j] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q, scales


# ---------------------------------------------------------------- model plumbing

def _quantizers(model):
    from modelopt.torch.quantization.nn import TensorQuantizer
    return [m for m in model.modules() if isinstance(m, TensorQuantizer)]


class QuantizersOff:
    """Temporarily disable every enabled ModelOpt quantizer (the refine passes run the
    original model; ModelOpt's CPU fake-quant kernels need CUDA anyway). A quantizer turned
    off here still counts as enabled for unit_input_scale: our emulation needs its scale."""

    def __init__(self, model):
        self.qs = [q for q in _quantizers(model) if q.is_enabled]

    def __enter__(self):
        for q in self.qs:
            q.disable()
            _PAUSED.add(id(q))

    def __exit__(self, *exc):
        for q in self.qs:
            q.enable()
            _PAUSED.discard(id(q))


_PAUSED: set[int] = set()  # ids of the quantizers a QuantizersOff holds off


def quantized_linears(model) -> dict:
    out = {}
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is not None and getattr(wq, "is_enabled", False) and hasattr(m, "weight") \
                and m.weight.dim() == 2 and m.weight.shape[1] % BLOCK == 0:
            out[name] = m
    return out


def modules_out_of_reach(model, linears: dict) -> list:
    """Modules whose weights ModelOpt quantizes but that are not among `linears` (the 2-D Linears
    our weight steps handle). transformers 5 keeps a Mixture-of-Experts layer's experts as fused
    3-D parameters, which ModelOpt quantizes per expert (a ModuleList of weight quantizers) but
    GPTQ, the scale search and the bf16 ranking do not reach: they keep ModelOpt's round-to-nearest
    with max scales."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    modules = dict(model.named_modules())
    handled = {id(m) for m in linears.values()}
    owners = {}
    for name, q in modules.items():
        if not isinstance(q, TensorQuantizer) or not q.is_enabled:
            continue
        parts = name.split(".")
        at = next((i for i, p in enumerate(parts) if "weight_quantizer" in p), None)
        owner = modules.get(".".join(parts[:at])) if at is not None else None
        if owner is not None and id(owner) not in handled:
            owners[id(owner)] = owner
    return list(owners.values())


def weights_out_of_reach(model, linears: dict) -> dict[str, int]:
    """modules_out_of_reach counted by kind, e.g. {"Qwen3MoeExperts (fused 3-D expert weights)": 2}."""
    out: dict[str, int] = {}
    for m in modules_out_of_reach(model, linears):
        name = type(m).__name__  # ModelOpt's QuantX subclasses X: name the model's own class
        name = next((c.__name__ for c in type(m).__mro__[1:] if c.__name__ == name.removeprefix("Quant")), name)
        fused = any(p.dim() == 3 for p in m.parameters(recurse=False))
        what = f"{name} ({'fused 3-D expert weights' if fused else 'not a 2-D Linear of 16-multiple inputs'})"
        out[what] = out.get(what, 0) + 1
    return out


def fused_units(names) -> list[list[str]]:
    """Quantized Linear names grouped into the units the engines fuse (q/k/v, gate/up);
    every other Linear is a unit of its own."""
    names = list(names)
    left, units = set(names), []
    for n in names:
        if n not in left:
            continue
        parent, _, leaf = n.rpartition(".")
        unit = [n]
        for group in FUSED_GROUPS:
            if leaf in group:
                unit = [f"{parent}.{g}" if parent else g for g in group]
                unit = [u for u in unit if u in left]
                break
        for u in unit:
            left.discard(u)
        units.append(unit)
    return units


def _input_amax(m) -> torch.Tensor | None:
    iq = getattr(m, "input_quantizer", None)
    if iq is None or not (iq.is_enabled or id(iq) in _PAUSED) or getattr(iq, "amax", None) is None:
        return None
    return iq.amax.detach().float().reshape(-1).max()


def unit_input_scale(mods) -> torch.Tensor | None:
    """The input scale the export writes for a fused unit (one, shared: max of the members'
    calibrated input amax / (6 * 448)), or None when its input is not quantized."""
    amaxes = [a for a in (_input_amax(m) for m in mods) if a is not None]
    return torch.stack(amaxes).max() / (E2M1_MAX * E4M3_MAX) if amaxes else None


def keep_input_ids(model, kept: list, count: int):
    """Hook the decoder so that the first `count` input_ids batches of a pass land in `kept`
    (the mixed-precision ranking reuses them). Returns the hook's handle."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model

    def keep(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and len(kept) < count:
            kept.append(ids.detach().clone())
    return body.register_forward_pre_hook(keep, with_kwargs=True)


@torch.no_grad()
def collect_hessians(model, forward_loop, linears: dict, quantized_input: bool = False,
                     keep_batches: int = 0, act_aware: bool = False):
    """One calibration pass of the unquantized model; H = mean x^T x per Linear (float32),
    x fake-quantized as the engine quantizes the input when quantized_input or act_aware.
    With act_aware also C = mean x_orig^T x_q (for the activation-error correction).
    Also keeps the first `keep_batches` input_ids batches (for the sensitivity pass)."""
    from .emulate import fake_quant_nvfp4

    hs = {n: None for n in linears}
    cs = {n: None for n in linears}
    counts = {n: 0 for n in linears}
    quantized_input = quantized_input or act_aware
    kept = []
    handles = []

    def hook_for(name, mods):
        scale = unit_input_scale(mods) if quantized_input else None

        def pre(mod, args):
            x0 = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            x = x0 if scale is None else fake_quant_nvfp4(x0, scale)
            h = x.T @ x
            hs[name] = h if hs[name] is None else hs[name].add_(h)
            if act_aware:
                c = x0.T @ x
                cs[name] = c if cs[name] is None else cs[name].add_(c)
            counts[name] += x.shape[0]
        return pre

    # the members of a fused unit (q/k/v, gate/up) read the same input: one Hessian each unit
    units = fused_units(linears)
    for unit in units:
        handles.append(linears[unit[0]].register_forward_pre_hook(hook_for(unit[0], [linears[n] for n in unit])))
    handles.append(keep_input_ids(model, kept, keep_batches))
    try:
        with QuantizersOff(model), float32_linears(model):
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    for n in hs:
        if hs[n] is not None:
            hs[n] = hs[n] / max(counts[n], 1)  # out of place: the hook ran in inference mode
        if cs[n] is not None:
            cs[n] = cs[n] / max(counts[n], 1)
    for unit in units:
        for n in unit[1:]:
            hs[n], cs[n] = hs[unit[0]], cs[unit[0]]
    if act_aware:
        return hs, kept, cs
    return hs, kept


def activation_corrected_weight(w: torch.Tensor, h_qq: torch.Tensor, c_xq: torch.Tensor,
                                damp: float = 0.01) -> torch.Tensor:
    """V minimizing ||X W^T - X_q V^T||^2 + lam ||V - W||^2 (ridge towards W):
    V = W + W (C - H) (H + lam I)^-1 with H = X_q^T X_q, C = X^T X_q, lam = damp * mean diag H.
    GPTQ on V with Hessian H then minimizes the layer's full W4A4 output error
    ||X W^T - X_q Q^T||^2, activation rounding included (least-squares orthogonality)."""
    a = h_qq.double()
    lam = damp * torch.diag(a).mean().clamp_min(1e-12)
    d = c_xq.double()
    d.sub_(a)  # C - H [in, in]
    # W (C - H) A^-1 = (A^-1 (C - H)^T W^T)^T, A symmetric
    rhs = d.T @ w.double().T
    del d  # (in place and freed early: at in=14336 each float64 square is 1.6 GB)
    a.diagonal().add_(lam)  # A = H + lam I
    corr = torch.linalg.solve(a, rhs).T
    return (w.double() + corr).to(w.dtype)


def set_static_weight_quantizer(m, scales: torch.Tensor, global_amax: torch.Tensor) -> None:
    """Store per-block FP8 scales as the static per-block amax of m's weight quantizer so
    that export writes weight_scale == scales and weight_scale_2 == global_amax / 2688."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import StaticBlockScaleQuantizer

    wq = m.weight_quantizer
    bs = dict(wq.block_sizes)
    bs["type"] = "static"
    wq.block_sizes = bs
    StaticBlockScaleQuantizer.from_tensor_quantizer(wq, global_amax=global_amax.float().reshape(()))
    g = global_amax.float().reshape(())
    # export: fp8(amax_b / 6 * 448 / (G / 6)) = fp8(amax_b * 448 / G) -> scales exactly
    amax = scales.float() * g / E4M3_MAX
    if getattr(wq, "_amax", None) is not None:
        delattr(wq, "_amax")  # the dynamic quantizer's scalar amax; ours is per block
    wq.amax = amax.reshape(-1, 1).contiguous()


def _global_amax(ws: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([w.float().abs().amax() for w in ws]).amax()


def round_to_grid(w: torch.Tensor, ws2: torch.Tensor, search: bool = True):
    """Round-to-nearest on the NVFP4 grid, no error feedback: (q [out, in] dequantized,
    scales [out, in/16]) with searched or max block scales."""
    blocks = w.reshape(-1, BLOCK)
    s = search_block_scales(blocks, ws2) if search else max_block_scales(blocks, ws2)
    q = quantize_blocks(blocks, s[:, None], ws2).reshape(w.shape)
    return q, s.reshape(w.shape[0], -1)


def _gptq(w, h, ws2, block_size, damp, search, kernel: str = "auto"):
    """GPTQ on the NVFP4 grid: the batched implementation (fast_gptq; kernel auto, triton or
    torch), or this module's column-by-column reference (kernel "reference": same results, the
    tests compare them)."""
    if kernel == "reference":
        return gptq_nvfp4(w, h, ws2, block_size, damp, search)
    from .fast_gptq import gptq_nvfp4_fast
    return gptq_nvfp4_fast(w, h, ws2, block_size, damp, search,
                           use_triton={"auto": None, "triton": True, "torch": False}[kernel])


def quantize_unit(unit: list[str], linears: dict, hs: dict, cs: dict, originals: dict,
                  gptq: bool = True, search: bool = True, damp: float = 0.01,
                  block_size: int = 128, ridge: float | None = None, kernel: str = "auto") -> None:
    """Quantize one fused unit in place: (activation-corrected) targets, one global amax for
    the unit, GPTQ (or rounding) with searched or max block scales; stores the original
    weights in `originals` and consumes the unit's entries of hs / cs.

    Members that share one Hessian (and one C), as q/k/v and gate/up do, are corrected and
    quantized as one matrix, their rows stacked: GPTQ treats rows independently, so this is
    the same result in one call instead of one per member."""
    mods = [linears[n] for n in unit]
    for n, m in zip(unit, mods):
        originals[n] = m.weight.detach().clone()
    # groups of members with the same H and C (the same tensors: collect_hessians and the
    # sequential pass hand one pair to the whole unit)
    groups: list[list[int]] = []
    for i, n in enumerate(unit):
        for grp in groups:
            k = unit[grp[0]]
            if hs.get(n) is hs.get(k) and cs.get(n) is cs.get(k):
                grp.append(i)
                break
        else:
            groups.append([i])
    targets: dict = {}
    for grp in groups:
        names = [unit[i] for i in grp]
        wf = torch.cat([mods[i].weight.detach().float() for i in grp])
        c = cs.get(names[0])
        if c is not None:
            wf = activation_corrected_weight(wf, hs[names[0]], c, damp if ridge is None else ridge).float()
        targets[tuple(names)] = wf
    g = _global_amax(list(targets.values()))
    ws2 = g / (E2M1_MAX * E4M3_MAX)
    for names, wf in targets.items():
        h = hs.get(names[0])
        if gptq and h is not None:
            q, s = _gptq(wf, h.to(wf.device), ws2.to(wf.device), block_size, damp, search, kernel)
        else:
            q, s = round_to_grid(wf, ws2, search)
        r0 = 0
        for n in names:
            m = linears[n]
            rows = m.weight.shape[0]
            m.weight.data.copy_(q[r0:r0 + rows].to(m.weight.dtype))
            set_static_weight_quantizer(m, s[r0:r0 + rows], g)
            r0 += rows
    for n in unit:
        hs.pop(n, None)
        cs.pop(n, None)


@torch.no_grad()
def quantize_weights(model, forward_loop, gptq: bool = True, search: bool = True,
                     quantized_input: bool = False, keep_batches: int = 0, damp: float = 0.01,
                     block_size: int = 128, act_aware: bool = False, ridge: float | None = None,
                     kernel: str = "auto"):
    """GPTQ (or plain rounding) with searched or max block scales, for every quantized
    Linear; writes on-grid weights and static scales into ModelOpt's quantizers.
    Returns (linears, originals, kept_ids)."""
    linears = quantized_linears(model)
    hs, kept, cs = ({}, [], {})
    if gptq or keep_batches:
        r = collect_hessians(model, forward_loop, linears if gptq else {},
                             quantized_input, keep_batches, act_aware=act_aware and gptq)
        hs, kept, cs = r if len(r) == 3 else (*r, {})
    originals = {}
    t0 = time.time()
    for unit in fused_units(linears):
        quantize_unit(unit, linears, hs, cs, originals, gptq=gptq, search=search, damp=damp,
                      block_size=block_size, ridge=ridge, kernel=kernel)
    _log(f"refine: {'GPTQ' if gptq else 'rounding'}{' (activation-aware)' if act_aware else ''} "
         f"({'searched' if search else 'max'} scales) "
         f"on {len(linears)} Linears in {time.time() - t0:.1f}s")
    return linears, originals, kept


# ---------------------------------------------------------------- mixed precision

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
        from .emulate import fake_quant_nvfp4
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


@torch.no_grad()
def _kl_to(model, ids_list, ref_logp) -> float:
    tot, n = 0.0, 0
    for ids, lp in zip(ids_list, ref_logp):
        lq = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        tot += (lp.exp() * (lp - lq)).sum().item()
        n += lq.shape[0] * lq.shape[1]
    return tot / max(n, 1)


def _limit_tokens(ids_list, max_tokens: int):
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


def _unit_extra_bytes(unit, originals) -> float:
    return sum(originals[n].numel() * originals[n].element_size() - _nvfp4_bytes(originals[n].numel())
               for n in unit)


@torch.no_grad()
def keep_sensitive_in_bf16(model, linears: dict, originals: dict, ids_list, budget_frac: float,
                           candidates: int = 12, max_tokens: int = 1024):
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
    ids_list = _limit_tokens(ids_list, max_tokens)
    quant_w = {n: linears[n].weight.detach().clone() for n in linears}

    def set_weights(src, names):
        for n in names:
            linears[n].weight.data.copy_(src[n])

    with QuantizersOff(model), float32_linears(model):
        set_weights(originals, linears)
        ref = [torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1) for ids in ids_list]
        set_weights(quant_w, linears)
        emu = Emulation(linears, units, originals)
        try:
            base = _kl_to(model, ids_list, ref)
        finally:
            emu.remove()
        fits = [u for u in units if _unit_extra_bytes(u, originals) <= budget]
        fits.sort(key=lambda u: -max(emu.err.get(n, 0.0) for n in u))
        shortlist = fits[:candidates]
        gains = []
        for unit in shortlist:
            set_weights(originals, unit)
            emu = Emulation(linears, [u for u in units if u is not unit])
            try:
                kl = _kl_to(model, ids_list, ref)
            finally:
                emu.remove()
                set_weights(quant_w, unit)
            extra = _unit_extra_bytes(unit, originals)
            gains.append(((base - kl) / extra, base - kl, extra, unit))
    gains.sort(key=lambda g: -g[0])
    kept, used = [], 0.0
    for per_byte, gain, extra, unit in gains:
        if gain > 0 and used + extra <= budget:
            kept.append(unit)
            used += extra
    for unit in kept:
        for n in unit:
            m = linears[n]
            m.weight.data.copy_(originals[n])
            m.weight_quantizer.disable()
            if getattr(m, "input_quantizer", None) is not None:
                m.input_quantizer.disable()
    short = lambda u: u[0].rsplit(".", 1)[0] + ":" + "+".join(x.rsplit(".", 1)[1] for x in u)
    _log(f"refine: mixed precision: emulated KL {base:.4f} on {len(ids_list)} batches; "
         f"candidates {[(short(g[3]), round(g[1], 4)) for g in gains]}; kept in bf16 "
         f"{[short(u) for u in kept]} ({used / 1e6:.2f} MB of {budget / 1e6:.2f} MB budget) "
         f"in {time.time() - t0:.1f}s")
    return kept


@torch.no_grad()
def round_weights(linears: dict) -> None:
    """Weights only, no quantizer state: each fused unit rounded to the NVFP4 grid with
    searched block scales under the unit's global scale (a quick stand-in for ranking)."""
    for unit in fused_units(linears):
        g = _global_amax([linears[n].weight for n in unit])
        ws2 = g / (E2M1_MAX * E4M3_MAX)
        for n in unit:
            w = linears[n].weight
            w.data.copy_(round_to_grid(w.detach().float(), ws2)[0].to(w.dtype))
