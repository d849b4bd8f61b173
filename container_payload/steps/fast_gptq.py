"""GPTQ on the NVFP4 grid as a few large operations per 16-column block (docs/decisions.md, issue 14).

gptq.gptq_nvfp4 (the reference, kept as the slow path and in the tests) spends about 18
small kernels on every column: at 8B shapes 1.25M columns, most of the sequential recipe's time
on a GPU. Here the same algorithm is organised as the GPTQ paper's lazy batch updates at two
levels, with the per-column work of a 16-column NVFP4 block done in one step:

* per 16-column block: its FP8 scale is chosen from the already-updated weights (the same
  search as the reference), then its 16 columns are rounded one after the other with the error
  fed into the block's later columns only. On CUDA with Triton that whole step is one kernel
  (rows are independent in GPTQ, so each program owns a tile of rows and keeps the block in
  registers); elsewhere it is a short torch loop with a cheaper E2M1 rounding (bucketize).
* the rest of the 128-column block gets the 16 columns' errors in one matmul, and the columns
  after it the 128 columns' errors in one matmul, as in the paper.
* callers pass every Linear of a fused unit (q/k/v, gate/up: same input, same Hessian, same
  global scale) as one matrix, rows stacked, so the unit costs one call.

Same decisions as the reference up to float32 summation order (tests/test_algorithms.py
compares them). Triton is optional: the CPU stand-in may not have it, and then the torch step
runs.
"""
from __future__ import annotations

import os

import torch

from ..core.events import log as _log
from ..numerics.nvfp4 import BLOCK, block_scale_candidates, max_block_scales, search_block_scales
from .gptq import hessian_inverse_factor

try:  # optional: the GPU images carry Triton with torch; the CPU stand-in may not
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import problem means: use the torch step
    triton = None

# E2M1 magnitudes and the rounding boundaries between them. Ties go to the even mantissa
# (algorithms.e2m1_round): at 0.25, 1.25, 2.5 and 5 to the lower value, at 0.75, 1.75 and 3.5 to
# the upper one. bucketize(right=False) sends a value equal to a boundary to the lower side, so
# the upper-winning boundaries are moved one float below the midpoint.
_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MIDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
_TABLES: dict = {}


def _e2m1_tables(dtype, device):
    key = (dtype, str(device))
    if key not in _TABLES:
        grid = torch.tensor(_GRID, dtype=dtype, device=device)
        mids = torch.tensor([m for m, _ in _MIDS], dtype=dtype, device=device)
        below = torch.nextafter(mids, torch.zeros_like(mids))
        up = torch.tensor([u for _, u in _MIDS], device=device)
        _TABLES[key] = (grid, torch.where(up, below, mids).contiguous())
    return _TABLES[key]


def e2m1_round_fast(y: torch.Tensor) -> torch.Tensor:
    """algorithms.e2m1_round in three kernels instead of about ten (bit-identical)."""
    grid, bounds = _e2m1_tables(y.dtype, y.device)
    return torch.copysign(grid[torch.bucketize(y.abs(), bounds)], y)


def hessian_block_scales(wg: torch.Tensor, ug: torch.Tensor, ws2: torch.Tensor, down: int, up: int):
    """Per row of a 16-column block, the FP8 scale whose own GPTQ pass over the block (the 16
    columns rounded in turn, each one's error fed into the later ones) adds the least to GPTQ's
    objective, sum_j e_j^2 with e_j = (w_j - q_j) / U_jj: the block's cost under the layer's
    input Hessian, as GPTQ will pay it, where the plain search scores rounding without the
    feedback. Candidates as search_block_scales (max scaling first, kept unless strictly beaten)."""
    d = torch.diagonal(ug)
    cand = block_scale_candidates(wg.abs().amax(dim=-1), ws2, down, up)  # [R, C]
    step = (cand * ws2.float()).to(wg.dtype)
    w = wg.unsqueeze(1).expand(-1, cand.shape[1], -1).clone()  # [R, C, 16]
    err = torch.zeros_like(step)
    for j in range(BLOCK):
        col = w[:, :, j]
        ej = (col - e2m1_round_fast(col / step) * step) / d[j]
        err += ej * ej
        if j + 1 < BLOCK:
            w[:, :, j + 1:] -= ej.unsqueeze(-1) * ug[j, j + 1:]
    return cand.gather(1, err.argmin(dim=-1, keepdim=True)).squeeze(1)


def group_step_torch(wg: torch.Tensor, ug: torch.Tensor, ws2: torch.Tensor, search: bool,
                     down: int, up: int, hessian: bool = False):
    """One 16-column block: scale, then the 16 columns with error feedback inside the block.
    wg [R, 16] (modified in place), ug [16, 16] the block's diagonal block of the upper factor.
    hessian: scales by hessian_block_scales (search only). Returns (q [R, 16], e [R, 16] the
    scaled errors GPTQ propagates, s [R] the FP8 scales)."""
    d = torch.diagonal(ug)
    if search and hessian:
        s = hessian_block_scales(wg, ug, ws2, down, up)
    else:
        s = search_block_scales(wg, ws2, 1.0 / d ** 2, down, up) if search else max_block_scales(wg, ws2)
    step = s.to(wg.dtype) * ws2.to(wg.dtype)
    q, e = torch.empty_like(wg), torch.empty_like(wg)
    for j in range(BLOCK):
        col = wg[:, j]
        qc = e2m1_round_fast(col / step).mul_(step)
        q[:, j] = qc
        ej = (col - qc).div_(d[j])
        e[:, j] = ej
        if j + 1 < BLOCK:
            wg[:, j + 1:].addr_(ej, ug[j, j + 1:], alpha=-1)
    return q, e, s


# ---------------------------------------------------------------- Triton: the block step as one kernel

if triton is not None:
    @triton.jit
    def _rint(x):
        # round half to even for 0 <= x < 2**22: the float32 add rounds at the units place
        return (x + 8388608.0) - 8388608.0

    @triton.jit
    def _e2m1(y):
        a = tl.abs(y)
        q = tl.where(a < 2.0, _rint(a * 2.0) * 0.5, tl.where(a < 4.0, _rint(a), _rint(a * 0.5) * 2.0))
        q = tl.minimum(q, 6.0)
        return tl.where(y < 0, -q, q)

    @triton.jit
    def _pow2(e):
        # 2**e as float32 for integer e in the normal range
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _exponent(v):
        return ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127

    @triton.jit
    def _fp8(x):
        # FP8 E4M3 round-to-nearest-even of positive x, clamped to [2**-9, 448] (algorithms.fp8_e4m3);
        # 3 mantissa bits, subnormal spacing 2**-9 below 2**-6
        v = tl.minimum(tl.maximum(x, 0.001953125), 448.0)
        e = tl.maximum(_exponent(v), -6)
        return _rint(v * _pow2(3 - e)) * _pow2(e - 3)

    @triton.jit
    def _fp8_prev(s):
        # the FP8 value below s (s itself at the table's start); s * 31/32 is exact and lies in
        # the binade of that value
        e = tl.maximum(_exponent(s * 0.96875), -6)
        return tl.maximum(s - _pow2(e - 3), 0.001953125)

    @triton.jit
    def _fp8_next(s):
        e = tl.maximum(_exponent(s), -6)
        return tl.minimum(s + _pow2(e - 3), 448.0)

    # tl.div_rn throughout: IEEE division like torch's (Triton's `/` on float32 may be approximate)
    @triton.jit
    def _block_err(W, s, ws2, cw):
        step = (s * ws2)[:, None]
        d = _e2m1(tl.div_rn(W, step)) * step - W
        return tl.sum(d * d * cw[None, :], axis=1)

    @triton.jit
    def _block_err_fb(W, s, ws2, u_ptr, su, cols):
        # fast_gptq.hessian_block_scales' cost of scale s: the block's own GPTQ pass
        step = s * ws2
        err = tl.sum(tl.zeros_like(W), axis=1)
        for j in tl.static_range(16):
            sel = (cols == j)[None, :]
            col = tl.sum(tl.where(sel, W, 0.0), axis=1)
            qc = _e2m1(tl.div_rn(col, step)) * step
            ej = tl.div_rn(col - qc, tl.load(u_ptr + j * su + j))
            err += ej * ej
            urow = tl.load(u_ptr + j * su + cols, mask=cols > j, other=0.0)
            W = W - ej[:, None] * urow[None, :]
        return err

    @triton.jit
    def _group_kernel(w_ptr, q_ptr, e_ptr, s_ptr, u_ptr, ws2_ptr, R, sw, sq, se, ss, su,
                      SEARCH: tl.constexpr, DOWN: tl.constexpr, UP: tl.constexpr, BR: tl.constexpr,
                      HESSIAN: tl.constexpr = False):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.arange(0, 16)
        rm = (rows < R)[:, None]
        W = tl.load(w_ptr + rows[:, None] * sw + cols[None, :], mask=rm, other=0.0)
        ws2 = tl.load(ws2_ptr)
        d = tl.load(u_ptr + cols * su + cols)
        s0 = _fp8(tl.div_rn(tl.max(tl.abs(W), axis=1), 6.0 * ws2))
        best = s0
        if SEARCH and HESSIAN:
            best_err = _block_err_fb(W, s0, ws2, u_ptr, su, cols)
            s = s0
            for _k in tl.static_range(DOWN):
                s = _fp8_prev(s)
                err = _block_err_fb(W, s, ws2, u_ptr, su, cols)
                better = err < best_err
                best = tl.where(better, s, best)
                best_err = tl.where(better, err, best_err)
            s = s0
            for _k in tl.static_range(UP):
                s = _fp8_next(s)
                err = _block_err_fb(W, s, ws2, u_ptr, su, cols)
                better = err < best_err
                best = tl.where(better, s, best)
                best_err = tl.where(better, err, best_err)
        elif SEARCH:
            cw = tl.div_rn(tl.full([16], 1.0, tl.float32), d * d)
            best_err = _block_err(W, s0, ws2, cw)
            s = s0
            for _k in tl.static_range(DOWN):  # candidates in the reference's order; the first
                s = _fp8_prev(s)               # minimum wins (strictly better replaces)
                err = _block_err(W, s, ws2, cw)
                better = err < best_err
                best = tl.where(better, s, best)
                best_err = tl.where(better, err, best_err)
            s = s0
            for _k in tl.static_range(UP):
                s = _fp8_next(s)
                err = _block_err(W, s, ws2, cw)
                better = err < best_err
                best = tl.where(better, s, best)
                best_err = tl.where(better, err, best_err)
        step = best * ws2
        Q = tl.zeros([BR, 16], dtype=tl.float32)
        E = tl.zeros([BR, 16], dtype=tl.float32)
        for j in tl.static_range(16):
            sel = (cols == j)[None, :]
            col = tl.sum(tl.where(sel, W, 0.0), axis=1)
            qc = _e2m1(tl.div_rn(col, step)) * step
            ej = tl.div_rn(col - qc, tl.load(u_ptr + j * su + j))
            Q = tl.where(sel, qc[:, None], Q)
            E = tl.where(sel, ej[:, None], E)
            urow = tl.load(u_ptr + j * su + cols, mask=cols > j, other=0.0)
            W = W - ej[:, None] * urow[None, :]
        tl.store(q_ptr + rows[:, None] * sq + cols[None, :], Q, mask=rm)
        tl.store(e_ptr + rows[:, None] * se + cols[None, :], E, mask=rm)
        tl.store(s_ptr + rows * ss, best, mask=rows < R)


ROWS_PER_PROGRAM = 32


def triton_ok(w: torch.Tensor) -> bool:
    """The kernel runs on CUDA float32 tensors (or anywhere under TRITON_INTERPRET=1, for tests);
    the recipe parameter gptq.kernel=torch turns it off."""
    if triton is None or w.dtype != torch.float32:
        return False
    return w.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


_TRITON_FAILED: list = []  # the first error, if the kernel could not be built or run here


def group_step_triton(wg, ug, ws2, search, down, up, q, e, s, hessian=False):
    """The block step of group_step_torch as one kernel, writing into the views q, e [R, 16]
    and s [R]. wg is not modified (its updated values are not needed after the block)."""
    r = wg.shape[0]
    grid = (triton.cdiv(r, ROWS_PER_PROGRAM),)
    _group_kernel[grid](wg, q, e, s, ug, ws2, r, wg.stride(0), q.stride(0), e.stride(0), s.stride(0),
                        ug.stride(0), SEARCH=bool(search), DOWN=down, UP=up, BR=ROWS_PER_PROGRAM,
                        HESSIAN=bool(hessian), **_NO_FMA)


def _first_step(args) -> bool:
    """Run the first block through the kernel; if this Triton cannot build or run it, say so
    once and let the torch step do the work (same results, more kernels)."""
    try:
        group_step_triton(*args)
        return True
    except Exception as exc:  # noqa: BLE001 - a compiler problem must not stop the quantization
        _TRITON_FAILED.append(repr(exc)[:300])
        _log(f"refine: GPTQ Triton kernel unavailable ({_TRITON_FAILED[0]}); using the torch step")
        return False


# Products and sums rounded one at a time, as torch does them (an FMA rounds once).
_NO_FMA = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False}


def gptq_nvfp4_fast(w: torch.Tensor, h: torch.Tensor, ws2: torch.Tensor, block_size: int = 128,
                    damp: float = 0.01, search: bool = True, down: int = 8, up: int = 1,
                    use_triton: bool | None = None, hessian_scales: bool = False, w_given: bool = False):
    """gptq.gptq_nvfp4 (same arguments and results) with lazy batched updates and a fused
    16-column step. w [out, in] may stack several Linears that share h and ws2.
    hessian_scales: block scales by hessian_block_scales instead of the plain search.
    The q returned is the storage of hessian_inverse_factor's copy of w (the caller's w is untouched),
    or of w itself when w_given (handed over: hessian_inverse_factor)."""
    out_f, in_f = w.shape
    assert in_f % BLOCK == 0 and block_size % BLOCK == 0
    dtype = w.dtype
    u, w = hessian_inverse_factor(h, w, damp, w_given)  # w: a copy, or the one handed over; h may be a gptq.Squares
    ws2 = ws2.to(device=w.device, dtype=torch.float32).reshape(1)
    fused = (triton_ok(w) and not _TRITON_FAILED) if use_triton is None else use_triton
    first = fused and use_triton is None
    # No q beside w: a block's dequantized values go into w's own columns, which the loop never
    # reads again once past them (at 8B down_proj, w and q were 0.235 GB each in float32).
    scales = torch.empty(out_f, in_f // BLOCK, dtype=torch.float32, device=w.device)
    err = torch.empty(out_f, block_size, dtype=dtype, device=w.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        n = i2 - i1
        w1, u1, e1 = w[:, i1:i2], u[i1:i2, i1:i2], err[:, :n]
        for g in range(0, n, BLOCK):
            gs = slice(g, g + BLOCK)
            qv, ev, sv = w1[:, gs], e1[:, gs], scales[:, (i1 + g) // BLOCK]
            if fused:  # (the kernel loads its rows of the block before it stores their q there)
                args = (w1[:, gs], u1[gs, gs].contiguous(), ws2, search, down, up, qv, ev, sv, hessian_scales)
                if first:  # its q goes where it reads w: a kernel that fails midway leaves the block as it was
                    first, before = False, w1[:, gs].clone()
                    fused = _first_step(args)
                    if not fused:
                        w1[:, gs].copy_(before)
                else:
                    group_step_triton(*args)
            if not fused:  # (also the block the kernel failed on)
                qg, eg, sg = group_step_torch(w1[:, gs], u1[gs, gs], ws2[0], search, down, up, hessian_scales)
                qv.copy_(qg), ev.copy_(eg), sv.copy_(sg)
            if g + BLOCK < n:  # the rest of this 128-column block, at once
                w1[:, g + BLOCK:].addmm_(ev, u1[gs, g + BLOCK:], alpha=-1)
        if i2 < in_f:  # and the columns after it (lazy batch update), in place: no out x in temporary
            w[:, i2:].addmm_(e1, u[i1:i2, i2:], alpha=-1)
    return w, scales
