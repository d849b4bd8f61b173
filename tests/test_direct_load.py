"""The payload's direct safetensors reader and the model it builds, against the usual loaders.

Runs tests/tools/direct_load_check.py in the ModelOpt venv (torch; the host venv has none):
- read_state_dict on a two-shard checkpoint with every dtype width (odd byte offsets), a scalar,
  an empty tensor, a tensor larger than one read chunk and a stray file the index does not name,
  compared byte for byte with safetensors' own load_file;
- the embedded model built around those tensors against transformers' from_pretrained: weights,
  buffers (rotary frequencies), tied embeddings, config, generation config and logits equal;
- an fp16 checkpoint falls back to from_pretrained.
CI has no GPU, so the CUDA reader (pinned double buffering) is checked by the same script on the
device machine; the 8B benchmark then compares its checkpoint byte for byte with ModelOpt's flow.
"""
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_direct_load_matches_safetensors_and_from_pretrained(ref_python, embedded_model_dir, tmp_path):
    proc = subprocess.run([ref_python, str(REPO / "tests/tools/direct_load_check.py"), str(tmp_path),
                           str(embedded_model_dir)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["files"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert res["mixed_cpu"] == {"keys_equal": True, "bytes_equal": True, "on_device": True}
    assert res["model"] == {"loaders": ["direct", "from_pretrained"], "weights_equal": True,
                            "buffers_equal": True, "tied": True, "config_equal": True,
                            "generation_config_equal": True, "logits_equal": True}
    assert res["fp16_loader"] == "from_pretrained"
