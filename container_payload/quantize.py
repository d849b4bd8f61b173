"""Quantize a Hugging Face causal LM to NVFP4 with ModelOpt and export it.

    python3 -m container_payload quantize JOB.json

One skeleton for every recipe and both modes (run):
  prepare   the device, the image's packages, the embedded GGUF -> bf16 safetensors (once)
  resolve   the recipe's steps, once (recipes.with_params); the pipeline they run in (pipelines.choose)
  load      tokenizer (its tokenization in a thread), ModelOpt, the recipe's configuration, the model
  tokenize  text -> token windows -> batches (calibration.py)
  run       the pipeline: the steps (steps.py or streaming.py) and the export
  finish    one result, result.json written LAST

The job is a contract.QuantizeJob (launcher/quantize/job.py builds it). Progress goes to
stdout as events (events.py); a failure ends in one `error` event and exit 1.
"""
import dataclasses
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

from . import probe
from .core import events, recipes
from .core.contract import DONE, RESULT_FILE, QuantizeJob
from .core.events import PayloadError
from .core.tuning import Tuning
from .pipelines import calibration, loading, pipelines


def check_image(job: QuantizeJob, device: str, steps: tuple | None) -> None:
    """Refuse, before any weights load, a job this image's packages cannot finish (the
    launcher checks the same from its probe; this guards direct runs and stale probes)."""
    try:
        needs = recipes.needs_for(job.recipe, job.format, job.kv_cache, steps=steps,
                                  embedded=bool(job.gguf) and not (Path(job.model_dir) / "config.json").exists())
    except (KeyError, ValueError):
        return  # an unknown recipe or a bad parameter: recipe_build.build refuses it in one line
    missing = recipes.shortfalls(needs, probe.installed(), cuda=device == "cuda")
    if missing:
        raise PayloadError(f"this image cannot run recipe {job.recipe!r}: {'; '.join(map(str, missing))}; "
                           "let the launcher derive an image (no --no-image-upgrade), or pass --image with "
                           "newer packages", kind="image")


def pick_device(requested: str) -> str:
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise PayloadError("a GPU was requested but torch sees no CUDA device in the container", kind="gpu")
    return "cpu"


def versions() -> dict:
    import modelopt
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "modelopt": modelopt.__version__, "python": sys.version.split()[0]}


def torch_gpus(device: str) -> int:
    import torch

    return torch.cuda.device_count() if device == "cuda" else 0


def peak_memory(device: str, by_phase: dict | None = None) -> dict:
    """Peak host RSS and GPU bytes; by_phase: a streamed run's peaks per phase (streaming.Peaks resets
    torch's peak at each phase, so the run's peak is the largest of them and what came after)."""
    import torch

    mem = {"host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device == "cuda":
        mem["gpu_peak_bytes"] = max([torch.cuda.max_memory_allocated(), *(by_phase or {}).values()])
        if torch.cuda.device_count() > 1:
            mem["gpu_peak_bytes_per_device"] = [torch.cuda.max_memory_allocated(i)
                                                for i in range(torch.cuda.device_count())]
    return mem


def cpu_seconds() -> float:
    """This process's user + system CPU seconds so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return round(r.ru_utime + r.ru_stime, 3)


def resolve_steps(job: QuantizeJob) -> tuple | None:
    """The recipe's typed steps with the job's parameters, resolved once for the whole run
    (None: a ModelOpt YAML recipe, which has no steps of ours)."""
    if job.recipe not in recipes.RECIPES:
        return None
    try:
        return recipes.with_params(job.recipe, job.recipe_params)
    except ValueError as e:
        raise PayloadError(str(e), kind="input") from None


def run(job: QuantizeJob) -> dict:
    """prepare -> resolve -> load -> tokenize -> pipeline.run -> one result -> finish. Work that
    waits on the disk overlaps work that needs the CPU, and none of it changes a number. Python's
    imports hold the GIL, so they run one after another in this thread, first: torch, then (the
    checkpoint's read has started in the background: direct_load into the GPU, or a prefetch into
    the page cache) the tokenizer, whose tokenization (Rust) runs in a thread, then ModelOpt. By
    then the weights are mostly read and the model is built around them. `low_memory: true` in
    the job (big models on a unified-memory machine such as a 128 GB Spark) turns direct load and
    prefetch off (no 16 GB of page cache and GPU tensors at once), caps the calibration batch at
    8 and exports in 2 GB shards."""
    timings = {}
    t0 = time.time()
    timeline = {}  # seconds from the start of run() at which each step was done

    def mark(name, at=None):
        timeline[name] = round((at or time.time()) - t0, 3)

    # The imports and the model's construction create ~a million objects; the cyclic collector
    # would walk them over and over (15% of the import time measured). Nothing cyclic is freed
    # before calibration, so collect nothing until then.
    gc.disable()
    model_dir, out = Path(job.model_dir), Path(job.output_dir)
    device = pick_device(job.device)
    steps = resolve_steps(job)
    check_image(job, device, steps)
    loading.check_model_type(model_dir, job.trust_remote_code)
    tuning = Tuning.of(job)
    mark("torch_ready")
    if job.gguf:
        loading.prepare_embedded(job.gguf, model_dir)
        timings["prepare_s"] = round(time.time() - t0, 3)
    pipeline = pipelines.choose(job, device, tuning, steps, mark)
    pipeline.start()

    t = time.time()
    tokenizer = loading.load_tokenizer(model_dir, job.trust_remote_code)
    windows = loading.Background(calibration.calibration_windows, tokenizer, job.calibration)
    loading.import_modelopt()
    from .steps import recipe_build  # ModelOpt: imported last (see above)

    recipe = recipe_build.build(job.format, job.recipe, job.kv_cache, device, job.recipe_params, steps)
    timings["imports_s"] = round(time.time() - t, 3)  # tokenizer, transformers, ModelOpt
    mark("modelopt_imported")

    t = time.time()
    pipeline.load()
    timings["load_s"] = round(time.time() - t, 3)  # what the weights' read still took after the imports
    mark("model_ready")
    gc.freeze()  # what exists now lives to the end: later collections skip it
    gc.enable()

    t = time.time()
    batches, calib_info = calibration.calibration_batches(windows.result(), job.calibration, device,
                                                          **pipeline.batch_sizing())
    timings["tokenize_s"] = round(time.time() - t, 3)

    from .numerics import linear_compute  # torch, loaded by now

    with linear_compute.cpu_float32(tuning.cpu_float32):
        facts = pipeline.run(recipe, batches, out, timings)
    timings["total_s"] = round(time.time() - t0, 3)
    timings["cpu_s"] = cpu_seconds()  # beside the wall time: on a shared host the wall time is inflated
    mark("export_done")
    timings["timeline"] = dict(sorted(timeline.items(), key=lambda kv: kv[1]))
    return finish(out, result(job, recipe, device, facts, calib_info, timings))


def result(job: QuantizeJob, recipe, device: str, facts: dict, calib_info: dict, timings: dict) -> dict:
    """result.json's facts, the same keys from either pipeline (`facts`: what it adds: mode,
    loader, steps_applied, and the streamed pipeline's per-layer facts)."""
    config = recipe.config.model_dump() if hasattr(recipe.config, "model_dump") else recipe.config
    return {
        "status": "complete",
        "format": job.format,
        "recipe": recipe.name,
        "steps": recipes.describe(recipe.steps),
        "steps_applied": facts["steps_applied"],
        "modelopt_preset": recipe.preset,
        "modelopt_config": json.loads(json.dumps(config, default=str)),  # serialized as it is written
        "kv_cache": job.kv_cache,
        "device": device,
        "mode": facts["mode"],
        "low_memory": job.low_memory,
        "loader": facts["loader"],
        "gpus": torch_gpus(device),
        "calibration": {**dataclasses.asdict(job.calibration), **calib_info},
        "timings": timings,
        "memory": peak_memory(device, facts.get("streamed", {}).get("gpu_peak_bytes")),
        "versions": versions(),
        **({"streamed": facts["streamed"]} if "streamed" in facts else {}),
    }


def finish(out: Path, result: dict) -> dict:
    """The output's files and size added to `result`, then result.json written LAST (its presence
    is what marks the folder complete) and the `done` event sent; for the whole and streamed paths."""
    loading.portable_rope_config(out)  # an export by transformers 5 read right by 4.x engines too
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    result = {**result, "files": files, "checkpoint_bytes": sum(files.values())}
    tmp = out / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out / RESULT_FILE)
    events.emit(DONE, result=RESULT_FILE, checkpoint_bytes=result["checkpoint_bytes"], timings=result["timings"])
    return result


if __name__ == "__main__":
    sys.exit(events.run_command(["quantize", *sys.argv[1:]]))
