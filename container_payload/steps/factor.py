"""Factorizations of a square in its own storage: Cholesky, triangular inverse, the solve with a
Cholesky factor, and GPTQ's upper factor of the damped inverse.

Why: torch's factorizations return new squares, and at 8B down_proj's square (14336^2 float32) is
0.82 GB; GPTQ's chain cholesky -> cholesky_inverse -> cholesky held up to three of them under a GPU
cap of 1.61 GB. Here each works in place, blocked by a panel width: small tiles go to torch
(cholesky_ex, solve_triangular), the rest are in-place addmm_ into slices of the square (strides
(n, 1): BLAS writes them directly, on the CPU and with cuBLAS). Temporaries are panel-sized
(rows x panel). The result depends only on the input and the panel width (the same ops and
shapes on any device), so the streamed and whole pipelines stay bit-identical.
"""
from __future__ import annotations

import torch

PANEL = 1024  # panel width; read at call time (tests set a smaller one)


def _tiles(n: int, block: int):
    return [(j, min(j + block, n)) for j in range(0, n, block)]


def cholesky_(a: torch.Tensor, block: int | None = None) -> int:
    """Lower Cholesky factor of the symmetric positive definite a [n, n] into a's lower triangle,
    upper triangle zeroed (right-looking, blocked). Returns 0, or when a is not positive definite
    the order of the first leading minor that is not (1-based, LAPACK's info) without raising, so
    the caller can re-damp: then a's strict upper triangle is still the input's (only the lower
    triangle and diagonal are written before the end): mirror_ rebuilds a symmetric input from it."""
    block = block or PANEL
    tiles = _tiles(a.shape[0], block)
    for t, (j, e) in enumerate(tiles):
        d = a[j:e, j:e]
        # the tile made symmetric from its lower triangle: its upper one still holds the input
        l, info = torch.linalg.cholesky_ex(d.tril().add_(d.tril(-1).T))
        if int(info):
            return j + int(info)
        d.copy_(l.tril_().add_(d.triu(1)))  # the tile's upper triangle stays the input's
        del l
        if e == a.shape[0]:
            break
        # the panel below: P <- P L^-T
        p = a[e:, j:e]
        p.copy_(torch.linalg.solve_triangular(d.tril().T, p, upper=True, left=False))
        # trailing update of the lower triangle only (the upper one is the input until the end):
        # A[k, e:k] -= P[k] P[e:k]^T in place, the diagonal tile's lower triangle from a tile
        for k, k2 in tiles[t + 1:]:
            pk = a[k:k2, j:e]
            if k > e:
                a[k:k2, e:k].addmm_(pk, a[e:k, j:e].T, alpha=-1)
            a[k:k2, k:k2].sub_((pk @ pk.T).tril_())
    a.tril_()
    return 0


def mirror_(a: torch.Tensor, from_upper: bool, block: int | None = None) -> None:
    """a <- the symmetric matrix made of a's diagonal and one strict triangle (the upper one when
    from_upper), copied onto the other; pure data movement."""
    block = block or PANEL
    tiles = _tiles(a.shape[0], block)
    for t, (j, e) in enumerate(tiles):
        d = a[j:e, j:e]
        d.copy_(d.triu().add_(d.triu(1).T) if from_upper else d.tril().add_(d.tril(-1).T))
        for k, k2 in tiles[t + 1:]:
            if from_upper:
                a[k:k2, j:e].copy_(a[j:e, k:k2].T)
            else:
                a[j:e, k:k2].copy_(a[k:k2, j:e].T)


def tri_inverse_(l: torch.Tensor, block: int | None = None) -> None:
    """Inverse of the lower-triangular l [n, n] (upper triangle zero) in place: LAPACK trtri's
    blocked algorithm, block columns from the last one: L21 <- -inv(L22) L21 inv(L11), with L22
    already inverted, then L11 <- inv(L11)."""
    block = block or PANEL
    n = l.shape[0]
    tiles = _tiles(n, block)
    for t in range(len(tiles) - 1, -1, -1):
        j, e = tiles[t]
        d = l[j:e, j:e]
        if e < n:
            # inv(L22) L21 by block rows of inv(L22) (lower: each row strip stops at its diagonal tile)
            x = torch.empty(n - e, e - j, dtype=l.dtype, device=l.device)
            for k, k2 in tiles[t + 1:]:
                torch.mm(l[k:k2, e:k2], l[e:k2, j:e], out=x[k - e:k2 - e])
            l[e:, j:e].copy_(torch.linalg.solve_triangular(d, x, upper=False, left=False).neg_())
            del x
        eye = torch.eye(e - j, dtype=l.dtype, device=l.device)
        d.copy_(torch.linalg.solve_triangular(d, eye, upper=False))


def solve_right_(b: torch.Tensor, l: torch.Tensor, block: int | None = None) -> None:
    """b [m, n] <- b (L L^T)^-1 in place, L the lower factor cholesky_ left in l [n, n]: Y L^T = B
    by block columns forward, then X L = Y backward (each a small triangular solve of a column
    panel of b and an in-place addmm_ into the rest of b)."""
    block = block or PANEL
    n = l.shape[0]
    tiles = _tiles(n, block)
    for j, e in tiles:
        bj = b[:, j:e]
        bj.copy_(torch.linalg.solve_triangular(l[j:e, j:e].T, bj, upper=True, left=False))
        if e < n:
            b[:, e:].addmm_(bj, l[e:, j:e].T, alpha=-1)
    for j, e in reversed(tiles):
        bj = b[:, j:e]
        bj.copy_(torch.linalg.solve_triangular(l[j:e, j:e], bj, upper=False, left=False))
        if j > 0:
            b[:, :j].addmm_(bj, l[j:e, :j], alpha=-1)


def flip_(a: torch.Tensor, block: int | None = None) -> None:
    """a <- J a J (both index orders reversed) in place, by swapping row panels with their mirror
    (pure data movement, exact; panels of at most 128 rows: each swap holds two copies)."""
    block = min(block or PANEL, 128)
    n = a.shape[0]
    i = 0
    while n - i - i > 0:
        w = min(block, (n - 2 * i) // 2)
        if w == 0:  # the middle row of an odd n
            a[i].copy_(a[i].flip(0))
            break
        top, bot = a[i:i + w], a[n - i - w:n - i]
        t = top.flip(0, 1)  # a copy
        top.copy_(bot.flip(0, 1))
        bot.copy_(t)
        del t
        i += w


def gptq_factor_(h: torch.Tensor, damp_value: float | torch.Tensor, block: int | None = None) -> int:
    """GPTQ's U, the upper Cholesky factor of (h + d I)^-1 (U^T U = (h + d I)^-1), into h's own
    storage. With J the index reversal and M = chol(J (h + d I) J) lower, h + d I = R R^T with
    R = J M J upper, so U = R^-1 = J M^-1 J: one Cholesky and one triangular inverse (torch's
    chain, cholesky -> cholesky_inverse -> cholesky, does about twice the work and returns three
    squares). Only h's lower triangle and diagonal are read, as torch.linalg.cholesky does (h is
    made symmetric from them first). Returns cholesky_'s info; when not 0, h is that symmetric h
    again, exactly, for a retry with more damping."""
    mirror_(h, from_upper=False, block=block)
    diag = h.diagonal().clone()
    h.diagonal().add_(damp_value)
    flip_(h, block)
    info = cholesky_(h, block)
    if info:
        mirror_(h, from_upper=True, block=block)
        h.diagonal().copy_(diag.flip(0))
        flip_(h, block)
        return info
    tri_inverse_(h, block)
    flip_(h, block)
    return 0
