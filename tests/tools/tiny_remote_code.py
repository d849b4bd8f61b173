"""A tiny random Llama that ships its own code, as Hub models with `auto_map` do.

    python tiny_remote_code.py OUT_DIR TOKENIZER_DIR

config.json names `configuration_tiny.TinyConfig` and `modeling_tiny.TinyForCausalLM` (a Llama
subclass, model_type "tiny_custom"), so transformers imports the folder's own .py files only
with trust_remote_code.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_moe import TOKENIZER_FILES  # noqa: E402 - the same tokenizer files (the chat template: serve)

CONFIGURATION = '''from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "tiny_custom"
'''
MODELING = '''from transformers import LlamaForCausalLM

from .configuration_tiny import TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''

out, tok = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True,
                     max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
cfg = json.loads((out / "config.json").read_text())
cfg.update(model_type="tiny_custom", architectures=["TinyForCausalLM"],
           auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                     "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
(out / "config.json").write_text(json.dumps(cfg, indent=2))
(out / "configuration_tiny.py").write_text(CONFIGURATION)
(out / "modeling_tiny.py").write_text(MODELING)
for name in TOKENIZER_FILES:
    if (tok / name).exists():
        shutil.copyfile(tok / name, out / name)
for p in out.iterdir():
    os.chmod(p, 0o644)  # the container's user reads them
print("saved", out)
