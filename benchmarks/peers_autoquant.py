"""ModelOpt's AutoQuantize (per-layer NVFP4 W4A4 / FP8 / bf16 search) on a bf16 folder, at a size budget.

    python3 benchmarks/peers_autoquant.py MODEL_DIR CALIB_TXT SAMPLES SEQ_LEN OUT_DIR --size-ratio R --default-bytes B

The peer of our mixed-precision recipe: the same calibration windows as the payload
(container_payload.pipelines.calib_data.token_windows on the folder's tokenizer), the gradient score that
hf_ptq.py uses by default (causal-LM loss, labels = the window), candidates NVFP4_DEFAULT_CFG and
FP8_DEFAULT_CFG (ModelOpt always adds "not quantized"), lm_head kept out as in every other row.
The effective-bits budget is set so that the checkpoint lands at R times the default recipe's
B bytes: ModelOpt counts NVFP4 as 4.5 bits and FP8 as 8 bits per searched weight, which is what
those layers cost in the checkpoint (4-bit codes plus one FP8 scale per 16; 8-bit codes), so the
extra bytes (R - 1) * B are spread over the searched weights. Export: export_hf_checkpoint
(MIXED_PRECISION), tokenizer copied as the payload does; OUT_DIR/bench.json has the timings.
Needs CUDA (ModelOpt's NVFP4 fake quantization).
"""
import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FORMATS = {(2, 1): "NVFP4", (4, 3): "FP8"}   # weight quantizer num_bits (E, M) -> format


def main(argv) -> int:
    ap = argparse.ArgumentParser()
    for name in ("model_dir", "calib", "samples", "seq_len", "out"):
        ap.add_argument(name)
    ap.add_argument("--size-ratio", type=float, default=1.06)
    ap.add_argument("--default-bytes", type=int, required=True)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    t0 = time.time()
    import torch
    import modelopt
    import modelopt.torch.quantization as mtq

    from container_payload.pipelines.calib_data import fingerprint, read_text, token_windows
    from container_payload.pipelines.loading import load_model, load_tokenizer
    from container_payload.pipelines.pipelines import export

    model_dir, out = Path(args.model_dir), Path(args.out)
    tok = load_tokenizer(model_dir)
    windows = token_windows(tok, read_text(args.calib, tok), int(args.samples), int(args.seq_len))
    model, _ = load_model(model_dir, "cuda")
    t_load = time.time()
    # ModelOpt's effective bits count the disabled lm_head too, at 16 bits (measured: "minimum
    # achievable effective bits is 6.92" here, with a tied 28M-parameter lm_head).
    linears = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    params = sum(v for n, v in linears.items() if "lm_head" not in n)
    total = sum(linears.values())
    bits = (4.5 * params + 16 * (total - params) + (args.size_ratio - 1.0) * args.default_bytes * 8) / total
    ids = torch.tensor(windows, dtype=torch.long)
    batches = [{"input_ids": ids[i:i + args.batch].cuda()} for i in range(0, len(ids), args.batch)]

    def forward_step(m, batch):
        return m(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False)

    model, state = mtq.auto_quantize(
        model, constraints={"effective_bits": bits},
        quantization_formats=[mtq.NVFP4_DEFAULT_CFG, mtq.FP8_DEFAULT_CFG],
        data_loader=batches, forward_step=forward_step, loss_func=lambda output, batch: output.loss,
        disabled_layers=["*lm_head*"], num_calib_steps=len(batches), num_score_steps=len(batches),
        method="gradient", verbose=False)
    torch.cuda.synchronize()
    t_q = time.time()
    chosen = {}
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name and wq is not None:
            kind = FORMATS.get(tuple(wq.num_bits), str(wq.num_bits)) if wq.is_enabled else "bf16"
            chosen[kind] = chosen.get(kind, 0) + 1
    model.eval()
    export(model, model_dir, out)  # copies the tokenizer too
    res = {"modelopt": modelopt.__version__, "effective_bits": bits, "searched_params": params,
           "layers_by_format": chosen, "load_s": round(t_load - t0, 3), "quantize_s": round(t_q - t_load, 3),
           "export_s": round(time.time() - t_q, 3), "samples": len(windows), "seq_len": int(args.seq_len),
           "windows_sha256": fingerprint(windows), "gpu_peak_bytes": torch.cuda.max_memory_allocated()}
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
