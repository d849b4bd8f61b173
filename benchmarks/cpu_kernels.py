"""The CPU path's two kinds of work at the embedded model's shapes, per CPU second (so that a shared
host's load does not enter): matrix products in float32 against bf16, and the NVFP4 input emulation
(fake_quant_nvfp4) as it was before the float32 E2M1 rounding (emulate._e2m1_round_f32) and now.

    .venv-mo/bin/python benchmarks/cpu_kernels.py [--threads 1]

bf16 products are what the model computes; our own passes (smoothing statistics, ranking, the
sequential GPTQ streams) compute them in float32 on a CPU (linear_compute.py), because on AVX2-only
CPUs bf16 was 5x slower. On a CPU with avx512_bf16 or AMX this shows the opposite.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from container_payload.numerics.emulate import BLOCK, fake_quant_nvfp4, fp8_e4m3  # noqa: E402


def fake_quant_before(x, input_scale):
    """fake_quant_nvfp4 as it was before (frexp / exp2 E2M1 ladder, a where on the whole tensor)."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    step = fp8_e4m3((amax / 6.0) / input_scale) * input_scale
    safe = torch.where(step > 0, step, torch.ones_like(step))
    y = xb / safe
    a = y.abs().clamp_max(6.0)
    _, e = torch.frexp(a)
    s = torch.exp2(((e - 1).clamp_min(0) - 1).to(a.dtype))
    q = (torch.round(a / s) * s).clamp_max(6.0)
    q = torch.where(step > 0, torch.where(y < 0, -q, q), torch.zeros_like(xb))
    return (q * step).reshape(shape)


def cpu_time(f, n: int) -> float:
    f()
    c = time.process_time()
    for _ in range(n):
        f()
    return (time.process_time() - c) / n


def flags() -> str:
    info = Path("/proc/cpuinfo").read_text()
    have = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU flags: {flags()}")
    print("| product (tokens x in -> out) | float32 GF per CPU s | bf16 GF per CPU s | bf16 / float32 |")
    print("|---|---|---|---|")
    t = args.tokens
    for k, n in ((576, 1536), (1536, 576), (576, 576), (576, 49152)):
        a, w = torch.randn(t, k), torch.randn(n, k)
        fl = 2 * t * k * n
        f32 = fl / cpu_time(lambda: torch.nn.functional.linear(a, w), 3) / 1e9
        ab, wb = a.bfloat16(), w.bfloat16()
        b16 = fl / cpu_time(lambda: torch.nn.functional.linear(ab, wb), 3) / 1e9
        print(f"| {t} x {k} -> {n} | {f32:.1f} | {b16:.1f} | {b16 / f32:.2f} |")
    x = (torch.randn(t, 1536) * torch.rand(1536) * 3).bfloat16()
    s = torch.tensor(0.02)
    same = torch.equal(fake_quant_nvfp4(x, s).view(torch.int32), fake_quant_before(x, s).view(torch.int32))
    before, now = cpu_time(lambda: fake_quant_before(x, s), 5), cpu_time(lambda: fake_quant_nvfp4(x, s), 5)
    print(f"\nfake_quant_nvfp4 on {t} x 1536: before {before * 1e3:.1f} ms, now {now * 1e3:.1f} ms per CPU "
          f"({before / now:.1f}x), bit-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
