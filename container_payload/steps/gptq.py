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
