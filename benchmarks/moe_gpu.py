"""A Mixture-of-Experts model with Qwen3-30B-A3B's or Qwen3.6-35B-A3B's shapes, quantized with the
weight-only-experts recipe (moe-w4a16-experts: NVFP4 weight-only experts and shared experts, FP8
attention and linear attention, FP8 KV cache) on a GPU.

    python3 benchmarks/moe_gpu.py --out DIR [--shapes qwen3.6-35b-a3b] [--layers 8]   # on the device

Qwen3.6-35B-A3B (NVIDIA's playbook model): transformers' Qwen3_5MoeTextConfig defaults, which are
Qwen3.5-35B-A3B's (the same architecture): hidden 2048, 40 layers (3 Gated DeltaNet : 1 full
attention), 256 experts of 512 + one shared expert of 512, 8 per token, vocabulary 248320.

Qwen3-30B-A3B's config (hidden 2048, 128 experts of intermediate 768, 8 per token, 32 query and 4
KV heads of 128, vocabulary 151936) with random weights. Its 48 layers are 58 GB of bf16; the
run cuts them to --layers (8: about 11 GB) so the checkpoint, its copy and the output fit the
device's disk and the call's time, and says so. Calibration: 128 x 512 tokens of .bench/calib.txt
(the stand-in tokenizer's ids are all below the vocabulary). The checkpoint goes through
launcher.verify (its mixed-precision rules); DIR/moe-SHAPES-shapes-w4a16-experts.json and .md get
the timings and peaks.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_8b import BENCH, run_logged  # noqa: E402

GiB = 1 << 30
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, norm_topk_prob=True,
                     max_position_embeddings=40960, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def shapes(name: str, layers: int):
    """(config, tiny_moe kind, layers of the full model)."""
    if name == "qwen3-30b-a3b":
        from transformers import Qwen3MoeConfig
        return Qwen3MoeConfig(**{**QWEN3_30B_A3B, "num_hidden_layers": layers}), "qwen3_moe", 48
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    full = Qwen3_5MoeTextConfig()
    cfg = Qwen3_5MoeTextConfig(num_hidden_layers=layers, layer_types=full.layer_types[:layers],
                               bos_token_id=0, eos_token_id=1)
    return cfg, "qwen3_5_moe", full.num_hidden_layers


def build(folder: Path, layers: int, name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "tests" / "tools"))
    from tiny_moe import hub_style_config

    t = time.time()
    cfg, kind, of_layers = shapes(name, layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    hub_style_config(kind, folder / "config.json")
    for p in (BENCH / "tokenizer").iterdir():
        shutil.copy(p, folder / p.name)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"layers": layers, "of_layers": of_layers, "bytes": size,
            "full_model_bytes_estimate": int(size / layers * of_layers),
            "build_s": round(time.time() - t, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/moe")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shapes", choices=("qwen3-30b-a3b", "qwen3.6-35b-a3b"), default="qwen3-30b-a3b")
    ap.add_argument("--samples", type=int, default=128)
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    res = {"config": f"{args.shapes} shapes, random weights", "recipe": "moe-w4a16-experts"}
    model_dir = work / f"{args.shapes}-cut"
    res["checkpoint"] = build(model_dir, args.layers, args.shapes)
    job = {"model_dir": str(model_dir), "output_dir": str(work / "out"), "recipe": "moe-w4a16-experts",
           "calibration": {"source": str(BENCH / "calib.txt"), "samples": args.samples, "seq_len": 512}}
    jp = out / "job-moe.json"
    jp.write_text(json.dumps(job, indent=2))
    env = {**os.environ, "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{REPO}", "HF_HUB_OFFLINE": "1"}
    rc, wall, stdout = run_logged([sys.executable, "-m", "container_payload", "quantize", str(jp)],
                                  out / "moe.log", env=env)
    res["payload"] = {"rc": rc, "wall_s": round(wall, 1)}
    if rc == 0:
        r = json.loads((work / "out" / "result.json").read_text())
        from launcher.verify import verify_checkpoint

        report = verify_checkpoint(work / "out")
        hf = json.loads((work / "out" / "hf_quant_config.json").read_text())["quantization"]
        res["payload"].update(timings={k: v for k, v in r["timings"].items() if k != "timeline"},
                              memory=r["memory"], checkpoint_bytes=r["checkpoint_bytes"],
                              quant_algo=hf.get("quant_algo"), kv_cache_quant_algo=hf.get("kv_cache_quant_algo"),
                              layer_formats=sorted({v.get("quant_algo") for v in
                                                    (hf.get("quantized_layers") or {}).values()}),
                              verify_ok=report.ok, verify_problems=[str(p) for p in report.problems[:5]])
    else:
        res["payload"]["tail"] = stdout[-3000:]
    stem = f"moe-{args.shapes}-shapes-w4a16-experts"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    p, c = res["payload"], res["checkpoint"]
    md = [f"# {args.shapes} shapes (MoE), moe-w4a16-experts, on one GPU", "",
          f"{c['layers']} of {c['of_layers']} layers (cut to fit the device's disk and the call's time): "
          f"{c['bytes'] / GiB:.1f} GiB bf16 (the full model: ~{c['full_model_bytes_estimate'] / GiB:.0f} GiB); "
          f"calibration {args.samples} x 512 tokens.", ""]
    if rc == 0:
        t, m = p["timings"], p["memory"]
        md += [f"- wall {p['wall_s']} s (quantize {t.get('quantize_s')} s, export {t.get('export_s')} s)",
               f"- peak GPU {m.get('gpu_peak_bytes', 0) / GiB:.1f} GiB, peak host RSS "
               f"{m['host_rss_peak_bytes'] / GiB:.1f} GiB",
               f"- checkpoint {p['checkpoint_bytes'] / GiB:.2f} GiB; quant_algo {p['quant_algo']}, layer formats "
               f"{p['layer_formats']}, KV cache {p['kv_cache_quant_algo']}",
               f"- launcher verify: {'ok' if p['verify_ok'] else p['verify_problems']}"]
    else:
        md += ["payload failed:", "```", p["tail"][-1500:], "```"]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
