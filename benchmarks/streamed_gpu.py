"""GPU benchmark of issue 15: a recipe whole vs layer-streamed at 8B shapes.

    python3 benchmarks/gpu_8b.py prepare --wheels            # once, on the CPU: .bench/tokenizer, calib.txt, whl/
    python3 benchmarks/streamed_gpu.py --out benchmarks/results [--recipe R] [--baseline-recipe default] [--tiny]   # on the GPU machine

On the device machine (carry [".bench"], 39 MB):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/whl/*.whl
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONPATH=/tmp/site:$PWD python3 benchmarks/streamed_gpu.py \
        --recipe smooth-gptq-seq-mp --out $OUT --work /tmp/sg
Issue 20's call adds `--streamed-first --gpu-fraction 0.10 --fallback-gpu-cap-gib 2.5 --host-cap-gib 16`,
and `--also-gpu-cap-gib 2.5` to see in the same call what the 10% cap costs in time against a looser one.
The report is written again after each run, so a call stopped at its time limit still brings back
what was measured.

1. a random-weight checkpoint with Llama-3-8B shapes (gpu_8b.write_checkpoint: DeepSeek-R1-Distill-
   Llama-8B's config, 16 GB of bf16), written on the GPU;
2. the payload in whole mode, uncapped (the reference: whole cannot run under the cap; after 3 with
   --streamed-first);
3. the payload in streamed mode with GPU memory capped at --gpu-fraction (default 10%) of the
   model's bf16 bytes (torch.cuda.set_per_process_memory_fraction, set before the payload runs)
   and host RSS checked against --host-cap-gib (ru_maxrss after the run; Linux has no RSS limit);
3a. with --also-gpu-cap-gib X, streamed again under X GiB whatever happened (the cap's cost in time);
3b. with --baseline-recipe R, R in whole mode on the same checkpoint and job (only the recipe
   changed): the recipe's wall time over R's, in the same call;
4. the two checkpoints compared tensor by tensor (tests/tools/compare_ckpt.py: weights and
   scales identical, input_scale within 1%; the count of bit-identical input_scales is reported);
5. DIR/streamed-vs-whole-gpu_8b[-RECIPE].json and .md: wall times, GPU and host peaks, the
   comparison (no suffix for the default recipe).

Both runs use the same fixed calibration batches (batch size 4), so their inputs match.
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests" / "tools")]

import gpu_8b  # noqa: E402
from compare_ckpt import differences, tensors  # noqa: E402

# Runs the payload after capping this process's share of GPU 0 (an argument: bytes).
CAPPED = ("import sys, runpy, torch; cap = int(sys.argv.pop(1)); "
          "torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory, 0); "
          "runpy.run_module('container_payload.quantize', run_name='__main__')")


def payload(work: Path, model_dir: Path, name: str, mode: str, args, cap: int | None, out_dir: Path,
            recipe: str | None = None) -> dict:
    out = work / f"out-{name}"
    job = {"model_dir": str(model_dir), "output_dir": str(out), "format": "nvfp4", "recipe": recipe or args.recipe,
           "recipe_params": {} if recipe else dict(p.split("=", 1) for p in args.recipe_param),
           "kv_cache": "none", "device": "auto", "mode": mode,
           "calibration": {"source": str(gpu_8b.BENCH / "calib.txt"), "samples": args.samples,
                           "seq_len": args.seq_len, "batch_size": 4}}
    job_path = work / f"job-{name}.json"
    job_path.write_text(json.dumps(job, indent=2))
    gpu_8b.evict(list(model_dir.glob("*.safetensors")), everything=False)
    cmd = [sys.executable, "-m", "container_payload.quantize", str(job_path)] if cap is None else \
        [sys.executable, "-c", CAPPED, str(cap), str(job_path)]
    gpu_8b.log(f"{name}: start ({mode}, GPU cap {'none' if cap is None else f'{cap / 2**30:.2f} GiB'})")
    rc, wall, stdout = gpu_8b.run_logged(cmd, out_dir / f"{stem(args)}-{name}.log")
    result = json.loads((out / "result.json").read_text()) if rc == 0 else {}
    row = {"rc": rc, "wall_s": round(wall, 3), "mode": result.get("mode", "whole"), "gpu_cap_bytes": cap,
           **result.get("memory", {}), "timings": result.get("timings", {}), "out": str(out),
           "steps_applied": result.get("steps_applied"), "layer_loop_s": result.get("streamed", {}).get("layer_loop_s"),
           "gpu_peak_bytes_by_phase": result.get("streamed", {}).get("gpu_peak_bytes"),
           "gpu_alloc_retries_by_phase": result.get("streamed", {}).get("gpu_alloc_retries")}
    gpu_8b.log(f"{name}: rc {rc}, wall {wall:.1f} s, memory {result.get('memory')}")
    if rc != 0:
        gpu_8b.log(stdout[-3000:])
        # the payload's one-line error (an "error" event): where a capped run stopped
        lines = stdout.splitlines()
        message = next((json.loads(line.split(" ", 1)[1]).get("message") for line in reversed(lines)
                        if line.startswith("@@spark-nvfp4 ") and '"error"' in line), None)
        frames = [line.strip() for line in lines if line.strip().startswith('File "') and "container_payload" in line]
        row["error"] = f"{message} (at {frames[-1]})" if frames else message
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--work", default="/tmp/streamed-gpu")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--recipe", default="default", help="a recipe that streams (memory_plan.STREAMED_RECIPES)")
    ap.add_argument("--gpu-fraction", type=float, default=0.10, help="GPU cap as a fraction of the bf16 model")
    ap.add_argument("--gpu-cap-gib", type=float, default=None, help="the GPU cap in GiB (instead of --gpu-fraction)")
    ap.add_argument("--host-cap-gib", type=float, default=12.0, help="host RSS the streamed run must stay under")
    ap.add_argument("--fallback-gpu-cap-gib", type=float, nargs="*", default=None,
                    help="when the capped streamed run fails, run it again under these caps in turn until one "
                         "completes (0: uncapped; default: uncapped)")
    ap.add_argument("--also-gpu-cap-gib", type=float, nargs="*", default=[],
                    help="after the runs above, run streamed again under each of these caps, whatever happened: "
                         "what the cap's size costs in time, beside the same code's capped run")
    ap.add_argument("--max-wall-ratio", type=float, default=1.3, help="streamed wall time over whole's, at most")
    ap.add_argument("--baseline-recipe", default=None,
                    help="also run this recipe whole on the same checkpoint (e.g. default): the recipe's cost in the same call")
    ap.add_argument("--recipe-param", action="append", default=[], metavar="STEP.PARAM=VALUE",
                    help="a parameter of --recipe (as launcher quantize --recipe-param), not of the baseline")
    ap.add_argument("--streamed-first", action="store_true",
                    help="run the capped streamed run before whole (a call short of time keeps the capped run)")
    ap.add_argument("--tiny", action="store_true", help="2 narrow layers on the CPU: a smoke test of the script")
    args = ap.parse_args(argv)
    import shutil

    import torch

    out_dir, work = Path(args.out), Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cuda = torch.cuda.is_available()
    cfg = dict(gpu_8b.R1_8B_CONFIG)
    if args.tiny:
        cfg.update(gpu_8b.TINY_OVERRIDES)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gpu_8b.BENCH / "tokenizer")
    cfg["bos_token_id"], cfg["eos_token_id"] = tok.bos_token_id, tok.eos_token_id
    model_dir = work / "llama-8b-random"
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "card": gpu_8b.card(), "recipe": args.recipe, "samples": args.samples,
           "seq_len": args.seq_len, "tiny": args.tiny}
    res["checkpoint"] = gpu_8b.write_checkpoint(model_dir, cfg, "cuda" if cuda else "cpu",
                                                shard_bytes=4_976_000_000 if not args.tiny else 40_000_000)
    cap = (int(args.gpu_cap_gib * 2**30) if args.gpu_cap_gib else int(res["checkpoint"]["bytes"] * args.gpu_fraction)) \
        if cuda else None
    # Software warm for both runs (the first payload of a fresh machine would otherwise pay the
    # libraries' cold start alone): what both import, imported once; then the checkpoint's pages
    # are evicted before each run (payload()).
    import subprocess
    subprocess.run([sys.executable, "-c", "import torch, transformers.models.llama.modeling_llama, "
                    "modelopt.torch.quantization, modelopt.torch.export, accelerate"
                    + ("; torch.zeros(1, device='cuda')" if cuda else "")], check=True)

    def save():  # after every run: a call stopped at its time limit still has the runs before
        (out_dir / f"{stem(args)}.json").write_text(json.dumps(res, indent=2, default=str))
        (out_dir / f"{stem(args)}.md").write_text(render(res, args))

    for run in (("streamed", "whole") if args.streamed_first else ("whole", "streamed")):
        res[run] = payload(work, model_dir, run, run, args, cap if run == "streamed" else None, out_dir)
        save()
    if res["streamed"]["rc"] != 0 and cap is not None:  # what it needs, then: the fallback caps in turn, or uncapped
        res["fallbacks"] = []
        for gib in args.fallback_gpu_cap_gib or [0]:
            fallback = int(gib * 2**30) or None
            row = payload(work, model_dir, "streamed-uncapped" if fallback is None else f"streamed-{gib:g}gib",
                          "streamed", args, fallback, out_dir)
            res["fallbacks"].append(row)
            res["streamed_uncapped"] = row
            save()
            if row["rc"] == 0:
                break
    for gib in args.also_gpu_cap_gib:
        res.setdefault("also", []).append(payload(work, model_dir, f"streamed-also-{gib:g}gib", "streamed", args,
                                                  int(gib * 2**30) if cuda else None, out_dir))
        save()
    if args.baseline_recipe:
        res["baseline"] = payload(work, model_dir, "baseline", "whole", args, None, out_dir, recipe=args.baseline_recipe)
        res["baseline_ratio"] = round(res["whole"]["wall_s"] / res["baseline"]["wall_s"], 3) \
            if res["whole"]["rc"] == 0 and res["baseline"]["rc"] == 0 else None
    streamed = res["streamed"] if res["streamed"]["rc"] == 0 else res.get("streamed_uncapped", {})
    if res["whole"]["rc"] == 0 and streamed.get("rc") == 0:
        a, b = Path(res["whole"]["out"]), Path(streamed["out"])
        ta, tb = tensors(a), tensors(b)
        res["comparison"] = {"problems": differences(a, b), "tensors": len(ta),
                             "bit_identical": sum(k in tb and ta[k] == tb[k] for k in ta)}
    host_peak = streamed.get("host_rss_peak_bytes", 0)
    res["host_cap_ok"] = bool(host_peak) and host_peak <= args.host_cap_gib * 2**30
    res["wall_ratio"] = round(streamed["wall_s"] / res["whole"]["wall_s"], 3) if streamed.get("rc") == 0 else None
    save()
    gpu_8b.log(f"comparison: {res.get('comparison')}; host cap ok: {res['host_cap_ok']}")
    ok = res.get("comparison", {}).get("problems") == [] and res["host_cap_ok"] \
        and res["wall_ratio"] is not None and res["wall_ratio"] <= args.max_wall_ratio
    return 0 if ok else 1


def stem(args) -> str:
    params = "".join("-" + re.sub(r"[^A-Za-z0-9]+", "-", p) for p in args.recipe_param)
    return "streamed-vs-whole-gpu_8b" + ("" if args.recipe == "default" else f"-{args.recipe}") + params \
        + ("-tiny" if args.tiny else "")


def _gib_by_phase(peaks: dict | None) -> str:
    return ", ".join(f"{k} {v / 2**30:.2f}" for k, v in peaks.items()) if peaks else "not recorded (CPU)"


def render(res: dict, args) -> str:
    g = lambda b: f"{(b or 0) / 2**30:.2f} GiB"  # noqa: E731
    not_yet = {"rc": "not run yet", "wall_s": 0.0, "gpu_cap_bytes": None}
    w, u, b = res.get("whole", not_yet), res.get("streamed_uncapped"), res.get("baseline")
    s = res.get("streamed", not_yet)
    cmp_ = res.get("comparison", {})
    return "\n".join([
        f"# Whole vs layer-streamed, recipe {args.recipe}{''.join(' ' + p for p in args.recipe_param)} ({res['card'].get('gpu', 'cpu')}, {res['date']})", "",
        f"Random-weight Llama-3-8B shapes ({g(res['checkpoint']['bytes'])} bf16), {args.samples} x "
        f"{args.seq_len} calibration tokens, batch 4. Streamed: GPU capped at {g(s['gpu_cap_bytes'])} "
        f"({(s['gpu_cap_bytes'] or 0) / res['checkpoint']['bytes']:.0%} of the bf16 model), host RSS cap "
        f"{args.host_cap_gib} GiB.", "",
        "| mode | wall | peak GPU | peak host RSS |", "|---|---|---|---|",
        f"| whole (uncapped) | {w['wall_s']:.1f} s | {g(w.get('gpu_peak_bytes'))} | {g(w.get('host_rss_peak_bytes'))} |",
        f"| streamed (capped; rc {s['rc']}) | {s['wall_s']:.1f} s | {g(s.get('gpu_peak_bytes'))} | "
        f"{g(s.get('host_rss_peak_bytes'))} |",
        *[f"| streamed ({'uncapped' if not f.get('gpu_cap_bytes') else 'capped at ' + g(f['gpu_cap_bytes'])}, after "
          f"the capped run failed; rc {f['rc']}) | {f['wall_s']:.1f} s | {g(f.get('gpu_peak_bytes'))} | "
          f"{g(f.get('host_rss_peak_bytes'))} |" for f in res.get("fallbacks", [u] if u else [])],
        *[f"| streamed (capped at {g(a['gpu_cap_bytes'])}, for comparison; rc {a['rc']}) | {a['wall_s']:.1f} s | "
          f"{g(a.get('gpu_peak_bytes'))} | {g(a.get('host_rss_peak_bytes'))} |" for a in res.get("also", [])],
        *([f"| whole, recipe {args.baseline_recipe} (the baseline; rc {b['rc']}) | {b['wall_s']:.1f} s | "
           f"{g(b.get('gpu_peak_bytes'))} | {g(b.get('host_rss_peak_bytes'))} |"] if b else []), "",
        f"Streamed wall time over whole's: {res.get('wall_ratio', 'not reached')} (at most {args.max_wall_ratio} asked).", "",
        *([f"Whole wall time over the baseline's ({args.baseline_recipe}): {res.get('baseline_ratio')}.", ""] if b else []),
        f"Comparison (whole vs the streamed run that completed): {cmp_.get('bit_identical')} of "
        f"{cmp_.get('tensors')} tensors bit-identical; "
        f"problems: {cmp_.get('problems') or 'none'}. Host cap kept: {res.get('host_cap_ok', 'not reached')}.", "",
        *[f"Where the run capped at {g(f['gpu_cap_bytes'])} stopped: {f.get('error')}" for f in [s, *res.get("fallbacks", [])]
          if f["rc"] != 0 and f.get("gpu_cap_bytes")], "",
        f"Steps (streamed): {(u or s).get('steps_applied')}; layer loop: {(u or s).get('layer_loop_s')}.", "",
        f"GPU peak by phase (streamed, GiB): {_gib_by_phase((u or s).get('gpu_peak_bytes_by_phase'))}.", "",
        f"Allocator retries by phase (streamed; each a cache flush and a device synchronize, when an "
        f"allocation would pass the cap): {(u or s).get('gpu_alloc_retries_by_phase')}.", "",
        *[f"Under {g(a['gpu_cap_bytes'])} (for comparison): layer loop {a.get('layer_loop_s')}; GPU peak by phase "
          f"{_gib_by_phase(a.get('gpu_peak_bytes_by_phase'))}; allocator retries {a.get('gpu_alloc_retries_by_phase')}."
          for a in res.get("also", [])], ""])


if __name__ == "__main__":
    sys.exit(main())
