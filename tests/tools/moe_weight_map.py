"""Streamed mode's reading of a Mixture-of-Experts checkpoint against transformers' own loader.

    python moe_weight_map.py REPO TOKENIZER_DIR OUT_DIR KIND...

For each tiny MoE family (tiny_moe.py, saved per expert as the Hub has them): every decoder
parameter container_payload.pipelines.checkpoint_map reads (fused experts included) must equal, bit for
bit, what from_pretrained loads, and the transforms it marks as used must be the loader's (the
export reverses exactly those). Prints one JSON line per family.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, sys.argv[1])
sys.path.insert(0, str(Path(__file__).parent))
import tiny_moe  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from container_payload.pipelines.checkpoint_map import MappedWeights  # noqa: E402
from container_payload.pipelines.streaming import ShardReader, read_params, skeleton  # noqa: E402

for kind in sys.argv[4:]:
    folder = Path(sys.argv[3]) / kind
    tiny_moe.build(kind, Path(sys.argv[2]), folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model = skeleton(folder)
    values = read_params(model, "", MappedWeights(ShardReader(folder), model), torch.bfloat16, skip="lm_head.")
    want = {n: p.data for n, p in loaded.named_parameters() if not n.startswith("lm_head.")}
    print(json.dumps({
        "kind": kind, "same_names": sorted(values) == sorted(want),
        "differ": [n for n in want if n in values and not torch.equal(values[n], want[n])],
        "fused_experts": sorted(n for n, v in values.items() if v.dim() == 3 and ".experts." in n),
        "conversions": [repr(c) for c in model._weight_conversions],
        "loader_conversions": [repr(c) for c in loaded._weight_conversions]}))
