"""NVFP4 arithmetic: the E2M1 grid, FP8 E4M3 block scales, and the block-scale choices our
weight passes make (max scaling, or the search that is never worse).

The numerics (E2M1 rounding, FP8 E4M3 scales, float32 arithmetic) follow
docs/nvfp4-format.md §2-4 and ModelOpt's NVFP4QTensor.
"""
from __future__ import annotations

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK = 16


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


# Rows of blocks searched at a time: the trial tensor is [rows, 1 + down + up, 16], about 170 MB
# in float32 (a whole 8B down_proj at once was 2.2 GiB, what stopped the streamed ranking on a GPU).
SEARCH_ROWS = 1 << 18


def search_block_scales(w: torch.Tensor, ws2: torch.Tensor, col_weight: torch.Tensor | None = None,
                        down: int = 8, up: int = 1) -> torch.Tensor:
    """Per block of 16, the FP8 scale (as float32) minimizing the (column-weighted) squared
    error. w: [R, 16]; col_weight: [16] or [R, 16] nonnegative, or None for plain MSE.
    The max-scaling scale is candidate 0 and is replaced only by a strictly better one, so
    the result is never worse than max scaling on any block. Rows are independent: searched
    SEARCH_ROWS at a time, the same values as all at once."""
    if w.shape[0] > SEARCH_ROWS:
        per_row = col_weight is not None and col_weight.dim() == 2
        return torch.cat([search_block_scales(w[i:i + SEARCH_ROWS], ws2,
                                              col_weight[i:i + SEARCH_ROWS] if per_row else col_weight, down, up)
                          for i in range(0, w.shape[0], SEARCH_ROWS)])
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


def abs_max(t: torch.Tensor) -> torch.Tensor:
    """max |t| as float32, the same value as t.float().abs().amax() (abs, max and the widening are
    exact) without a float32 copy of t and its abs: at 8B 2 x 235 MB for a 14336 x 4096 weight."""
    lo, hi = torch.aminmax(t.detach())
    return torch.maximum(lo.neg(), hi).abs().float()  # (abs: +0 for an all-zero t, as abs().amax())


def global_amax(ws: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([abs_max(w) for w in ws]).amax()


def round_to_grid(w: torch.Tensor, ws2: torch.Tensor, search: bool = True):
    """Round-to-nearest on the NVFP4 grid, no error feedback: (q [out, in] dequantized,
    scales [out, in/16]) with searched or max block scales."""
    blocks = w.reshape(-1, BLOCK)
    s = search_block_scales(blocks, ws2) if search else max_block_scales(blocks, ws2)
    q = quantize_blocks(blocks, s[:, None], ws2).reshape(w.shape)
    return q, s.reshape(w.shape[0], -1)
