"""Reading a model: the embedded GGUF's conversion, the tokenizer, the whole model (direct_load or
from_pretrained, on one GPU or spread over several), and the background readers that overlap the
checkpoint's read with the imports.

torch, transformers and accelerate are imported inside the functions on purpose: quantize.run
orders the imports (torch, then the tokenizer, then ModelOpt) so that the disk reads started in
the background overlap them, and a module-level import would undo that order.
"""
import json
import os
import shutil
import threading
import time
from pathlib import Path

from ..core import events
from ..core.events import PayloadError


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


# Files that make up a Hugging Face tokenizer (and its chat template), copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
                   "chat_template.jinja", "chat_template.json")


def portable_rope_config(model_dir: Path) -> None:
    """A config.json written by transformers 5 read at the same rotary base by every transformers:
    5.x writes `rope_theta` only inside `rope_parameters`, which 4.57 (NVIDIA's 2025 images and the
    engines built on them) does not read, so it would run at its default base (10000 where SmolLM2
    has 100000). The top-level `rope_theta` (and `rope_scaling`) 4.x reads are written beside it;
    5.x reads both. For the embedded model's conversion and for every exported checkpoint."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return
    config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", dict(rope))
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


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


class Background:
    """Run fn(*args) in a daemon thread; result() re-raises its exception in the caller."""

    def __init__(self, fn, *args):
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


def prefetch_page_cache(model_dir: Path) -> int:
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


def direct_load_files(setting, device: str, low_memory: bool, model_dir: Path) -> list[Path] | None:
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


def import_modelopt() -> None:
    import modelopt.torch.export  # noqa: F401
    import modelopt.torch.quantization  # noqa: F401


def copy_tokenizer(model_dir: Path, out: Path) -> None:
    """The source model's tokenizer files, byte for byte. Re-saving them would write this
    image's transformers format, which the engine's (often older) transformers may not read."""
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)  # follows the HF cache's blob links
