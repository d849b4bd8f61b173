"""Recipes side by side on the embedded model (SmolLM2-135M-Instruct, bf16).

    .venv-mo/bin/python benchmarks/recipes.py [--samples 128 --seq-len 512 --eval-tokens 4096]
        [--recipes default,smooth,gptq-aa-mp] [--no-llmc] [--device cpu|cuda] [--out build/bench-recipes]

Each recipe is a real payload run (`python -m container_payload.quantize JOB.json`, the
same calibration windows for all: the first N x L tokens of brown-calibration), scored by
the payload's evaluator (`python -m container_payload.evaluate`, exact float32 engine
emulation) on brown-heldout and wiki-heldout against the bf16 model. The llm-compressor
column runs oneshot(QuantizationModifier(targets="Linear", scheme="NVFP4",
ignore=["lm_head"])) on the same token windows in its own venv (.venv-llmc, or
$SPARK_NVFP4_LLMC_PYTHON). Writes benchmarks/results/recipes-table.md and .json.

Quantization time is the payload's quantize_s (calibration + our refine step), peak memory
the payload process's peak RSS; size is the checkpoint folder's safetensors + configs.
"""
from __future__ import annotations

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
from launcher.common import paths  # noqa: E402 - the launcher's home ($SPARK_NVFP4_HOME), stdlib only

ASSETS = paths.assets_dir()
GGUF = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIB = ASSETS / "text" / "brown-calibration.txt"
HELDOUT = {"brown": ASSETS / "text" / "brown-heldout.txt", "wiki": ASSETS / "text" / "wiki-heldout.txt"}
MO_PY = Path(sys.executable)
LLMC_PY = Path(os.environ.get("SPARK_NVFP4_LLMC_PYTHON", REPO / ".venv-llmc" / "bin" / "python"))
# Every row runs on the same calibration windows; ModelOpt's search presets need CUDA/Triton.
CPU_RECIPES = "default,smooth-gptq-seq-mp,smooth,smooth-gptq-aa-mp"
GPU_RECIPES = CPU_RECIPES + ",awq-lite,awq-clip,mse,four-over-six"
# The repo first, then whatever PYTHONPATH the caller set (a --target site of carried wheels on the GPU).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
       "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}

LLMC_SCRIPT = r'''
import json, sys, time, resource
sys.path.insert(0, sys.argv[1])
from container_payload.pipelines.calib_data import token_windows
from transformers import AutoTokenizer
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
model_dir, calib, n, L, out = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
tok = AutoTokenizer.from_pretrained(model_dir)
win = token_windows(tok, open(calib, encoding="utf-8", errors="replace").read(), n, L)
ds = Dataset.from_dict({"input_ids": win, "attention_mask": [[1] * L] * n})
t = time.time()
model = oneshot(model=model_dir, dataset=ds, max_seq_length=L, num_calibration_samples=n,
                recipe=QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]))
q = time.time() - t
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
json.dump({"quantize_s": q, "host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
          open(out + "/bench.json", "w"))
'''


def run(cmd, log: Path, timeout: int = 3600, cwd: Path = REPO, env: dict | None = None) -> float:
    t = time.time()
    with open(log, "w") as f:
        r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or ENV, stdout=f, stderr=subprocess.STDOUT,
                           timeout=timeout)
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}); log {log}:\n{tail}")
    return time.time() - t


def ckpt_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file()
               and (p.suffix == ".safetensors" or p.name.endswith("config.json")))


def variant(name: str) -> tuple[str, dict]:
    """A row: RECIPE, or LABEL=RECIPE:step.param=value;... (the recipe with --recipe-param values)."""
    if "=" not in name.split(":")[0]:
        return name, {}
    label, _, rest = name.partition("=")
    recipe, _, params = rest.partition(":")
    return recipe, dict(p.split("=", 1) for p in params.split(";") if p)


def quantize(label: str, model_dir: Path, out: Path, args) -> dict:
    recipe, params = variant(label)
    label = label.split("=")[0]
    ck = out / label
    job = {"model_dir": str(model_dir), "gguf": str(GGUF), "output_dir": str(ck), "format": "nvfp4",
           "recipe": recipe, "recipe_params": params, "kv_cache": "none", "device": args.device,
           "calibration": {"source": str(CALIB), "samples": args.samples, "seq_len": args.seq_len,
                           "batch_size": "auto"}}
    jf = out / f"{label}.job.json"
    if args.reuse and (ck / "result.json").exists() and json.loads(jf.read_text()) == job:
        res = json.loads((ck / "result.json").read_text())
        return {"dir": ck, "quantize_s": res["timings"]["quantize_s"], "wall_s": None,
                "peak_rss_bytes": res["memory"]["host_rss_peak_bytes"],
                "windows_sha256": res["calibration"]["windows_sha256"]}
    jf.write_text(json.dumps(job))
    # Each run in a folder of its own: ModelOpt's layerwise recipes (general/ptq/...-gptq) keep
    # per-layer checkpoints under a relative checkpoint_dir and resume from whatever is there.
    cwd = out / f"{label}.cwd"
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    wall = run([MO_PY, "-m", "container_payload", "quantize", jf], out / f"{label}.quantize.log", cwd=cwd)
    res = json.loads((ck / "result.json").read_text())
    return {"dir": ck, "quantize_s": res["timings"]["quantize_s"], "wall_s": wall,
            "peak_rss_bytes": res["memory"]["host_rss_peak_bytes"],
            "windows_sha256": res["calibration"]["windows_sha256"]}


def quantize_llmc(model_dir: Path, out: Path, args) -> dict:
    ck = out / "llm-compressor"
    ck.mkdir(parents=True, exist_ok=True)
    if args.reuse and (ck / "bench.json").exists() and (ck / "bench.json").stat().st_mtime > 0:
        b = json.loads((ck / "bench.json").read_text())
        if (b.get("samples"), b.get("seq_len")) == (args.samples, args.seq_len):
            return {"dir": ck, "quantize_s": b["quantize_s"], "wall_s": None,
                    "peak_rss_bytes": b["host_rss_peak_bytes"]}
    wall = run([LLMC_PY, "-c", LLMC_SCRIPT, REPO, model_dir, CALIB, args.samples, args.seq_len, ck],
               out / "llm-compressor.quantize.log")
    b = json.loads((ck / "bench.json").read_text())
    b.update(samples=args.samples, seq_len=args.seq_len)
    (ck / "bench.json").write_text(json.dumps(b))
    return {"dir": ck, "quantize_s": b["quantize_s"], "wall_s": wall, "peak_rss_bytes": b["host_rss_peak_bytes"]}


def evaluate(ck: Path, model_dir: Path, name: str, out: Path, args) -> dict:
    res = {}
    for text, path in HELDOUT.items():
        jo = out / f"{name}.eval-{text}.json"
        job = {"checkpoint": str(ck), "reference": str(model_dir), "text": str(path),
               "tokens": args.eval_tokens, "seq_len": args.seq_len, "json_out": str(jo),
               "generations": [], "device": args.device}
        jf = out / f"{name}.eval-{text}.job.json"
        fresh = not (args.reuse and jo.exists() and jf.exists() and json.loads(jf.read_text()) == job
                     and jo.stat().st_mtime > (Path(ck) / "config.json").stat().st_mtime)
        if fresh:
            jf.write_text(json.dumps(job))
            run([MO_PY, "-m", "container_payload", "evaluate", jf], out / f"{name}.eval-{text}.log")
        r = json.loads(jo.read_text())
        res[text] = {k: r.get(k) for k in ("kl_divergence", "perplexity", "reference_perplexity",
                                           "top1_agreement", "tokens")}
    return res


def table(rows: list[dict], args, base: dict) -> str:
    lines = [
        "# NVFP4 W4A4 recipes on SmolLM2-135M-Instruct (embedded model)",
        "",
        f"Calibration: first {args.samples} x {args.seq_len} tokens of brown-calibration (the same "
        f"windows for every column). Evaluation: first {args.eval_tokens} tokens of each held-out "
        f"text in windows of {args.seq_len}, float32 engine emulation (container_payload/numerics/emulate.py) "
        "vs the bf16 model run in float32. KL = mean per-token KL(bf16 || quantized). "
        "Time = quantization (calibration + refine) on the shared 2-core CPU; memory = peak RSS of "
        "the quantizing process; size = safetensors + config files.",
        "",
        "| recipe | KL brown | KL wiki | KL mean | KL vs default | ppl brown | ppl wiki | top-1 brown | top-1 wiki | size MB | size vs default | quant s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | failed: {r['error'][:80]} |" + " |" * 11)
            continue
        e = r["eval"]
        klm = (e["brown"]["kl_divergence"] + e["wiki"]["kl_divergence"]) / 2
        lines.append(
            f"| {r['recipe']} | {e['brown']['kl_divergence']:.4f} | {e['wiki']['kl_divergence']:.4f} | "
            f"{klm:.4f} | {klm / base['kl'] if base else float('nan'):.3f} | "
            f"{e['brown']['perplexity']:.2f} | {e['wiki']['perplexity']:.2f} | "
            f"{e['brown']['top1_agreement']:.3f} | {e['wiki']['top1_agreement']:.3f} | "
            f"{r['bytes'] / 1e6:.2f} | {r['bytes'] / base['bytes'] if base else float('nan'):.3f} | "
            f"{r['quantize_s']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} |")
    ref = next((r for r in rows if "eval" in r), None)
    if ref:
        lines += ["", f"bf16 reference perplexity: brown {ref['eval']['brown']['reference_perplexity']:.2f}, "
                      f"wiki {ref['eval']['wiki']['reference_perplexity']:.2f}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--recipes", default=None,
                    help=f"comma-separated; default {CPU_RECIPES} (plus ModelOpt's GPU-only presets "
                         "with --device cuda). A row may set recipe parameters: "
                         "LABEL=RECIPE:step.param=value;... (e.g. pure-w4a4=smooth-gptq-seq-mp:keep_bf16.budget=0)")
    ap.add_argument("--no-llmc", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                    help="where the payload quantizes and evaluates (the llm-compressor column picks its own)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep checkpoints and scores already in --out from the same job settings")
    ap.add_argument("--out", default=str(REPO / "build" / "bench-recipes"))
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "recipes-table"),
                    help="where the table goes (.md and .json); recipes.md is the hand-written account")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "smol-bf16"
    t0 = time.time()
    rows = []
    recipes = args.recipes or (GPU_RECIPES if args.device == "cuda" else CPU_RECIPES)
    names = [r for r in recipes.split(",") if r]
    if not args.no_llmc:
        names.append("llm-compressor")
    for name in names:
        print(f"[{time.time() - t0:6.0f}s] {name}: quantize", flush=True)
        try:
            if name == "llm-compressor":
                if not model_dir.exists():
                    raise RuntimeError("llm-compressor needs the bf16 model folder the payload makes first")
                if not LLMC_PY.exists():
                    raise RuntimeError(f"no llm-compressor interpreter at {LLMC_PY}")
                q = quantize_llmc(model_dir, out, args)
            else:
                q = quantize(name, model_dir, out, args)
            print(f"[{time.time() - t0:6.0f}s] {name}: evaluate", flush=True)
            ev = evaluate(q["dir"], model_dir, name.split("=")[0], out, args)
            rows.append({"recipe": name.split("=")[0], "quantize_s": q["quantize_s"], "peak_rss_bytes": q["peak_rss_bytes"],
                         "bytes": ckpt_bytes(q["dir"]), "checkpoint": str(q["dir"]), "eval": ev,
                         "windows_sha256": q.get("windows_sha256")})
        except Exception as e:  # noqa: BLE001 - one failed column must not lose the others
            print(f"{name} failed: {e}", flush=True)
            rows.append({"recipe": name.split("=")[0], "error": str(e).splitlines()[0]})
    base = None
    d = next((r for r in rows if r["recipe"] == "default" and "eval" in r), None)
    if d:
        base = {"kl": (d["eval"]["brown"]["kl_divergence"] + d["eval"]["wiki"]["kl_divergence"]) / 2,
                "bytes": d["bytes"]}
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    meta = {"samples": args.samples, "seq_len": args.seq_len, "eval_tokens": args.eval_tokens,
            "total_s": round(time.time() - t0, 1), "rows": rows}
    res.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
    res.with_suffix(".md").write_text(table(rows, args, base) + f"\nTotal benchmark time {meta['total_s']:.0f} s.\n")
    print(res.with_suffix(".md").read_text())
    return 0 if all("eval" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
