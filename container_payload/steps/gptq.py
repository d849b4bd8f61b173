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


class Squares:
    """A unit's H = Xq^T Xq and C = X^T Xq (C: None without the activation correction), handed
    over to the functions below, which drop each square as soon as it is used up. A plain
    argument cannot be freed by the callee (the caller holds it), and at 8B each of down_proj's
    squares is 0.8 GB in float32: the sequential GPTQ's GPU peak is counted in them."""

    def __init__(self, h: torch.Tensor, c: torch.Tensor | None = None):
        self.h, self.c = h, c

    def take_h(self, like: torch.Tensor) -> torch.Tensor:
        """H on `like`'s device and dtype, as the caller's own (the holder lets go of it)."""
        h, self.h = self.h, None
        return h.to(device=like.device, dtype=like.dtype)


def hessian_inverse_factor(h, w: torch.Tensor, damp: float = 0.01):
    """Upper Cholesky factor of the damped inverse Hessian (GPTQ). Dead inputs (zero
    diagonal) get H_ii = 1 and their weight column zeroed. h: a tensor (copied, the caller's
    stays as it was) or a Squares (its H is used up: overwritten and freed here). Returns (U, w)."""
    # At most three squares at a time when h is handed over (h, then two factors; h stays for a
    # retry): the damping goes onto h's own diagonal (the same values as h + d * I; reset from
    # diag0 on a retry) and each factor frees the one before it. Before: four (the caller's h,
    # its copy, the damped copy, a factor). At 8B a GPU budget holds few of down_proj's 0.8 GB.
    h = h.take_h(w) if isinstance(h, Squares) else h.to(w.dtype).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w = w.clone()
    w[:, dead] = 0
    diag0 = torch.diag(h)
    d = damp * torch.mean(torch.diag(h))
    for tries in range(6):
        h.diagonal().copy_(diag0).add_(d)
        try:
            l = torch.linalg.cholesky(h)
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
    Arithmetic in w's dtype (float32 in the payload, float64 in the reference test).
    h: a tensor or a Squares (hessian_inverse_factor)."""
    out_f, in_f = w.shape
    assert in_f % BLOCK == 0 and block_size % BLOCK == 0
    dtype = w.dtype
    u, w = hessian_inverse_factor(h, w, damp)
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


def activation_corrected_weight(w: torch.Tensor, squares: Squares, damp: float = 0.01) -> torch.Tensor:
    """V minimizing ||X W^T - X_q V^T||^2 + lam ||V - W||^2 (ridge towards W):
    V = W + W (C - H) (H + lam I)^-1 with H = X_q^T X_q, C = X^T X_q, lam = damp * mean diag H.
    GPTQ on V with Hessian H then minimizes the layer's full W4A4 output error
    ||X W^T - X_q Q^T||^2, activation rounding included (least-squares orthogonality).
    squares: H and C, handed over; on return C is used up (None) and squares.h is H again."""
    # Squares alive (float32 ones; at 8B down_proj, 0.8 GB each): C - H in float64 with H, C (4),
    # then H alone; during the solve only A = H + lam I in float64 and the solve's LU copy of it
    # (4): H is not kept but rebuilt from A afterwards (float32 -> float64 -> float32 is exact;
    # only A's diagonal differs, kept aside). Before: 6 at the solve (H, C, A, LU).
    h, c = squares.h, squares.c
    squares.c = None
    d = c.double()
    del c  # (freed here: the holder had the only other reference)
    d.sub_(h)  # C - H [in, in] (h is converted exactly: the same bits as d - h.double())
    # W (C - H) A^-1 = (A^-1 (C - H)^T W^T)^T, A symmetric
    rhs = d.T @ w.double().T
    del d
    a = h.double()
    diag = torch.diag(h)
    squares.h = h = None
    lam = damp * torch.diag(a).mean().clamp_min(1e-12)
    a.diagonal().add_(lam)  # A = H + lam I
    corr = torch.linalg.solve(a, rhs).T
    del rhs
    h = a.float()
    del a
    h.diagonal().copy_(diag)
    squares.h = h
    v = w.double()
    v.add_(corr)  # W + corr (the same sum as before, into W's own float64 copy)
    del corr
    return v.to(w.dtype)
