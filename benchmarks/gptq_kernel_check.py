"""On a CUDA machine: the Triton GPTQ block kernel against the torch step it replaces, for both
block-scale choices (gptq.scales=search and =hessian), on random problems with an outlier channel,
plus the time per call at an 8B down_proj-like shape. Prints one JSON line; exits 1 on a mismatch.

    python3 benchmarks/gptq_kernel_check.py
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from container_payload.steps import fast_gptq as fg  # noqa: E402


def problem(seed, out, n, tokens=2048):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, device="cuda")
    x[:, 5] *= 8
    w = torch.randn(out, n, generator=g, device="cuda") * 0.05
    return w, x.T @ x / tokens, w.abs().max() / 2688


def main() -> int:
    res, ok = {"device": torch.cuda.get_device_name()}, True
    for hessian in (False, True):
        agree = []
        for seed in range(3):
            w, h, ws2 = problem(seed, 256, 512)
            qt, st = fg.gptq_nvfp4_fast(w.clone(), h, ws2, use_triton=True, hessian_scales=hessian)
            qc, sc = fg.gptq_nvfp4_fast(w.clone(), h, ws2, use_triton=False, hessian_scales=hessian)
            agree.append(min((st == sc).float().mean().item(), torch.isclose(qt, qc, rtol=1e-5, atol=0).float().mean().item()))
        res[f"agree_{'hessian' if hessian else 'search'}"] = min(agree)
        ok = ok and min(agree) > 0.99 and not fg._TRITON_FAILED
    w, h, ws2 = problem(0, 4096, 14336, tokens=4096)
    for hessian in (False, True):
        for kernel in (True, False):
            fg.gptq_nvfp4_fast(w[:64].clone(), h, ws2, use_triton=kernel, hessian_scales=hessian)
            torch.cuda.synchronize()
            t = time.time()
            fg.gptq_nvfp4_fast(w.clone(), h, ws2, use_triton=kernel, hessian_scales=hessian)
            torch.cuda.synchronize()
            res[f"s_4096x14336_{'hessian' if hessian else 'search'}_{'triton' if kernel else 'torch'}"] = round(time.time() - t, 3)
    res["triton_failed"] = fg._TRITON_FAILED
    print(json.dumps(res), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
