"""A random Llama with many small layers (bf16 safetensors), for the streamed mode's memory test.

    python make_tiny_llama.py OUT_DIR TOKENIZER_DIR [LAYERS HIDDEN]

By default 40 layers of hidden 384 / MLP 1536 (4.7 MB each) and untied 49152-token embeddings
(2 x 38 MB): about 265 MB, most of it in the layers, so a whole-model peak is far above a
streamed one. LAYERS / HIDDEN make a smaller one (MLP 4 x hidden, heads of 64) for recipes that are slow on
a CPU. The tokenizer is the embedded model's (same vocabulary).
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

out, tok = Path(sys.argv[1]), Path(sys.argv[2])
layers, hidden = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (40, 384)
torch.manual_seed(0)
config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=49152, tie_word_embeddings=False,
                     max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(out)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (tok / name).exists():
        shutil.copyfile(tok / name, out / name)
print("saved", out)
