"""A model over one GPU's budget, spread over two GPUs (loading.gpu_spread), at 8B shapes.

    python3 benchmarks/multi_gpu.py --out DIR     # on a 2-GPU device machine; carry .bench and the wheels

1. DeepSeek-R1-Distill-Llama-8B's shapes with random weights (gpu_8b.write_checkpoint), 16 GB bf16.
2. The payload, default recipe, 128 x 512 calibration, both GPUs visible and a budget of 10 GiB
   per GPU (job field gpu_memory_budget): the weights do not fit one GPU's budget, so accelerate
   places the layers over both and ModelOpt calibrates through its hooks.
3. The same job on one GPU without a budget (CUDA_VISIBLE_DEVICES=0): the reference.
4. Both checkpoints through launcher.verify, and compared tensor by tensor (gpu_8b.compare).
Writes DIR/multi_gpu.json and DIR/multi_gpu.md.
"""
import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_8b import BENCH, R1_8B_CONFIG, compare, run_logged, write_checkpoint  # noqa: E402

GiB = 1 << 30


def payload(model_dir: Path, out: Path, log_dir: Path, name: str, budget: int | None, env: dict) -> dict:
    job = {"model_dir": str(model_dir), "output_dir": str(out), "recipe": "default",
           "calibration": {"source": str(BENCH / "calib.txt"), "samples": 128, "seq_len": 512},
           "gpu_memory_budget": budget}
    jp = log_dir / f"job-{name}.json"
    jp.write_text(json.dumps(job, indent=2))
    rc, wall, stdout = run_logged([sys.executable, "-m", "container_payload", "quantize", str(jp)],
                                  log_dir / f"{name}.log", env=env)
    row = {"rc": rc, "wall_s": round(wall, 1)}
    if rc != 0:
        row["tail"] = stdout[-2000:]
        return row
    r = json.loads((out / "result.json").read_text())
    from launcher.verify import verify_checkpoint

    report = verify_checkpoint(out)
    row.update(loader=r["loader"], gpus=r.get("gpus"), timings={k: v for k, v in r["timings"].items()
                                                               if k != "timeline"},
               memory=r["memory"], verify_problems=[str(p) for p in report.problems[:5]])
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/multigpu")
    ap.add_argument("--budget-gib", type=float, default=10.0)
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    res = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
           "budget_per_gpu_bytes": int(args.budget_gib * GiB)}
    model_dir = work / "r1-8b"
    res["checkpoint"] = write_checkpoint(model_dir, R1_8B_CONFIG, "cuda", 5 * GiB)
    base = {**os.environ, "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{REPO}", "HF_HUB_OFFLINE": "1"}
    res["spread"] = payload(model_dir, work / "out-spread", out, "spread", res["budget_per_gpu_bytes"], base)
    res["one_gpu"] = payload(model_dir, work / "out-one", out, "one-gpu", None,
                             {**base, "CUDA_VISIBLE_DEVICES": "0"})
    if res["spread"]["rc"] == 0 and res["one_gpu"]["rc"] == 0:
        res["compare"] = compare(work / "out-spread", work / "out-one")
    (out / "multi_gpu.json").write_text(json.dumps(res, indent=2))
    s, o = res["spread"], res["one_gpu"]
    lines = ["# An 8B model over one GPU's budget, spread over two GPUs", "",
             f"GPUs: {', '.join(res['gpus'])}; budget {args.budget_gib} GiB per GPU; 16 GB of bf16 weights.", "",
             "| run | loader | wall s | GPU peak per device (GiB) | verify |", "|---|---|---|---|---|"]
    for name, row in (("spread over 2 GPUs, 10 GiB each", s), ("one GPU, no budget", o)):
        mem = row.get("memory", {})
        peaks = mem.get("gpu_peak_bytes_per_device") or [mem.get("gpu_peak_bytes", 0)]
        lines.append(f"| {name} | {row.get('loader', row.get('tail', '')[-200:])} | {row['wall_s']} | "
                     f"{', '.join(f'{p / GiB:.1f}' for p in peaks)} | "
                     f"{'ok' if row.get('rc') == 0 and not row.get('verify_problems') else row.get('verify_problems')} |")
    if "compare" in res:
        c = res["compare"]
        lines += ["", f"Tensors identical by kind: {c['identical']}; different: {c['different']}; "
                      f"input_scale max relative difference {c['input_scale_max_rel_diff']:.2e}."]
    (out / "multi_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if s["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
