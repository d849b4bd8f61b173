"""Test fixture for the evaluation: a tiny random Llama with a REAL tokenizer, quantized
by the real ModelOpt, in every checkpoint format the emulation reads.

    .venv-mo/bin/python tests/tools/make_tiny_nvfp4.py OUT_DIR --gguf GGUF --text TXT \
        --tokens T --seq-len L

writes, under OUT_DIR:
  ref/          the bf16 original (SmolLM2's tokenizer, taken from the embedded GGUF)
  w4a4/         ModelOpt NVFP4 W4A4 export (export_hf_checkpoint)
  w4a16/        ModelOpt NVFP4 weight-only export
  fp8/          ModelOpt FP8 export
  ct-w4a4/      w4a4 rewritten as compressed-tensors (docs/nvfp4-format.md §6: same bytes, other
                names, reciprocal global scales)
  tokens.json   the evaluation windows (the calib_data contract), for an emulation that
                has no tokenizer

Calibration uses the text AFTER the first T tokens, so that evaluation sees activations
past the calibrated range (the clipping path). Runs in the ModelOpt venv, never the host's.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from container_payload.pipelines.calib_data import token_windows  # noqa: E402

# Every Linear has in_features % 16 == 0; GQA so k/v_proj differ from q_proj. A wide
# init makes the logits far from uniform, so that the KL is well above rounding noise.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            initializer_range=0.25, rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"])


def make_reference(out: Path, gguf: Path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return tok


def quantized(ref: Path, cfg: dict, batches):
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    # A fresh load per variant: mtq.quantize modifies the model in place.
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.bfloat16).eval()

    def forward_loop(m):
        with torch.no_grad():
            for ids in batches:
                m(input_ids=ids)

    return mtq.quantize(model, copy.deepcopy(cfg), forward_loop)


def to_compressed_tensors(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "hf_quant_config.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    out = {}
    for k, v in load_file(str(src / "model.safetensors")).items():
        if k.endswith(".weight") and v.dtype == torch.uint8:
            out[k[:-len("weight")] + "weight_packed"] = v
        elif k.endswith(".weight_scale_2"):
            out[k[:-len("weight_scale_2")] + "weight_global_scale"] = (1.0 / v.float()).reshape(1)
        elif k.endswith(".input_scale"):
            out[k[:-len("input_scale")] + "input_global_scale"] = (1.0 / v.float()).reshape(1)
        else:
            out[k] = v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    scheme = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
              "group_size": 16, "dynamic": False, "scale_dtype": "float8_e4m3fn"}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head"], "kv_cache_scheme": None,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme,
                                      "input_activations": {**scheme, "dynamic": "local"}}}}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    out = Path(args.out)

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    tok = make_reference(out / "ref", Path(args.gguf))
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    n_eval = args.tokens // args.seq_len
    windows = token_windows(tok, text, n_eval + 8, args.seq_len)
    (out / "tokens.json").write_text(json.dumps(windows[:n_eval]))
    batches = [torch.tensor(windows[i:i + 2]) for i in range(n_eval, n_eval + 8, 2)]

    for name, cfg in (("w4a4", mtq.NVFP4_DEFAULT_CFG), ("w4a16", mtq.W4A16_NVFP4_CFG),
                      ("fp8", mtq.FP8_DEFAULT_CFG)):
        model = quantized(out / "ref", cfg, batches)
        with torch.inference_mode():
            export_hf_checkpoint(model, export_dir=str(out / name))
        tok.save_pretrained(out / name)
    to_compressed_tensors(out / "w4a4", out / "ct-w4a4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
