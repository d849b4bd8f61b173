"""A tiny random-weight causal LM of one family (Mixture-of-Experts or dense), saved as a bf16
safetensors folder that `launcher quantize --model DIR` accepts.

    python tiny_moe.py KIND TOKENIZER_DIR OUT_DIR [SEED]
    KIND: qwen3_moe mixtral qwen2_moe qwen3_5_moe deepseek_v2 (MoE);
          llama mistral qwen2 qwen3 gemma gemma2 gemma3_text (dense)

Built from transformers' own config classes, so the architecture is the real one; the
tokenizer files are copied from TOKENIZER_DIR (the embedded SmolLM2's: vocabulary 49152)
so that calibration and evaluation text tokenizes as usual. transformers 5 keeps the
experts as fused 3-D parameters in memory but saves them per expert
(`experts.N.gate_proj.weight`), which transformers 4.57 reads too.

Sizes: in_features 64 (hidden) and 32 or 64 (expert intermediate) are multiples of 16,
as NVFP4 needs; 4 experts, 2 per token, so that some tokens skip each expert.
Families with shared experts: qwen2_moe (`mlp.shared_expert` + `mlp.shared_expert_gate`),
qwen3_5_moe (the text model of Qwen3.5/3.6-MoE, model_type qwen3_5_moe_text: the same shared
expert, one Gated DeltaNet `linear_attn` layer then one full-attention layer) and deepseek_v2
(DeepSeek-V2-Lite's shape: MLA attention without q LoRA, `mlp.shared_experts`, layer 0 dense).
Dense families: hidden 64, intermediate 128, 2 layers. Every norm weight gets noise, so that a
wrong fold of a smoothing scale into a norm (Gemma's norms multiply by 1 + weight, initialized
to 0) shows.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DeepseekV2Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

BASE = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2)
COMMON = dict(BASE, num_experts_per_tok=2)
# Dense families: transformers' config class by model_type, and what differs from BASE.
DENSE = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),            # q_norm / k_norm after q_proj / k_proj
    "gemma": ("GemmaConfig", {}),            # norms: x * (1 + weight)
    "gemma2": ("Gemma2Config", {}),          # + pre/post_feedforward_layernorm, softcapping
    # one sliding and one full-attention layer: they differ in mask and rotary base
    "gemma3_text": ("Gemma3TextConfig", {"layer_types": ["sliding_attention", "full_attention"],
                                         "sliding_window": 32}),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def config(kind: str):
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                              decoder_sparse_step=1, norm_topk_prob=True)
    if kind == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=4)
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                              shared_expert_intermediate_size=64, decoder_sparse_step=1)
    if kind == "qwen3_5_moe":
        from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

        return Qwen3_5MoeTextConfig(**COMMON, moe_intermediate_size=32, num_experts=4,
                                    shared_expert_intermediate_size=64,
                                    layer_types=["linear_attention", "full_attention"],
                                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                    linear_value_head_dim=16, linear_conv_kernel_dim=4)
    if kind == "deepseek_v2":
        # MLA: as many key/value heads as query heads (DeepSeek-V2-Lite: 16 and 16)
        return DeepseekV2Config(**{k: v for k, v in COMMON.items() if k not in ("head_dim", "num_key_value_heads")},
                                num_key_value_heads=4, intermediate_size=128,
                                moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                                first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                                qk_rope_head_dim=16, v_head_dim=16, topk_method="greedy", n_group=1, topk_group=1)
    if kind in DENSE:
        cls, extra = DENSE[kind]
        return getattr(transformers, cls)(**BASE, intermediate_size=128, **extra)
    raise SystemExit(f"unknown kind {kind!r}: qwen3_moe, mixtral, qwen2_moe, qwen3_5_moe, deepseek_v2 or one of "
                     f"{', '.join(DENSE)}")


def random_model(kind: str, seed: int = 0):
    """The random bf16 model of `kind`, in memory (tests/test_algorithms.py uses it as it is)."""
    torch.manual_seed(seed)
    cfg = config(kind)
    # A std larger than the default 0.02 makes the routers' choices (and so the quantization
    # error) visible in a 2-layer model; the weights are random either way.
    cfg.initializer_range = 0.1
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # 1 or 0 as initialized: a fold into them would hide its mistakes
                p.add_(0.2 * torch.randn_like(p))
    return model


def build(kind: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> None:
    random_model(kind, seed).save_pretrained(out)
    hub_style_config(kind, out / "config.json")
    for p in out.iterdir():
        os.chmod(p, 0o644)  # safetensors writes 0600: a container user other than ours must read it
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)


def hub_style_config(kind: str, path: Path) -> None:
    """config.json as the Hub's models have it, which every transformers reads: 5.x saves
    Qwen3-MoE's expert count as `num_local_experts` and the rope base inside
    `rope_parameters`, which 4.57 does not know (it then builds 128 experts and fails to load)."""
    cfg = json.loads(path.read_text())
    if kind == "qwen3_moe" and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    path.write_text(json.dumps(cfg, indent=2) + "\n")


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0)
