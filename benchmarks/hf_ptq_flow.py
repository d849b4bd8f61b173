"""The flow of ModelOpt's example script examples/llm_ptq/hf_ptq.py (--qformat nvfp4), reproduced
step by step so it can be timed beside our payload on the same machine and the same calibration
windows. What it does, in hf_ptq.py's order (see docs/nvfp4-format.md §9):

  load      example_utils.get_model: config, init_empty_weights + infer_auto_device_map (spill to
            the CPU past the GPU), then from_pretrained(torch_dtype="auto", device_map="auto");
            get_tokenizer with pad_token fallback, padding_side="left"
  batch     get_max_batch_size(model, 512, sample_memory_usage_ratio=1.1): a probe forward at
            batch 1, then at the estimated target batch, halving on CUDA OOM; capped at the samples
  preview   full_model.generate(first calibration sample, max_new_tokens=100)
  quantize  mtq.quantize(model, NVFP4_DEFAULT_CFG, create_forward_loop(dataloader)) -- the full
            model forward, lm_head logits included, _process_batch halving on OOM
  post      mtq.print_quant_summary(model, export_path), empty_cache, a second 100-token preview,
            decode both previews
  export    export_hf_checkpoint(model, export_dir) under inference_mode, tokenizer restored
            (padding side, pad token) and saved

Differences from the real script, on purpose: the calibration windows are ours (the same token
windows the payload uses, so both flows see identical tokens) instead of cnn_dailymail +
nemotron-post-training downloads; KV-cache quantization is off (hf_ptq.py's default is fp8_cast)
so the two checkpoints can be compared tensor by tensor; the model is a local folder.

    python3 benchmarks/hf_ptq_flow.py --model DIR --export DIR --calib FILE \
        [--samples 512] [--seq-len 512] [--metrics FILE.json]
"""
import argparse
import copy
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--export", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=0, help="0: probe like hf_ptq.py")
    ap.add_argument("--metrics")
    args = ap.parse_args(argv)

    t_start = time.time()
    timings = {}
    import numpy as np
    import torch
    import transformers
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_max_memory
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoTokenizer

    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.utils.dataset_utils import create_forward_loop, get_max_batch_size

    from container_payload.pipelines.calib_data import fingerprint, token_windows

    mto.enable_huggingface_checkpointing()
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    cuda = torch.cuda.is_available()
    timings["import_s"] = round(time.time() - t_start, 3)

    # ---- load (example_utils.get_model + get_tokenizer) ----
    t = time.time()
    hf_config = AutoConfig.from_pretrained(args.model)
    arch = getattr(transformers, hf_config.architectures[0])
    model_kwargs = {"torch_dtype": "auto"}
    with init_empty_weights():
        empty = arch._from_config(hf_config, torch_dtype=getattr(hf_config, "torch_dtype", torch.bfloat16))
    max_memory = get_max_memory()
    inferred = infer_auto_device_map(empty, max_memory=max_memory)
    del empty
    if "cpu" in inferred.values():
        for d in max_memory:
            if isinstance(d, int):
                max_memory[d] *= 0.8
        print(f"Model does not fit to the GPU mem. Memory limit for calibration: {max_memory}")
        model_kwargs["max_memory"] = max_memory
    model = arch.from_pretrained(args.model, device_map="auto" if cuda else "cpu", **model_kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None or tokenizer.pad_token == "<unk>":
        tokenizer.pad_token = tokenizer.eos_token
    default_padding_side, default_pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    device = model.model.device if hasattr(model, "model") else model.device
    if cuda:
        torch.cuda.synchronize()
    timings["load_s"] = round(time.time() - t, 3)

    # ---- calibration data: the same windows the payload uses ----
    t = time.time()
    text = Path(args.calib).read_text(encoding="utf-8", errors="replace")
    windows = token_windows(tokenizer, text, args.samples, args.seq_len)
    ids = torch.tensor(windows, dtype=torch.long)
    timings["tokenize_s"] = round(time.time() - t, 3)

    # ---- batch size probing (quantize_main: get_max_batch_size, ratio 1.1 for nvfp4) ----
    t = time.time()
    if args.batch_size == 0:
        if cuda:
            bs = get_max_batch_size(model, max_sample_length=args.seq_len, sample_memory_usage_ratio=1.1)
        else:
            bs = 4  # get_max_batch_size needs CUDA; only for a CPU smoke test
        bs = min(bs, args.samples)
    else:
        bs = args.batch_size
    print(f"Use calib batch_size {bs}")
    data = [{"input_ids": ids[i].to(device), "attention_mask": torch.ones_like(ids[i]).to(device)}
            for i in range(len(ids))]
    calib_dataloader = DataLoader(data, batch_size=bs, shuffle=False)
    if cuda:
        torch.cuda.synchronize()
    timings["batch_probe_s"] = round(time.time() - t, 3)

    # ---- pre_quantize: 100-token preview ----
    t = time.time()
    preview_input_ids = next(iter(calib_dataloader))["input_ids"][0:1]
    generated_before = model.generate(preview_input_ids, max_new_tokens=100)
    if cuda:
        torch.cuda.synchronize()
    timings["preview_before_s"] = round(time.time() - t, 3)

    # ---- mono_quantize ----
    quant_cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    print("Disable KV cache quantization")
    calibrate_loop = create_forward_loop(dataloader=calib_dataloader)
    calib_time = {}

    def timed_loop(m):
        tc = time.time()
        calibrate_loop(m)
        if cuda:
            torch.cuda.synchronize()
        calib_time["s"] = time.time() - tc

    t = time.time()
    model = mtq.quantize(model, quant_cfg, forward_loop=timed_loop)
    if cuda:
        torch.cuda.synchronize()
    timings["quantize_s"] = round(time.time() - t, 3)
    timings["calibrate_s"] = round(calib_time.get("s", 0.0), 3)

    # ---- post_quantize: summary + second preview ----
    t = time.time()
    mtq.print_quant_summary(model, args.export)
    if cuda:
        torch.cuda.empty_cache()
    # (ModelOpt's NVFP4 fake quantization of activations needs CUDA: the CPU smoke test skips it)
    generated_after = model.generate(preview_input_ids, max_new_tokens=100) if cuda else generated_before
    n_in = preview_input_ids.shape[1]
    print(f"example test input: {tokenizer.batch_decode(preview_input_ids)[0][:200]!r}")
    print(f"example outputs before ptq: {tokenizer.batch_decode(generated_before[:, n_in:])[0][:200]!r}")
    print(f"example outputs after ptq: {tokenizer.batch_decode(generated_after[:, n_in:])[0][:200]!r}")
    if cuda:
        torch.cuda.synchronize()
    timings["preview_after_s"] = round(time.time() - t, 3)

    # ---- export_quantized ----
    t = time.time()
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=args.export)
        tokenizer.padding_side = default_padding_side
        if default_pad_token is not None:
            tokenizer.pad_token = default_pad_token
        tokenizer.save_pretrained(args.export)
    timings["export_s"] = round(time.time() - t, 3)
    timings["total_s"] = round(time.time() - t_start, 3)

    metrics = {
        "flow": "hf_ptq",
        "timings": timings,
        "batch_size": bs,
        "windows_sha256": fingerprint(windows),
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_map_values": sorted({str(v) for v in inferred.values()}),
    }
    print(json.dumps(metrics))
    if args.metrics:
        Path(args.metrics).write_text(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
