"""The payload on the stacks of NVIDIA's real images, on a GPU (docs/decisions.md, issue 12's measured failure).

NVIDIA's 2025 TensorRT-LLM images carry ModelOpt 0.37 and transformers 4.57; the payload once
failed there at its first import (transformers.initialization, on the direct-load path every
GPU run takes). This runs the payload at DeepSeek-R1-Distill-Llama-8B's shapes (random
weights, benchmarks/gpu_8b.py's checkpoint) on:

  image-2025   ModelOpt 0.37.0 + transformers 4.57.1 (the image as it ships: default recipe)
  derived      ModelOpt 0.47.0 + transformers 4.57.1 (what `launcher` derives from it)

Each stack is a folder of wheels installed with --target and put first on PYTHONPATH; torch,
numpy and the rest are the machine's own, as in the image. Every checkpoint goes through
launcher.verify; the two default-recipe checkpoints are compared tensor by tensor. Then
`smooth-gptq-seq-mp` runs on the derived stack on the first 4 layers (same widths).

    python3 benchmarks/gpu_8b.py prepare                    # here, with transformers 4.x (readable by both)
    python3 benchmarks/real_stack_gpu.py --out DIR          # device: carry .bench and .whl-real
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

STACKS = {"image-2025": ["whl-common", "whl-old"], "derived": ["whl-common", "whl-mid"]}


def install(name: str, wheels: Path) -> Path:
    target = Path(f"/tmp/stack-{name}")
    files = [str(w) for part in STACKS[name] for w in sorted((wheels / part).glob("*.whl"))]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), *files], check=True)
    return target


def run_payload(stack: Path, job: dict, work: Path, name: str, log_dir: Path) -> dict:
    from gpu_8b import run_logged

    jp = work / f"job-{name}.json"
    jp.write_text(json.dumps(job, indent=2))
    env = {**os.environ, "PYTHONPATH": f"{stack}:{REPO}"}
    rc, wall, stdout = run_logged([sys.executable, "-m", "container_payload.quantize", str(jp)],
                                  log_dir / f"{name}.log", env=env)
    out = Path(job["output_dir"])
    r = json.loads((out / "result.json").read_text()) if rc == 0 else {}
    row = {"rc": rc, "wall_s": round(wall, 1), "versions": r.get("versions"), "loader": r.get("loader"),
           "timings": {k: v for k, v in r.get("timings", {}).items() if k != "timeline"},
           "gpu_peak_bytes": r.get("memory", {}).get("gpu_peak_bytes")}
    if rc != 0:
        row["tail"] = stdout[-1500:]
        return row
    from launcher.verify import verify_checkpoint

    report = verify_checkpoint(out)
    row["verify_problems"] = [str(p) for p in report.problems][:5]
    return row


def main() -> int:
    import torch

    from gpu_8b import BENCH, R1_8B_CONFIG, card, compare, log, write_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--wheels", default=str(REPO / ".whl-real"))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--work", default="/tmp/realstack")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    res = {"card": card(), "samples": args.samples, "seq_len": args.seq_len, "runs": {}}

    def save():
        (out / "real_stack_gpu.json").write_text(json.dumps(res, indent=2, default=str))

    stacks = {name: install(name, Path(args.wheels)) for name in STACKS}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BENCH / "tokenizer")
    cfg = dict(R1_8B_CONFIG, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    full, short = work / "r1-8b-random", work / "r1-8b-4layers"
    t = time.time()
    write_checkpoint(full, cfg, "cuda", shard_bytes=4_976_000_000)
    write_checkpoint(short, dict(cfg, num_hidden_layers=4), "cuda", shard_bytes=4_976_000_000)
    for d in (full, short):  # the tokenizer's files as they are: re-saved by 5.x, 4.57 could not read them
        for f in (BENCH / "tokenizer").iterdir():
            shutil.copyfile(f, d / f.name)
    res["checkpoints_s"] = round(time.time() - t, 1)
    log(f"checkpoints written in {res['checkpoints_s']} s")
    calib = {"source": str(BENCH / "calib.txt"), "samples": args.samples, "seq_len": args.seq_len,
             "batch_size": "auto"}
    plan = [("image-2025/default", "image-2025", full, "default"),
            ("derived/default", "derived", full, "default"),
            ("derived/smooth-gptq-seq-mp (4 layers)", "derived", short, "smooth-gptq-seq-mp")]
    for name, stack, model_dir, recipe in plan:
        slug = name.replace("/", "_").replace(" ", "_").replace("(", "").replace(")", "")
        job = {"model_dir": str(model_dir), "output_dir": str(work / f"out-{slug}"), "format": "nvfp4",
               "recipe": recipe, "kv_cache": "none", "device": "auto", "calibration": calib}
        torch.cuda.empty_cache()
        res["runs"][name] = run_payload(stacks[stack], job, work, slug, out)
        log(f"{name}: {json.dumps(res['runs'][name])[:600]}")
        save()
    if all(res["runs"][k]["rc"] == 0 for k in ("image-2025/default", "derived/default")):
        cmp_ = compare(work / "out-image-2025_default", work / "out-derived_default")
        res["compare_0.37_vs_0.47"] = {k: cmp_[k] for k in ("byte_identical", "identical", "different",
                                                           "input_scale_max_rel_diff", "only_a", "only_b",
                                                           "different_examples")}
        log(f"compare: {res['compare_0.37_vs_0.47']}")
    save()
    return 0 if all(r["rc"] == 0 and not r.get("verify_problems") for r in res["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
