"""ModelOpt run directly, outside any container: the reference the launcher's
checkpoint must match byte for byte (weights and block scales).

    python modelopt_direct.py MODEL_DIR TEXT_FILE SAMPLES SEQ_LEN OUT_DIR

Independent of container_payload on purpose: it follows the calibration contract
itself (whole file tokenized without special tokens, first N windows of L tokens)
and calibrates the plain way, through the full model forward.
"""
import sys

import modelopt.torch.quantization as mtq
import torch
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text_file, n, seq_len, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
ids = tok(open(text_file, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
windows = torch.tensor([ids[i * seq_len:(i + 1) * seq_len] for i in range(n)])


def forward_loop(m):
    with torch.no_grad():
        for w in windows:
            m(w[None])


mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
export_hf_checkpoint(model, export_dir=out)
print("exported", out)
