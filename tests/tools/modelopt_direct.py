"""ModelOpt run directly, outside any container: the reference the launcher's
checkpoint must match byte for byte (weights, block scales and input scales).

    python modelopt_direct.py MODEL_DIR TEXT_FILE SAMPLES SEQ_LEN BATCH OUT_DIR

Independent of container_payload on purpose: it follows the calibration contract
itself (whole file tokenized without special tokens, first N windows of L tokens,
fed BATCH consecutive windows at a time, the last batch partial) and calibrates the
plain way, through the full model forward. BATCH is the batch the run being checked
used (its result.json's calibration.batch_size): bf16 products round differently for
other batch shapes on some CPUs (AMX), which moves input_scale.

Writes OUT_DIR/calibration.json: the batch shapes it fed, in order, and the windows'
sha256 (the contract's fingerprint: sha256 over each window's JSON list), for the
test to compare with the run's result.json.
"""
import hashlib
import json
import sys
from pathlib import Path

import modelopt.torch.quantization as mtq
import torch
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text_file, n, seq_len, batch, out = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                                int(sys.argv[5]), sys.argv[6])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
ids = tok(open(text_file, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
windows = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
batches = [torch.tensor(windows[i:i + batch]) for i in range(0, n, batch)]


def forward_loop(m):
    with torch.no_grad():
        for b in batches:
            m(b)


mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
export_hf_checkpoint(model, export_dir=out)
sha = hashlib.sha256()
for w in windows:
    sha.update(json.dumps(w).encode())
(Path(out) / "calibration.json").write_text(json.dumps(
    {"batch_size": batch, "batch_shapes": [list(b.shape) for b in batches], "windows_sha256": sha.hexdigest()}))
print("exported", out)
