"""GPTQ on the NVFP4 grid: the inverse-Hessian factor, the column-by-column reference
(fast_gptq.py is the batched one, tested against it) and the activation correction.

Weights are rounded column by column with the classic GPTQ error feedback (inverse-Hessian
updates). A 16-column block's FP8 scale is fixed when GPTQ reaches the block, from the
already-updated weights, by searching the FP8 values at and just below the max-scaling choice
for the one with the least (GPTQ-weighted) squared error.
"""
from __future__ import annotations

import torch

from ..numerics.nvfp4 import BLOCK, e2m1_round, max_block_scales, search_block_scales
from . import factor
from .host_memory import waiting_copy
from .quantizers import row_pieces, stacked_rows


class Squares:
    """A unit's H = Xq^T Xq and G = W (C - H) (the activation correction's [out, in] term,
    hessians.SquareSums; None without the correction), handed over to the functions below, which
    drop each one as soon as it is used up. A plain argument cannot be freed by the callee (the
    caller holds it), and at 8B down_proj's H is 0.8 GB in float32: the sequential GPTQ's GPU peak
    is counted in squares."""

    def __init__(self, h: torch.Tensor, g: torch.Tensor | None = None):
        self.h, self.g = h, g

    def take_h(self, like: torch.Tensor) -> torch.Tensor:
        """H on `like`'s device and dtype, as the caller's own (the holder lets go of it)."""
        h, self.h = self.h, None
        return h.to(device=like.device, dtype=like.dtype)


def hessian_inverse_factor(h, w: torch.Tensor, damp: float = 0.01, w_given: bool = False):
    """Upper Cholesky factor of the damped inverse Hessian (GPTQ). Dead inputs (zero
    diagonal) get H_ii = 1 and their weight column zeroed. h: a tensor (copied, the caller's
    stays as it was) or a Squares (its H is used up: U is computed in its storage). w_given: w is
    handed over (the caller reads it no more) and becomes GPTQ's working copy itself; else it is
    copied (at 8B down_proj 0.235 GB). Returns (U, w)."""
    # One square at a time: U is made in H's own storage (factor.gptq_factor_, panel-sized
    # temporaries), and a retry on a Hessian that is not positive definite needs no copy of H
    # (gptq_factor_ gives H back from the triangle it left untouched). Before: up to three
    # (h kept for the retry, L, then the inverse and U). At 8B down_proj's square is 0.82 GB.
    h = h.take_h(w) if isinstance(h, Squares) else h.to(w.dtype).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w = w if w_given else w.clone()
    w[:, dead] = 0
    d = damp * torch.mean(torch.diag(h))
    for tries in range(6):
        if factor.gptq_factor_(h, d) == 0:
            return h, w
        d = d * 10 if d > 0 else 1e-6
    raise RuntimeError("GPTQ: Hessian not positive definite even with heavy damping")


def gptq_nvfp4(w: torch.Tensor, h: torch.Tensor, ws2: torch.Tensor, block_size: int = 128,
               damp: float = 0.01, search: bool = True, down: int = 8, up: int = 1, w_given: bool = False):
    """GPTQ with NVFP4 rounding. w: [out, in]; h: [in, in] (X^T X); ws2: global scale.

    The scale of each 16-column block is chosen when GPTQ reaches it, from the updated
    weights (search over FP8 values, weighted by 1/d_j^2 like GPTQ's own error, or plain
    max scaling when search=False). Returns (q [out, in] dequantized, in the storage of
    hessian_inverse_factor's copy of w, or of w itself when w_given; scales [out, in/16]).
    Arithmetic in w's dtype (float32 in the payload, float64 in the reference test).
    h: a tensor or a Squares (hessian_inverse_factor)."""
    out_f, in_f = w.shape
    assert in_f % BLOCK == 0 and block_size % BLOCK == 0
    dtype = w.dtype
    u, w = hessian_inverse_factor(h, w, damp, w_given)
    scales = torch.zeros(out_f, in_f // BLOCK, dtype=torch.float32, device=w.device)
    # q in w's own storage (as fast_gptq): the block's columns are worked on in w1 (a copy), so
    # w[:, i1:i2] takes the block's q as it is rounded; the loop never reads them again.
    q = w
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
        if i2 < in_f:  # in place, as fast_gptq: no out x in temporary
            w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1)
    return q, scales


def activation_corrected_weight(w, squares: Squares, damp: float = 0.01) -> torch.Tensor:
    """V minimizing ||X W^T - X_q V^T||^2 + lam ||V - W||^2 (ridge towards W):
    V = W + G (H + lam I)^-1 with H = X_q^T X_q, G = W (C - H), C = X^T X_q,
    lam = damp * mean diag H. GPTQ on V with Hessian H then minimizes the layer's full W4A4
    output error ||X W^T - X_q Q^T||^2, activation rounding included (least-squares orthogonality).
    w: W [out, in], or the members' weights whose rows it stacks (any float dtype: only added at the
    end). squares: H and G, handed over; on return G is used up (V is returned in its storage,
    squares.g is None) and squares.h holds H again, bit for bit. All in float32: A = H + lam I is
    positive definite (lam > 0), so a Cholesky solves it, and G carries no cancellation (hessians.
    SquareSums forms X - Xq elementwise). At 8B down_proj: H (0.82 GB) and G (0.235 GB)."""
    # A is built and factored in H's own storage; H waits in a copy meanwhile (pinned host memory
    # for a CUDA square: GPU memory is what the streamed budget caps; a clone on the CPU, where
    # the copy costs the same wherever it waits) and is copied back, exactly, for GPTQ.
    h, g = squares.h, squares.g
    squares.g = None
    width = (w if torch.is_tensor(w) else w[0]).shape[1]
    assert g.shape == (stacked_rows(w), width), (g.shape, stacked_rows(w), width)  # W, or its members stacked
    saved = waiting_copy(h)
    lam = damp * torch.diag(h).mean().clamp_min(1e-12)
    for _ in range(6):
        h.diagonal().add_(lam)  # A = H + lam I
        if factor.cholesky_(h) == 0:
            break
        h.copy_(saved, non_blocking=True)
        lam = lam * 10  # float32 rounding can lose definiteness on a badly conditioned H: damp more
    else:
        raise RuntimeError("activation correction: H + lam I not positive definite even with heavy damping")
    factor.solve_right_(g, h)  # G A^-1, in G's storage
    h.copy_(saved, non_blocking=True)  # H again (the copy is queued after the solve on h's stream)
    del saved
    for r0, t in row_pieces(w):  # V = W + G A^-1, in G's storage; W widened as it is added (no float32 copy)
        g[r0:r0 + t.shape[0]].add_(t)
    return g
