"""A small ModelOpt NVFP4 checkpoint written with numpy alone, for the hostile-input tests.

It has the exact layout of ModelOpt's unified export (the one launcher.verify checks
against real ModelOpt output in test_verify.py), but it needs no torch or ModelOpt venv,
so the fuzz test runs everywhere. Two shards and an index, so the index's paths get
exercised too. `launcher verify` must pass it before anything is broken.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

HIDDEN, INTER, LAYERS = 32, 64, 2
PROJ = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN // 2, HIDDEN),
        "self_attn.v_proj": (HIDDEN // 2, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
# Fused groups share their per-tensor scales (the verifier checks it): one value per group.
SHARED = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "gate_proj": 2, "up_proj": 2, "o_proj": 3, "down_proj": 4}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list, bytes]]) -> None:
    header, offset, chunks = {"__metadata__": {"format": "pt"}}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(chunks))


def _f32(v: float) -> bytes:
    return np.float32(v).tobytes()


def layer_tensors(i: int, rng: np.random.Generator) -> dict:
    out = {}
    for proj, (o, n) in PROJ.items():
        m = f"model.layers.{i}.{proj}"
        group = SHARED[proj.rsplit(".", 1)[1]]
        out[f"{m}.weight"] = ("U8", [o, n // 2], rng.integers(0, 256, o * n // 2, dtype=np.uint8).tobytes())
        # E4M3 bytes 0x30..0x50: positive, finite, non-zero block scales
        out[f"{m}.weight_scale"] = ("F8_E4M3", [o, n // 16], rng.integers(0x30, 0x50, o * n // 16,
                                                                         dtype=np.uint8).tobytes())
        out[f"{m}.weight_scale_2"] = ("F32", [], _f32(0.01 * group))
        out[f"{m}.input_scale"] = ("F32", [], _f32(0.02 * group))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = ("F16", [HIDDEN], np.ones(HIDDEN, np.float16).tobytes())
    return out


def make_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = {"model-00001-of-00002.safetensors": {
        "model.embed_tokens.weight": ("F16", [64, HIDDEN], rng.standard_normal(64 * HIDDEN).astype(np.float16).tobytes()),
        **layer_tensors(0, rng)},
        "model-00002-of-00002.safetensors": {
        **layer_tensors(1, rng), "model.norm.weight": ("F16", [HIDDEN], np.ones(HIDDEN, np.float16).tobytes()),
        "lm_head.weight": ("F16", [64, HIDDEN], rng.standard_normal(64 * HIDDEN).astype(np.float16).tobytes())}}
    weight_map, total = {}, 0
    for shard, tensors in shards.items():
        write_safetensors(folder / shard, tensors)
        weight_map |= {k: shard for k in tensors}
        total += sum(len(raw) for _, _, raw in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    fp4 = {"num_bits": 4, "type": "float", "group_size": 16}
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                "config_groups": {"group_0": {"weights": fp4, "input_activations": fp4,
                                                              "targets": ["Linear"]}},
                                "ignore": ["lm_head"]}}, indent=2))
    (folder / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt"},
        "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"],
                         "kv_cache_quant_algo": None}}, indent=2))
    return folder
