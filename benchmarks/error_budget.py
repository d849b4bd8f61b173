"""Where W4A4's error comes from: KL against the bf16 model of a checkpoint as is (W4A4), with its
activations left in full precision (W4A16), and with the original weights but NVFP4 activations
(A4 only); for the first checkpoint also A4 in one group of Linears at a time.

    .venv-mo/bin/python benchmarks/error_budget.py BF16_DIR NAME=CKPT [NAME=CKPT ...]

Evaluates the first 3 x 512 tokens of brown-heldout and wiki-heldout (the embedded assets).
Results: benchmarks/results/recipes.md ("Error budget").
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoTokenizer
from container_payload.numerics import emulate, emulated_model
from container_payload.pipelines.calib_data import token_windows
torch.set_num_threads(2)
BF16 = sys.argv[1]
CK = dict(a.split("=", 1) for a in sys.argv[2:])
tok = AutoTokenizer.from_pretrained(BF16)
from launcher.common import paths
A = paths.assets_dir() / "text"
ids = {}
for name in ("brown-heldout", "wiki-heldout"):
    ids[name] = torch.tensor(token_windows(tok, (A / f"{name}.txt").read_text(), 3, 512))
ref, _ = emulated_model.load_reference(BF16)
ref_lp = {}
with torch.no_grad():
    for k, x in ids.items():
        ref_lp[k] = torch.log_softmax(ref(x).logits.float(), -1)
orig = {n: m.weight.detach().clone() for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}

def kl(model):
    out = {}
    with torch.no_grad():
        for k, x in ids.items():
            lq = torch.log_softmax(model(x).logits.float(), -1)
            out[k] = (ref_lp[k].exp() * (ref_lp[k] - lq)).sum(-1).mean().item()
    return out

def fmt(d): return " ".join(f"{k.split('-')[0]} {v:.4f}" for k, v in d.items()) + f" mean {sum(d.values())/len(d):.4f}"

for name, path in CK.items():
    emu, _ = emulated_model.load_emulated(path)
    lins = {n: m for n, m in emu.named_modules() if isinstance(m, emulate.EmulatedLinear)}
    qw = {n: m.weight.data.clone() for n, m in lins.items()}
    print(name, "W4A4      ", fmt(kl(emu)), flush=True)
    for m in lins.values(): m.act = None
    print(name, "W4A16     ", fmt(kl(emu)), flush=True)
    for n, m in lins.items(): m.act = "nvfp4"; m.weight.data = orig[n].float()
    print(name, "A4 only   ", fmt(kl(emu)), flush=True)
    if name == next(iter(CK)):
        for group in ("q_proj|k_proj|v_proj", "o_proj", "gate_proj|up_proj", "down_proj"):
            keys = group.split("|")
            for n, m in lins.items():
                m.act = "nvfp4" if any(n.endswith(k) for k in keys) else None
            print(name, f"A4 only in {group}", fmt(kl(emu)), flush=True)
