"""Quantize a Hugging Face causal LM to NVFP4 with ModelOpt and export it.

    python3 -m container_payload.quantize JOB.json

Stages, each its own function with a narrow interface:
  prepare   (embedded model only) GGUF -> bf16 safetensors folder, once
  load      model + tokenizer, on the GPU when there is one
  calibrate text -> token windows -> batches
  quantize  mtq.quantize(model, recipe config, forward_loop) [+ our refine step]
  export    export_hf_checkpoint + tokenizer, then result.json written LAST

The job file is written by the launcher (launcher/job.py builds it). Progress goes to
stdout as events (events.py); a failure ends in one `error` event and exit 1.
"""
import json
import os
import sys
import time
from pathlib import Path

from . import events
from .events import PayloadError


def prepare_embedded(gguf: str, model_dir: Path) -> None:
    """Convert the embedded GGUF into a bf16 safetensors folder, atomically."""
    if (model_dir / "config.json").exists():
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    events.stage("prepare", detail=f"converting {Path(gguf).name} to bf16 safetensors (once)")
    src = Path(gguf)
    tmp = model_dir.with_name(model_dir.name + f".tmp-{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, model_dir)


def pick_device(requested: str) -> str:
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise PayloadError("a GPU was requested but torch sees no CUDA device in the container", kind="gpu")
    return "cpu"


def load(model_dir: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    events.stage("load", detail=str(model_dir))
    if not (model_dir / "config.json").exists():
        raise PayloadError(f"no config.json in model folder {model_dir}", kind="input")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, device_map=device, low_cpu_mem_usage=True)
    model.eval()
    return model, tokenizer


def calibration_batches(tokenizer, calib: dict, device: str):
    import torch

    from .calib_data import fingerprint, read_text, token_windows

    events.stage("tokenize", detail=calib["source"])
    text = read_text(calib["source"], tokenizer)
    windows = token_windows(tokenizer, text, calib["samples"], calib["seq_len"])
    bs = calib["batch_size"]
    if bs == "auto":
        bs = auto_batch_size(calib["seq_len"], device)
    ids = torch.tensor(windows, dtype=torch.long)
    batches = [ids[i:i + bs] for i in range(0, len(ids), bs)]
    info = {"samples": len(windows), "seq_len": calib["seq_len"], "batch_size": bs,
            "tokens": len(windows) * calib["seq_len"], "windows_sha256": fingerprint(windows)}
    return batches, info


def auto_batch_size(seq_len: int, device: str) -> int:
    """Largest batch whose activations fit comfortably: calibration runs the decoder
    only (no lm_head logits), so the peak is a few hidden-state copies per token."""
    if device != "cuda":
        return 4  # CPU: bigger batches only add memory, not speed
    import torch

    free, _ = torch.cuda.mem_get_info()
    per_token = 64 * 1024  # bytes of transient activations per token, generous for 8B
    return int(max(1, min(64, (free * 0.5) // (per_token * seq_len))))


def forward_loop_for(batches, device: str):
    import torch

    def forward_loop(model):
        # Calibrate through the decoder only: lm_head stays unquantized, so its
        # vocabulary-sized logits would cost memory and time for nothing.
        body = model.get_decoder() if hasattr(model, "get_decoder") else model
        total = len(batches)
        events.progress("calibrate", 0, total)
        with torch.inference_mode():
            for i, batch in enumerate(batches, 1):
                body(input_ids=batch.to(device), use_cache=False)
                events.progress("calibrate", i, total)

    return forward_loop


def quantize(model, recipe, forward_loop):
    import modelopt.torch.quantization as mtq

    events.stage("calibrate", detail=f"recipe {recipe.name} ({recipe.preset})")
    model = mtq.quantize(model, recipe.config, forward_loop)
    if recipe.refine is not None:
        events.stage("refine", detail=recipe.name)
        recipe.refine(model, forward_loop)
    return model


def export(model, tokenizer, out: Path) -> None:
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    events.stage("export", detail=str(out))
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(out))
    tokenizer.save_pretrained(out)


def versions() -> dict:
    import modelopt
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "modelopt": modelopt.__version__, "python": sys.version.split()[0]}


def peak_memory(device: str) -> dict:
    import resource

    import torch

    mem = {"host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device == "cuda":
        mem["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return mem


def run(job: dict) -> dict:
    from . import recipes

    timings = {}
    t0 = time.time()
    model_dir = Path(job["model_dir"])
    if job.get("gguf"):
        prepare_embedded(job["gguf"], model_dir)
        timings["prepare_s"] = round(time.time() - t0, 3)
    recipe = recipes.build(job["format"], job["recipe"], job.get("kv_cache", "none"))
    device = pick_device(job.get("device", "auto"))

    t = time.time()
    model, tokenizer = load(model_dir, device)
    timings["load_s"] = round(time.time() - t, 3)

    t = time.time()
    batches, calib_info = calibration_batches(tokenizer, job["calibration"], device)
    timings["tokenize_s"] = round(time.time() - t, 3)

    t = time.time()
    model = quantize(model, recipe, forward_loop_for(batches, device))
    timings["quantize_s"] = round(time.time() - t, 3)

    out = Path(job["output_dir"])
    t = time.time()
    export(model, tokenizer, out)
    timings["export_s"] = round(time.time() - t, 3)
    timings["total_s"] = round(time.time() - t0, 3)

    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    result = {
        "status": "complete",
        "format": job["format"],
        "recipe": recipe.name,
        "modelopt_preset": recipe.preset,
        "modelopt_config": recipe.config,
        "kv_cache": job.get("kv_cache", "none"),
        "device": device,
        "calibration": {**job["calibration"], **calib_info},
        "timings": timings,
        "memory": peak_memory(device),
        "versions": versions(),
        "files": files,
        "checkpoint_bytes": sum(files.values()),
    }
    # Written last: its presence is what marks the folder complete.
    tmp = out / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out / "result.json")
    events.emit("done", result="result.json", checkpoint_bytes=result["checkpoint_bytes"],
                timings=timings)
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python3 -m container_payload.quantize JOB.json", file=sys.stderr)
        return 2
    try:
        job = json.loads(Path(argv[0]).read_text())
        run(job)
        return 0
    except PayloadError as e:
        events.emit("error", kind=e.kind, message=str(e))
        return 1
    except MemoryError:
        events.emit("error", kind="oom", message="host memory ran out during quantization")
        return 1
    except Exception as e:  # noqa: BLE001 - the launcher needs one line, the log keeps the trace
        import traceback

        traceback.print_exc()
        kind = "oom" if "out of memory" in str(e).lower() else "error"
        events.emit("error", kind=kind, message=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
