"""The statistics GPTQ fits to, gathered by hooks on the quantized Linears during calibration
passes: H = X^T X per fused unit (its inputs, NVFP4-rounded for activation-aware GPTQ) and, for
the activation correction, G = W (X - Xq)^T Xq, plus the calibration batches a later ranking
pass needs."""
from __future__ import annotations

import torch

from ..numerics.emulate import fake_quant_nvfp4
from ..numerics.linear_compute import float32_linears
from .bf16_ranking import fake_quant_rows
from .host_memory import copy_stream
from .quantizers import QuantizersOff, fused_units, row_pieces, stacked_rows, unit_input_scale

# Tokens per product in SquareSums: the float32 temporaries of one piece (x, xq, x0, X - Xq at
# 14336 inputs, (X - Xq) W^T) stay a few tens of MB at 8B shapes. The sums depend on it (float32
# summation order), so every pipeline uses this one value: the streamed and the whole-model
# sequential GPTQ write the same bytes because they sum the same pieces in the same order.
SQUARE_TOKENS = 512
# Elements of W per product (X - Xq) W^T in SquareSums: W's rows a piece at a time, widened to
# float32 from the members' own weights, so no float32 copy of the unit's W is made (at 8B
# gate/up's was 0.47 GB, down_proj's 0.235 GB beside its 0.82 GB H). Fixed, like SQUARE_TOKENS.
W_PIECE_ELEMENTS = 1 << 23
# Elements of a piece fake-quantized at once: the NVFP4 rounding's float32 temporaries (about five
# of them) at 2**21 stay near 40 MB, where a whole 512-token piece of down_proj's 14336-wide input
# took about 150 MB beside its 0.78 GB H (the 10% cap at 8B ran out of memory there). Rows are
# independent: the same values.
QUANT_ELEMENTS = 1 << 21


def pieces(x: torch.Tensor, x0: torch.Tensor | None, on=None):
    """(x, x0) SQUARE_TOKENS tokens at a time, brought by `on` (None: where they are). From host
    memory to a GPU (x, x0 or both), the next piece is copied on a side stream while this one is
    summed: on one stream the copies of a streamed run's waiting inputs would wait for the
    products, and the products for them. Same values, only the overlap differs."""
    on = on or (lambda t: t)

    def take(s):
        return on(x[s:s + SQUARE_TOKENS]), None if x0 is None else on(x0[s:s + SQUARE_TOKENS])

    n = x.shape[0]
    dev = on(x[:0]).device
    if dev.type != "cuda" or (x.is_cuda and (x0 is None or x0.is_cuda)):  # nothing to bring over
        for s in range(0, n, SQUARE_TOKENS):
            yield take(s)
        return
    main, side = torch.cuda.current_stream(dev), copy_stream(dev, "in")
    side.wait_stream(main)  # x and x0 may still be on their way into host memory, queued on `main`

    def fetch(s):
        with torch.cuda.stream(side):
            return take(s)

    nxt = fetch(0)
    for s in range(0, n, SQUARE_TOKENS):
        cur = nxt
        main.wait_stream(side)
        for t in cur:
            if t is not None:
                t.record_stream(main)  # made on `side`, read on `main`: not reused before `main` is done
        if s + SQUARE_TOKENS < n:
            nxt = fetch(s + SQUARE_TOKENS)
        yield cur


class SquareSums:
    """Running sums of a unit's H = sum Xq^T Xq and, given its weights W, of
    G = W (C - H) = sum ((X - Xq) W^T)^T Xq ([out, in]; C = X^T Xq is never formed: X - Xq is
    taken elementwise, so there is no cancellation to guard against in float64). Added in place
    (addmm_), SQUARE_TOKENS tokens at a time. tf32: the products in TF32 on CUDA
    (sequential.py says why)."""

    def __init__(self, tf32: bool = False):
        self.tf32, self.h, self.g, self.count = tf32, None, None, 0

    def add(self, x: torch.Tensor, scale: torch.Tensor | None, x0: torch.Tensor | None = None,
            w: torch.Tensor | None = None, on=None) -> None:
        """x: the unit's input [tokens, in]; Xq = its NVFP4 rounding with `scale` (None: x);
        x0: the original model's input for the same tokens (None: x); w: the unit's weights [out, in],
        or its members' stacked by rows (a list; any float dtype; None: H only); on: brings a piece
        of x or x0 to the device of the sums (x and x0 may wait in host memory: sequential.Fit.on;
        None: they are there already)."""
        prec = torch.get_float32_matmul_precision()
        try:
            for xs, x0s in pieces(x, x0, on):
                xs = xs.float()
                if self.tf32 and xs.is_cuda:  # where the products run (x itself may wait in host memory)
                    torch.set_float32_matmul_precision("high")
                xq = xs if scale is None else fake_quant_rows(fake_quant_nvfp4, xs, scale, QUANT_ELEMENTS)
                if self.h is None:
                    self.h = torch.zeros(xq.shape[1], xq.shape[1], dtype=torch.float32, device=xq.device)
                self.h.addmm_(xq.T, xq)
                if w is None:
                    continue
                if x0s is None:
                    d = torch.sub(xs, xq)  # X - Xq (not in place: xs may be X's own storage)
                else:  # X0 - Xq in a float32 copy of X0's piece (the piece itself stays as it came)
                    del xs
                    d = x0s.to(torch.float32, copy=True).sub_(xq)
                if self.g is None:
                    self.g = torch.zeros(stacked_rows(w), xq.shape[1], dtype=torch.float32, device=xq.device)
                for r0, wp in row_pieces(w, W_PIECE_ELEMENTS):  # G += ((X - Xq) W^T)^T Xq, W's rows a piece at a time
                    e = d @ wp.float().T
                    self.g[r0:r0 + wp.shape[0]].addmm_(e.T, xq)
                    del e
                del d
        finally:
            torch.set_float32_matmul_precision(prec)
        self.count += x.shape[0]


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
    With act_aware also G = mean W (x_orig - x_q)^T x_q per unit, W its members' weights stacked
    by rows (for the activation-error correction; gs holds it under each member's name).
    Also keeps the first `keep_batches` input_ids batches (for the sensitivity pass)."""

    sums = {n: SquareSums() for n in linears}
    quantized_input = quantized_input or act_aware
    kept = []
    handles = []

    def hook_for(name, mods):
        scale = unit_input_scale(mods) if quantized_input else None

        def pre(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            # W in float32 for this call only: held for the whole pass it would be a float32 copy of the model
            sums[name].add(x, scale, w=[m.weight.detach() for m in mods] if act_aware else None)
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
    hs = {n: None for n in linears}
    gs = {n: None for n in linears}
    for n, s in sums.items():  # out of place (the hook ran in inference mode), each sum let go of once divided
        if s.h is not None:
            hs[n], s.h = s.h / max(s.count, 1), None
        if s.g is not None:
            gs[n], s.g = s.g / max(s.count, 1), None
    for unit in units:
        for n in unit[1:]:
            hs[n], gs[n] = hs[unit[0]], gs[unit[0]]
    if act_aware:
        return hs, kept, gs
    return hs, kept
