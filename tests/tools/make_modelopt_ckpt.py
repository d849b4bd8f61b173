"""Write a real ModelOpt NVFP4 checkpoint of a tiny random Llama (test fixture).

    .venv-mo/bin/python tests/tools/make_modelopt_ckpt.py OUT_DIR [--variants w4a4,w4a16,w4a4-kvfp8]

writes one checkpoint per variant into OUT_DIR/<variant>. All variants come from one
process because importing torch + modelopt costs more than quantizing the model.

Runs in the ModelOpt venv (torch + nvidia-modelopt), never in the host venv. The model
is random but the export is the real `export_hf_checkpoint`, so the verifier is tested
against the exact names, dtypes and config files ModelOpt writes. Takes a few seconds
on the CPU.
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

# Small enough to export in seconds, but every Linear has in_features % 16 == 0 and
# GQA (2 KV heads for 4 query heads) so k/v_proj differ in shape from q_proj.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=128, tie_word_embeddings=False,
            # ModelOpt's export iterates config.architectures; a bare LlamaConfig has None.
            architectures=["LlamaForCausalLM"])


VARIANTS = ("w4a4", "w4a16", "w4a4-kvfp8", "w4a4-sharded")
# The tiny model is ~90 KB; this cap makes export_hf_checkpoint write several shards
# and a model.safetensors.index.json, as it does for real 8B models (5 GB shards).
SHARD_SIZE = "40KB"


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16)
    return model.eval()


def config_for(variant: str) -> dict:
    import modelopt.torch.quantization as mtq

    if variant == "w4a16":
        cfg = copy.deepcopy(mtq.W4A16_NVFP4_CFG)
    else:
        cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    if variant == "w4a4-kvfp8":
        # The same way the payload adds an FP8 KV cache (container_payload/core/recipes.py).
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, TINY["vocab_size"], (2, 32), generator=gen) for _ in range(4)]

    def forward_loop(m):
        with torch.no_grad():
            for ids in batches:
                m(input_ids=ids)

    for variant in variants:
        # A fresh model per variant: mtq.quantize modifies the model in place.
        model = mtq.quantize(tiny_llama(), config_for(variant), forward_loop)
        kwargs = {"max_shard_size": SHARD_SIZE} if variant.endswith("-sharded") else {}
        export_hf_checkpoint(model, export_dir=str(Path(args.out) / variant), **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
