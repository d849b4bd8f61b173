"""Every recipe's output, tensor by tensor, as sha256: the proof that a refactor of the payload
left the bytes alone.

    python recipe_hashes.py --dense DIR [--moe DIR] --calib TEXT --save FILE [--compare FILE]
                            [--recipes a,b] [--modes whole,streamed] [--python PY]

Runs `python -m container_payload quantize` (the ModelOpt reference venv's interpreter, cwd =
this repo, so the checkout's payload is what runs) on the CPU for every recipe that runs there
(the GPU-search ones are left out), on the dense model and, for the MoE layouts, on the MoE
model; streamed mode too where the recipe streams. Small calibration (16 x 128 tokens, batches
of 4) so the whole set takes minutes. --compare prints which outputs differ from a saved run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from container_payload.core import recipes  # noqa: E402  (stdlib only)
from compare_ckpt import tensors  # noqa: E402  (the one raw safetensors reader of tests/tools)

SAMPLES, SEQ_LEN, BATCH = 16, 128, 4
CONFIGS = ("config.json", "hf_quant_config.json")
# result.json keys that say what ran (not how long it took)
RESULT_KEYS = ("recipe", "steps", "steps_applied", "modelopt_preset", "modelopt_config", "kv_cache", "device",
               "low_memory", "loader", "gpus", "mode", "calibration")


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each tensor's dtype, shape and raw bytes, straight from the safetensors layout."""
    out = {name: hashlib.sha256(f"{dtype}{shape}".encode() + raw).hexdigest()
           for name, (dtype, shape, raw) in tensors(folder).items()}
    for name in CONFIGS:
        if (folder / name).exists():
            out[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return dict(sorted(out.items()))


def quantize(python: str, model: Path, recipe: str, mode: str, calib: Path, work: Path) -> dict:
    out = work / f"{model.name}-{recipe}-{mode}"
    out.mkdir(parents=True)
    job = {"model_dir": str(model), "gguf": None, "output_dir": str(out), "format": "nvfp4", "recipe": recipe,
           "kv_cache": "none", "device": "cpu", "mode": mode,
           "calibration": {"source": str(calib), "samples": SAMPLES, "seq_len": SEQ_LEN, "batch_size": BATCH}}
    path = work / f"{out.name}.json"
    path.write_text(json.dumps(job))
    t = time.time()
    proc = subprocess.run([python, "-m", "container_payload", "quantize", str(path)], capture_output=True,
                          text=True, cwd=REPO)
    took = round(time.time() - t, 1)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr).strip().splitlines()[-1:], "seconds": took}
    result = json.loads((out / "result.json").read_text())
    return {"tensors": tensor_hashes(out), "result": {k: result.get(k) for k in RESULT_KEYS}, "seconds": took}


def runs(dense: Path, moe: Path | None, only: list[str] | None, modes: list[str]):
    """(model, recipe, mode) for every CPU recipe: MoE layouts on the MoE model, the rest on the dense one."""
    from container_payload.core import memory_plan

    for name, recipe in recipes.RECIPES.items():
        if recipe.needs.gpu or (only and name not in only):
            continue
        model = moe if recipe.origin == "moe" else dense
        if model is None:
            continue
        for mode in modes:
            if mode == "streamed" and memory_plan.refusal(name):
                continue
            yield model, name, mode


def compare(saved: dict, now: dict) -> int:
    bad = 0
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a is None or b is None:
            print(f"{key}: only in {'the new run' if a is None else 'the saved run'}")
            continue
        if "error" in a or "error" in b:
            same = a.get("error") == b.get("error")
            print(f"{key}: {'same error' if same else 'error'}: {a.get('error')} / {b.get('error')}")
            bad += not same
            continue
        differ = [k for k in set(a["tensors"]) | set(b["tensors"]) if a["tensors"].get(k) != b["tensors"].get(k)]
        facts = [k for k in RESULT_KEYS if a["result"].get(k) != b["result"].get(k)]
        verdict = "IDENTICAL" if not differ else f"{len(differ)} of {len(a['tensors'])} DIFFER, e.g. {sorted(differ)[:3]}"
        print(f"{key}: {verdict}" + (f"; result keys changed: {', '.join(facts)}" if facts else ""))
        bad += bool(differ)
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--moe", type=Path)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--save", type=Path, required=True)
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--recipes")
    ap.add_argument("--modes", default="whole,streamed")
    ap.add_argument("--python", default=str(REPO / ".venv-mo" / "bin" / "python"))
    a = ap.parse_args()
    found = {}
    with tempfile.TemporaryDirectory(prefix="recipe-hashes-") as tmp:
        for model, recipe, mode in runs(a.dense, a.moe, a.recipes.split(",") if a.recipes else None,
                                        a.modes.split(",")):
            key = f"{model.name}/{recipe}/{mode}"
            found[key] = quantize(a.python, model, recipe, mode, a.calib, Path(tmp))
            print(f"{key}: {found[key].get('error') or len(found[key]['tensors'])} ({found[key]['seconds']} s)",
                  flush=True)
            a.save.parent.mkdir(parents=True, exist_ok=True)
            a.save.write_text(json.dumps(found, indent=1))
    if a.compare:
        return 1 if compare(json.loads(a.compare.read_text()), found) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
