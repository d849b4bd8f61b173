"""How our own passes compute a Linear, and swapping a module's forward for a while.

Why float32 on the CPU: a bf16 matrix product on a CPU without bf16 matrix instructions (the
AVX2 machines the stand-in runs on) went 5x slower than the same product in float32 (measured:
one SmolLM2 layer plus lm_head on 2048 tokens, 15.8 s in bf16, 3.1 s with its Linears in float32).
A bf16 product accumulates in float32 and rounds its output to bf16 (on the GPU and in oneDNN), so
computing in float32 and rounding the output to bf16 gives the same values up to the order of the
sums, but not bit for bit: a largest activation can land one bf16 step away. So ModelOpt's own
calibration keeps the model's bf16 products (its input_scale must match ModelOpt run directly),
and only our passes use float32 (smoothing statistics, mixed-precision ranking, the sequential
GPTQ streams). Tuning.cpu_float32=false turns it off for a run (quantize.run: `cpu_float32(False)`).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

_HALF = (torch.bfloat16, torch.float16)


# on unless a run turns it off (cpu_float32): scoped to that run, not a setting of the module
_CPU_FLOAT32 = ContextVar("cpu_float32", default=True)


@contextmanager
def cpu_float32(on: bool):
    """Inside the block, our passes compute bf16 CPU products in float32 (on) or as they are."""
    token = _CPU_FLOAT32.set(on)
    try:
        yield
    finally:
        _CPU_FLOAT32.reset(token)


def _upcast(x: torch.Tensor) -> bool:
    return _CPU_FLOAT32.get() and x.device.type == "cpu" and x.dtype in _HALF


_F_LINEAR = nn.functional.linear


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """nn.functional.linear, computed in float32 for bf16/fp16 CPU tensors (output in x's dtype)."""
    if _upcast(x):
        return _F_LINEAR(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    return _F_LINEAR(x, w, b)


def weight_for_linear(w: torch.Tensor) -> torch.Tensor:
    """`w` as `linear` computes with it: float32 where it upcasts (one copy for many products
    with the same weight, instead of one per call), else `w` itself."""
    return w.float() if _upcast(w) else w


def patch_forward(m: nn.Module, fn):
    """Make m.forward = fn until the returned undo is called. Patches stack: undo them in reverse
    order (each restores what was there before it, another patch or the class's forward)."""
    had = "forward" in m.__dict__
    prev = m.__dict__.get("forward")
    m.forward = fn

    def undo():
        if had:
            m.forward = prev
        else:
            del m.forward
    return undo


@contextmanager
def float32_linears(module: nn.Module):
    """Every nn.Linear in module computed by `linear` (float32 on the CPU) inside the block. Only
    where quantizers are off or absent: the patched forward does not call them."""
    undo = []
    for m in module.modules():
        if isinstance(m, nn.Linear) and _upcast(m.weight):
            undo.append(patch_forward(m, lambda x, *a, _m=m, **k: linear(x, _m.weight, _m.bias)))
    try:
        yield
    finally:
        for u in reversed(undo):
            u()
