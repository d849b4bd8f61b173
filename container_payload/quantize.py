"""Quantize a Hugging Face causal LM to NVFP4 with ModelOpt and export it.

    python3 -m container_payload quantize JOB.json

Stages, each its own function with a narrow interface:
  prepare   (embedded model only) GGUF -> bf16 safetensors folder, once
  load      model + tokenizer, on the GPU when there is one
  calibrate text -> token windows -> batches
  quantize  the recipe's steps (steps.py): mtq.quantize(model, config, forward_loop) among them
  export    export_hf_checkpoint + tokenizer, then result.json written LAST

The job is a contract.QuantizeJob (launcher/job.py builds it). Progress goes to
stdout as events (events.py); a failure ends in one `error` event and exit 1.
"""
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

from . import events, recipes
from .contract import DONE, RESULT_FILE, Calibration, QuantizeJob
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
    portable_tokenizer_config(tmp)
    portable_rope_config(tmp)
    os.replace(tmp, model_dir)


def portable_rope_config(model_dir: Path) -> None:
    """The converted embedded model's rotary base, the same to every transformers: 5.x writes it
    only inside `rope_parameters`, which 4.57 (NVIDIA's 2025 images) does not read, so it would
    calibrate and export with its default rope_theta (10000 where the model has 100000). The
    top-level `rope_theta` (and `rope_scaling`) 4.x reads are written beside it; 5.x reads both."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return
    config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", dict(rope))
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


# Files that make up a Hugging Face tokenizer (and its chat template), copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
                   "chat_template.jinja", "chat_template.json")


def portable_tokenizer_config(model_dir: Path) -> None:
    """The converted embedded model's tokenizer, the same to every transformers: its
    tokenizer.json run as it is (`PreTrainedTokenizerFast`). What the GGUF conversion writes
    depends on the version that ran it: transformers 5 saves "TokenizersBackend", a class 4.x
    does not have; 4.57 saves "LlamaTokenizer", which 5.x rebuilds with another pre-tokenizer
    (other token ids, so other calibration windows)."""
    path = model_dir / "tokenizer_config.json"
    if not path.exists() or not (model_dir / "tokenizer.json").exists():
        return
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") != "PreTrainedTokenizerFast":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False))
        os.replace(tmp, path)


def check_image(job: QuantizeJob, device: str) -> None:
    """Refuse, before any weights load, a job this image's packages cannot finish (the
    launcher checks the same from its probe; this guards direct runs and stale probes)."""
    from . import probe, recipes

    try:
        needs = recipes.needs_for(job.recipe, job.format, job.kv_cache, params=job.recipe_params,
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


def check_model_type(model_dir: Path, trust_remote_code: bool = False) -> None:
    """A model type this image's transformers does not know (Qwen3.5-MoE's `qwen3_5_moe` in an
    image with transformers 4.57) stops the job here in one line, before any weights load:
    transformers' own error comes from deep inside from_pretrained with a traceback. A model
    with its own code (auto_map, --trust-remote-code) brings its type along."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # load_tokenizer and from_pretrained report a missing or unreadable config.json
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
        return
    if trust_remote_code and "auto_map" in config:
        return
    raise PayloadError(f"model type {model_type!r} (config.json) is unknown to this image's transformers "
                       f"{transformers.__version__}: pass --image with a newer image whose transformers knows it",
                       kind="input")


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    events.stage("load", detail=str(model_dir))
    if not (model_dir / "config.json").exists():
        raise PayloadError(f"no config.json in model folder {model_dir}", kind="input")
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def load_model(model_dir: Path, device: str, direct=None, spread: dict | None = None,
               trust_remote_code: bool = False):
    """(model, which loader read the weights). `direct` (optional): a background
    direct_load.read_state_dict whose tensors become the model's (see model_from_state_dict).
    `spread` (gpu_spread's answer): the decoder layers placed over several GPUs by accelerate,
    each GPU filled up to its budget; ModelOpt calibrates through accelerate's hooks as its own
    hf_ptq example does for models larger than one GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = model_from_state_dict(model_dir, direct, device) if direct is not None else None
    loader = "direct" if model is not None else "from_pretrained"
    if model is None:
        placement = {"device_map": "auto", "max_memory": spread} if spread else {"device_map": device}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, low_cpu_mem_usage=True,
                                                     trust_remote_code=trust_remote_code, **placement)
        if spread:
            loader = "from_pretrained, spread over " + ", ".join(
                sorted({f"cuda:{d}" for d in model.hf_device_map.values() if isinstance(d, int)}))
            if any(d in ("cpu", "disk") for d in model.hf_device_map.values()):
                raise PayloadError(f"the model does not fit the GPUs' budget ({spread}): parts landed on the "
                                   "CPU", kind="oom")
    model.eval()
    return model, loader


def gpu_spread(device: str, budget_bytes: int | None, model_dir: Path) -> dict | None:
    """accelerate's max_memory ({gpu index: bytes}) when the model's weights exceed one GPU's
    budget and more than one GPU is visible; None: the whole model on one device."""
    import torch

    if device != "cuda" or torch.cuda.device_count() < 2:
        return None
    per_gpu = budget_bytes or torch.cuda.mem_get_info(0)[1]
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    # one GPU keeps a fifth of its budget for calibration activations and ModelOpt's statistics
    if weights <= 0.8 * per_gpu:
        return None
    # spread: the weights fill each GPU up to 0.9 of its budget (accelerate places whole decoder
    # layers); calibration batches are then sized from what the budget leaves (auto_batch_size)
    return {i: int(0.9 * per_gpu) for i in range(torch.cuda.device_count())}


def model_from_state_dict(model_dir: Path, direct, device: str):
    """The model around the tensors direct_load read (`direct`: its background reader), or None
    when this checkpoint needs from_pretrained (a dtype other than bf16, keys that do not match
    the architecture, ...). Parameters are created on the meta device and then take the loaded
    tensors as they are (assign=True: no copy, no second 16 GB); buffers such as the rotary
    frequencies are computed as in from_pretrained."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        state_dict = direct.result()
    except Exception as e:  # noqa: BLE001 - from_pretrained reads it the usual way instead
        print(f"direct load unavailable ({e}); using from_pretrained", flush=True)
        return None
    try:
        config = AutoConfig.from_pretrained(model_dir)
        if getattr(config, "quantization_config", None) is not None:
            raise ValueError("the checkpoint is already quantized")
        if any(t.dtype != torch.bfloat16 for t in state_dict.values() if t.is_floating_point()):
            raise ValueError("not all weights are bf16")
        # Parameters on meta (initializing them costs nothing there; the checkpoint gives every
        # one); buffers such as the rotary frequencies real.
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        missing = tie_missing_embeddings(model, config, set(missing))
        if unexpected or missing:
            raise ValueError(f"keys differ from the architecture (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
        meta = [n for n, p in model.named_parameters() if p.is_meta]
        if meta:
            raise ValueError(f"{len(meta)} parameters not loaded, e.g. {meta[0]}")
        model.to(device)  # the buffers; the parameters are there already
        model.name_or_path = str(model_dir)
        if (model_dir / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        return model
    except Exception as e:  # noqa: BLE001 - the usual loader handles whatever this one does not
        print(f"direct load not used ({e}); using from_pretrained", flush=True)
        state_dict.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        return None


def tie_missing_embeddings(model, config, missing: set[str]) -> set[str]:
    """As from_pretrained does: an output embedding the checkpoint leaves out is the input
    embedding when the config ties them; one it holds stays its own, even if they differ.
    Returns the keys still missing. (Written out because tie_weights' signature differs
    between transformers 4 and 5.)"""
    out = model.get_output_embeddings()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if out is None or not getattr(text_config, "tie_word_embeddings", False):
        return missing
    name = next(n for n, m in model.named_modules() if m is out) + ".weight"
    if name in missing:
        out.weight = model.get_input_embeddings().weight
        missing = missing - {name}
    return missing


class _Background:
    """Run fn(*args) in a daemon thread; result() re-raises its exception in the caller."""

    def __init__(self, fn, *args):
        import threading

        self._out = None
        self._err = None
        self.ended = None  # time.time() when fn returned

        def body():
            try:
                self._out = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller by result()
                self._err = e
            self.ended = time.time()

        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._err is not None:
            raise self._err
        return self._out


def _prefetch(model_dir: Path) -> int:
    """Read the checkpoint's weight files once, sequentially, so they sit in the page cache when
    from_pretrained maps them (the path when direct_load is off). Runs in a thread during the
    transformers and ModelOpt imports, which need the CPU more than the disk. os.readv releases
    the GIL."""
    buf = bytearray(64 << 20)
    total = 0
    for p in sorted(model_dir.glob("*.safetensors")):
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while True:
                n = os.readv(fd, [buf])
                if n <= 0:
                    break
                total += n
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


def _direct_load_files(setting, device: str, low_memory: bool, model_dir: Path) -> list[Path] | None:
    """The shards direct_load should read, or None to load with from_pretrained. direct_load (job
    key): "auto" = on the GPU unless low_memory, where it saves most (the read overlaps the
    imports, and no pageable copies); true/false force it (tests use true on the CPU); a dict is
    "auto" with reader options (benchmarks)."""
    if setting == "auto" or isinstance(setting, dict):
        setting = device == "cuda" and not low_memory
    if not setting:
        return None
    from . import direct_load  # torch only: starts before transformers is imported

    try:
        return direct_load.checkpoint_files(model_dir)
    except direct_load.UnsupportedCheckpoint:
        return None


def _import_modelopt() -> None:
    import modelopt.torch.export  # noqa: F401
    import modelopt.torch.quantization  # noqa: F401


def calibration_windows(tokenizer, calib: Calibration):
    from .calib_data import read_text, token_windows

    text = read_text(calib.source, tokenizer)
    return token_windows(tokenizer, text, calib.samples, calib.seq_len)


def calibration_batches(windows: list[list[int]], calib: Calibration, device: str, model=None, low_memory=False,
                        gpu_budget: int | None = None):
    """Batches of the (already tokenized, see run()) calibration windows."""
    import torch

    from .calib_data import fingerprint

    events.stage("tokenize", detail=calib.source)
    bs = calib.batch_size
    if bs == "auto":
        bs = auto_batch_size(calib.seq_len, device, model=model, low_memory=low_memory, gpu_budget=gpu_budget)
        bs = min(bs, len(windows))
    ids = torch.tensor(windows, dtype=torch.long)
    batches = [ids[i:i + bs] for i in range(0, len(ids), bs)]
    # batch_shapes: what each forward was fed, in order. The batch is part of the calibration
    # contract: bf16 kernels round differently for other shapes (AMX), so references replay these.
    info = {"samples": len(windows), "seq_len": calib.seq_len, "batch_size": bs,
            "batch_shapes": [list(b.shape) for b in batches],
            "tokens": len(windows) * calib.seq_len, "windows_sha256": fingerprint(windows)}
    return batches, info


def auto_batch_size(seq_len: int, device: str, model=None, low_memory: bool = False,
                    gpu_budget: int | None = None) -> int:
    """Largest batch whose activations fit comfortably: calibration runs the decoder
    only (no lm_head logits), so the peak is a few copies of the widest activation
    (the MLP's intermediate) per token. Fewer, larger batches also mean fewer passes of
    ModelOpt's per-batch weight statistics. Capped at 128 (8 at low_memory)."""
    if device != "cuda":
        return 4  # CPU: bigger batches only add memory, not speed
    import torch

    free, _ = torch.cuda.mem_get_info()
    if gpu_budget:  # a spread model: what its budget leaves on the fullest GPU
        free = min(free, max(0, gpu_budget - max(torch.cuda.memory_allocated(i)
                                                 for i in range(torch.cuda.device_count()))))
    cfg = getattr(model, "config", None)
    width = max(getattr(cfg, "intermediate_size", 0) or 0, 4 * (getattr(cfg, "hidden_size", 0) or 0))
    # bf16 gate/up/act/product copies + ModelOpt's fp32 statistics temporaries; 64 KiB floor
    per_token = max(64 * 1024, 10 * width)
    cap = 8 if low_memory else 128
    return int(max(1, min(cap, (free * 0.5) // (per_token * seq_len))))


def forward_loop_for(batches, device: str, times: dict | None = None):
    import torch

    def forward_loop(model):
        # Calibrate through the decoder only: lm_head stays unquantized, so its
        # vocabulary-sized logits would cost memory and time for nothing.
        t = time.time()
        body = model.get_decoder() if hasattr(model, "get_decoder") else model
        total = len(batches)
        events.progress("calibrate", 0, total)
        # The model's own bf16 products, also on a CPU: float32 ones (linear_compute.py, 5x faster
        # on AVX2) differ by a bf16 rounding at the largest activations, which moved input_scale
        # up to 1.4% away from ModelOpt run directly (tests/test_real_image.py). Our own passes
        # (smoothing statistics, ranking, the sequential streams) still compute in float32.
        with torch.inference_mode():
            for i, batch in enumerate(batches, 1):
                body(input_ids=batch.to(device, non_blocking=True), use_cache=False)
                events.progress("calibrate", i, total)
        if device == "cuda":
            torch.cuda.synchronize()
        if times is not None:
            times["calibrate_s"] = times.get("calibrate_s", 0.0) + time.time() - t

    return forward_loop


def quantize(model, recipe, forward_loop, applied: list | None = None):
    """The recipe's steps in order (steps.py): ModelOpt's calibration among them."""
    from . import steps

    return steps.run(model, recipe, forward_loop, applied)


def export(model, model_dir: Path, out: Path, low_memory: bool = False) -> None:
    import inspect

    import torch
    from modelopt.torch.export import export_hf_checkpoint

    events.stage("export", detail=str(out))
    kwargs = {}
    if low_memory:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # save_pretrained stages one shard at a time in host memory (plus its serialized
        # bytes): smaller shards keep that staging small on a unified-memory machine.
        # ModelOpt before ~0.43 has no such argument: it writes its default shards.
        if "max_shard_size" in inspect.signature(export_hf_checkpoint).parameters:
            kwargs["max_shard_size"] = "2GB"
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(out), **kwargs)
    copy_tokenizer(model_dir, out)


def copy_tokenizer(model_dir: Path, out: Path) -> None:
    """The source model's tokenizer files, byte for byte. Re-saving them would write this
    image's transformers format, which the engine's (often older) transformers may not read."""
    import shutil

    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)  # follows the HF cache's blob links


def versions() -> dict:
    import modelopt
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "modelopt": modelopt.__version__, "python": sys.version.split()[0]}


def torch_gpus(device: str) -> int:
    import torch

    return torch.cuda.device_count() if device == "cuda" else 0


def peak_memory(device: str) -> dict:
    import resource

    import torch

    mem = {"host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device == "cuda":
        mem["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
        if torch.cuda.device_count() > 1:
            mem["gpu_peak_bytes_per_device"] = [torch.cuda.max_memory_allocated(i)
                                                for i in range(torch.cuda.device_count())]
    return mem


def run(job: QuantizeJob) -> dict:
    """One load, one calibration pass, one export. Work that waits on the disk overlaps work that
    needs the CPU, and none of it changes a number. Python's imports hold the GIL, so they run
    one after another in this thread, first: torch, then (the checkpoint's read has started in
    the background: direct_load into the GPU, or _prefetch into the page cache) the tokenizer,
    whose tokenization (Rust) runs in a thread, then ModelOpt. By then the weights are mostly
    read and the model is built around them. `low_memory: true` in the job (big models on a
    unified-memory machine such as a 128 GB Spark) turns direct load and prefetch off (no 16 GB
    of page cache and GPU tensors at once), caps the calibration batch at 8 and exports in 2 GB
    shards."""
    timings = {}
    t0 = time.time()
    timeline = {}  # seconds from the start of run() at which each step was done

    def mark(name, at=None):
        timeline[name] = round((at or time.time()) - t0, 3)

    # The imports and the model's construction create ~a million objects; the cyclic collector
    # would walk them over and over (15% of the import time measured). Nothing cyclic is freed
    # before calibration, so collect nothing until then.
    gc.disable()
    model_dir = Path(job.model_dir)
    low_memory = job.low_memory
    device = pick_device(job.device)
    check_image(job, device)
    check_model_type(model_dir, job.trust_remote_code)
    from . import linear_compute

    linear_compute.CPU_FLOAT32 = job.cpu_float32
    mark("torch_ready")
    if job.gguf:
        prepare_embedded(job.gguf, model_dir)
        timings["prepare_s"] = round(time.time() - t0, 3)
    if job.mode != "whole":  # one layer at a time (streaming.py)
        from . import streaming
        if streaming.chosen_mode(job, model_dir) == "streamed":
            return streaming.run_job(job, device, t0)
    direct = prefetch = None
    spread = gpu_spread(device, job.gpu_memory_budget, model_dir) if (model_dir / "config.json").exists() else None
    files = None if spread or job.trust_remote_code else _direct_load_files(job.direct_load, device, low_memory,
                                                                            model_dir)
    if files:
        from . import direct_load

        opts = job.direct_load if isinstance(job.direct_load, dict) else {}  # benchmark tuning
        direct = _Background(direct_load.read_state_dict, files, device, opts.get("readers", direct_load.READERS),
                             opts.get("chunk_mb", direct_load.CHUNK >> 20) << 20)
    elif (not low_memory if job.prefetch is None else job.prefetch) and (model_dir / "config.json").exists():
        prefetch = _Background(_prefetch, model_dir)

    t = time.time()
    tokenizer = load_tokenizer(model_dir, job.trust_remote_code)
    windows = _Background(calibration_windows, tokenizer, job.calibration)
    _import_modelopt()
    from . import recipe_build

    recipe = recipe_build.build(job.format, job.recipe, job.kv_cache, device, job.recipe_params)
    timings["imports_s"] = round(time.time() - t, 3)  # tokenizer, transformers, ModelOpt
    mark("modelopt_imported")

    t = time.time()
    model, loader = load_model(model_dir, device, direct, spread, job.trust_remote_code)
    for name, reader in (("direct_read", direct), ("prefetch", prefetch)):
        if reader is not None:
            reader.result()
            mark(f"{name}_done", reader.ended)
    timings["load_s"] = round(time.time() - t, 3)  # what the weights' read still took after the imports
    mark("model_ready")
    gc.freeze()  # what exists now lives to the end: later collections skip it
    gc.enable()

    t = time.time()
    windows = windows.result()
    batches, calib_info = calibration_batches(windows, job.calibration, device, model=model,
                                              low_memory=low_memory,
                                              gpu_budget=job.gpu_memory_budget if spread else None)
    timings["tokenize_s"] = round(time.time() - t, 3)

    t = time.time()
    loop_times = {}
    applied: list[str] = []
    model = quantize(model, recipe, forward_loop_for(batches, device, loop_times), applied)
    timings["quantize_s"] = round(time.time() - t, 3)
    if "calibrate_s" in loop_times:
        timings["calibrate_s"] = round(loop_times["calibrate_s"], 3)

    out = Path(job.output_dir)
    t = time.time()
    export(model, model_dir, out, low_memory=low_memory)
    timings["export_s"] = round(time.time() - t, 3)
    timings["total_s"] = round(time.time() - t0, 3)
    mark("export_done")
    timings["timeline"] = dict(sorted(timeline.items(), key=lambda kv: kv[1]))

    result = {
        "status": "complete",
        "format": job.format,
        "recipe": recipe.name,
        "steps": recipes.describe(recipe.steps),
        "steps_applied": applied,
        "modelopt_preset": recipe.preset,
        "modelopt_config": recipe.config.model_dump() if hasattr(recipe.config, "model_dump") else recipe.config,
        "kv_cache": job.kv_cache,
        "device": device,
        "low_memory": low_memory,
        "loader": loader,
        "gpus": torch_gpus(device),
        "calibration": {**dataclasses.asdict(job.calibration), **calib_info},
        "timings": timings,
        "memory": peak_memory(device),
        "versions": versions(),
    }
    return finish(out, result)


def finish(out: Path, result: dict) -> dict:
    """The output's files and size added to `result`, then result.json written LAST (its presence
    is what marks the folder complete) and the `done` event sent; for the whole and streamed paths."""
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    result = {**result, "files": files, "checkpoint_bytes": sum(files.values())}
    tmp = out / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out / RESULT_FILE)
    events.emit(DONE, result=RESULT_FILE, checkpoint_bytes=result["checkpoint_bytes"], timings=result["timings"])
    return result


if __name__ == "__main__":
    sys.exit(events.run_command(["quantize", *sys.argv[1:]]))
