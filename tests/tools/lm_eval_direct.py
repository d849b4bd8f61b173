"""lm-evaluation-harness run directly on the host, the reference of tests/test_tasks.py.

    python lm_eval_direct.py WHEELS SITE CKPT REFERENCE TASK_YAML LIMIT BATCH OUT.json

lm-eval 0.4.13 is installed from the same wheels the launcher fetched (only what this venv
lacks, into SITE), then lm-eval's own simple_evaluate scores both models: the reference as
transformers loads it in float32, the checkpoint through the payload's exact emulation.
The task is found through lm-eval's include_path, with the task's folder as the working
directory (lm-eval reads relative data_files against it). Nothing of the launcher runs here.
"""
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

wheels, site, ckpt, reference, task_yaml, limit, batch, out = sys.argv[1:9]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # container_payload, for the emulation

have = {(d.metadata["Name"] or "").lower().replace("-", "_") for d in metadata.distributions()}
todo = [str(w) for w in sorted(Path(wheels).glob("*.whl")) if w.name.split("-")[0].lower() not in have]
subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target", site, *todo],
               check=True)
sys.path.append(site)

import yaml  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from container_payload.numerics.emulated_model import load_emulated  # noqa: E402

task = Path(task_yaml).resolve()
os.chdir(task.parent)
name = yaml.safe_load(task.read_text())["task"]
manager = TaskManager(include_path=str(task.parent), include_defaults=False)
tokenizer = AutoTokenizer.from_pretrained(reference)
results, samples = {}, {}
for side in ("reference", "quantized"):
    if side == "reference":
        model = AutoModelForCausalLM.from_pretrained(reference, dtype="float32").eval()
    else:
        model, _ = load_emulated(ckpt)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch), device="cpu")
    got = simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=int(limit),
                          log_samples=True, bootstrap_iters=1000)
    results[side] = got["results"]
    samples[side] = {t: [{"doc_id": d["doc_id"], "filtered_resps": d["filtered_resps"]} for d in docs]
                     for t, docs in got["samples"].items()}
Path(out).write_text(json.dumps({"results": results, "samples": samples}, indent=2, default=str))
