"""A random Llama with many small layers (bf16 safetensors), for the streamed mode's memory test.

    python make_tiny_llama.py OUT_DIR TOKENIZER_DIR

40 layers of hidden 384 / MLP 1536 (4.7 MB each) and untied 49152-token embeddings
(2 x 38 MB): about 265 MB, most of it in the layers, so a whole-model peak is far above a
streamed one. The tokenizer is the embedded model's (same vocabulary).
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

out, tok = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
config = LlamaConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=40, num_attention_heads=6,
                     num_key_value_heads=6, vocab_size=49152, tie_word_embeddings=False,
                     max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(out)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (tok / name).exists():
        shutil.copyfile(tok / name, out / name)
print("saved", out)
