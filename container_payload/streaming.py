"""Layer-streamed quantization: the whole model is never in memory at once.

    skeleton on the meta device -> embeddings read, first layer's inputs captured ->
    per decoder layer: read from the shards, ModelOpt quantize + calibrate on the captured
    inputs, ModelOpt's per-module export, tensors written, freed -> the rest, configs last

Peak memory is about one decoder layer (bf16, plus its export) + the calibration activations
(tokens x hidden x bf16, once: each layer's outputs replace its inputs) + the embeddings while
the inputs are captured + one shard being written.

Why the bytes equal the whole-model path: ModelOpt's max calibration runs the model
UNQUANTIZED (quantizers only collect amax), so layer i's inputs here are exactly the hidden
states the whole model computes, with the same batches, the same bf16 kernels and the same
rotary / mask arguments (captured where the decoder hands them to its first layer). Each layer
is quantized inside a view that names it as the full model does ("model.layers.7"), so
ModelOpt's name patterns, its shared q/k/v and gate/up global amax, the export's fusion
(collect_shared_input_modules + _fuse_shared_input_modules: what requantize_resmooth_fused_
llm_layers does on the whole model) and its per-module handlers see what they see there.
Non-layer tensors (embeddings, final norm, lm_head) are copied from the source, as the
whole-model export writes them unchanged.

What streams: memory_plan.STREAMED_RECIPES, the recipes whose steps each need one layer:
- `default`: ModelOpt's max calibration, nothing of ours: the same bytes as the whole path.
- Smooth: each layer's statistics from a third stream of hidden states, the unsmoothed model's
  (the whole path measures every layer in one pass before it folds anything), then folded into
  that layer before its calibration.
- the sequential Gptq (gptq-seq, smooth-gptq-seq): sequential.refine_layer after the layer's
  calibration, on its own two streams (original, quantized), kept in host memory; every unit
  input it captures waits there too, so the GPU holds the layer, one chunk and the unit's H, C.
The calibration stream stays separate from the GPTQ's original stream: the whole path's
calibration runs in bf16, its GPTQ pass in float32 on a CPU (linear_compute.py), and each stream
here is the whole path's, bit for bit. Tested on nvfp4 without KV cache; --format nvfp4-w4a16 /
fp8 and --kv-cache fp8 go the same way but are untested. keep_bf16 (the whole model's KL),
the one-pass GPTQ and ModelOpt's searches are refused in one line (memory_plan.refusal).
Needs ModelOpt >= 0.47 (its streaming shard writer and per-tensor export post-processing).
"""
from __future__ import annotations

import contextlib
import gc
import io
import os
import time
from pathlib import Path

import torch
from torch import nn

from . import events, recipes
from .direct_load import _read_into, checkpoint_files, read_header
from .events import PayloadError
from .linear_compute import float32_linears
from .quantizers import QuantizersOff, quantized_linears
from .sequential import Fit, _Timer, capture_layer_calls, layer_output, refine_layer, start_streams
from .smoothing import Smoothed, smooth

MIN_MODELOPT = (0, 47)


class ShardReader:
    """Single tensors out of safetensors shards, by name, read with preadv into fresh tensors:
    no mmap, so nothing of the file stays mapped (and counted in RSS) after a read."""

    def __init__(self, model_dir: Path):
        self.where: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        for path in checkpoint_files(model_dir):
            start, entries = read_header(path)
            for name, dtype, shape, begin, end in entries:
                self.where[name] = (path, dtype, shape, start + begin, end - begin)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def nbytes(self, name: str) -> int:
        return self.where[name][4]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        path, src_dtype, shape, pos, size = self.where[name]
        t = torch.empty(shape, dtype=src_dtype)
        if size:
            fd = os.open(path, os.O_RDONLY)
            try:
                _read_into(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()), pos)
            finally:
                os.close(fd)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t


def skeleton(model_dir: Path, dtype=torch.bfloat16, trust_remote_code: bool = False):
    """The model with every parameter on the meta device (buffers such as rotary frequencies
    real), as from_pretrained would build it (the model's own code too, with trust_remote_code)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise PayloadError(f"{model_dir} is already quantized", kind="input")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.name_or_path = str(model_dir)
    if (model_dir / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model


def read_params(module: nn.Module, prefix: str, reader: ShardReader, dtype, skip: str | None = None) -> dict:
    """The host tensors of every meta parameter of `module` (but those under `skip`), by name."""
    out = {}
    for name, p in list(module.named_parameters()):
        if not p.is_meta or (skip and name.startswith(skip)):
            continue
        key = prefix + name
        if key not in reader:
            raise PayloadError(f"streamed mode reads tensors by the model's parameter names and "
                               f"{key} is not in the checkpoint (a converted layout); use --mode whole",
                               kind="input")
        out[name] = reader.read(key, dtype)
    return out


def materialize(module: nn.Module, prefix: str, reader: ShardReader, device: str, dtype,
                skip: str | None = None, values: dict | None = None) -> None:
    """Every meta parameter of `module` (but those under `skip`) read from the shards, or taken
    from `values` (read_params' answer, read ahead); accelerate sets each in place."""
    from accelerate.utils import set_module_tensor_to_device

    values = read_params(module, prefix, reader, dtype, skip) if values is None else values
    for name, value in values.items():
        set_module_tensor_to_device(module, name, device, value=value)


def free(module: nn.Module) -> None:
    """Parameters and buffers back to meta: the memory goes, the structure stays."""
    module.to("meta")


def prefixed(name: str, module: nn.Module) -> nn.Module:
    """A root whose only path to `module` is `name`: ModelOpt sees "model.layers.7.mlp..."
    exactly as in the whole model (its config patterns and fusion go by names)."""
    root = node = nn.Module()
    *parents, last = name.split(".")
    for part in parents:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(last, module)
    return root


def capture_inputs(model, batches, device: str, keep: str) -> tuple[list, list]:
    """(the first layer's hidden states per batch, on `keep`; per layer, the (args, kwargs) the
    decoder hands it per batch): sequential.capture_layer_calls over the calibration batches.
    On a GPU the hidden states go to pinned host memory (Fit.back): each layer's calibration
    copies them in and its outputs back, asynchronously."""
    def run():
        with torch.inference_mode():
            for batch in batches:
                decoder(input_ids=batch.to(device), use_cache=False)
        if device == "cuda":
            torch.cuda.synchronize()  # the copies are done before the host copies them (_copy)

    decoder = model.get_decoder()
    return capture_layer_calls(decoder, run, Fit(device=device, keep=keep).back)


def _to(value, device):
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _copy(h: torch.Tensor) -> torch.Tensor:
    """A copy of a captured input, pinned like it when it is (clone() would not pin it)."""
    return torch.empty(h.shape, dtype=h.dtype, pin_memory=True).copy_(h) if h.is_pinned() else h.clone()


def _first_sequence(item):
    """[hidden, args, kwargs] of one batch cut to its first sequence (a cheap probe input:
    the whole-model export probes with 2 tokens). Tensors whose first dim is the batch are
    cut; the rest (rotary cos/sin of batch 1, flags) are shared."""
    h, args, kwargs = item
    bs = h.shape[0]

    def cut(v):
        if torch.is_tensor(v):
            return v[:1].clone() if v.dim() >= 2 and v.shape[0] == bs else v
        if isinstance(v, (tuple, list)):
            return type(v)(cut(x) for x in v)
        return v
    return [cut(h), cut(tuple(args)), {k: cut(v) for k, v in kwargs.items()}]


def _modelopt_parts():
    """ModelOpt's export internals this path uses (0.47+), or a one-line refusal."""
    import modelopt

    if recipes.version_tuple(modelopt.__version__) < MIN_MODELOPT:
        raise PayloadError(f"streamed mode needs ModelOpt >= 0.47 (this image has {modelopt.__version__}); "
                           "let the launcher derive an image, or use --mode whole", kind="image")
    from modelopt.torch.export import unified_export_hf as hf
    from modelopt.torch.export.quant_utils import _postprocess_single_tensor, get_quant_config
    from modelopt.torch.export.registry import ExportContext
    from modelopt.torch.export.unified_export_hf_streaming import _StreamingShardWriter
    return hf, _postprocess_single_tensor, get_quant_config, ExportContext, _StreamingShardWriter


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
    which freed layers stay in the heap as fragments: measured on a 48-layer model, RSS grew
    by about one bf16 layer per layer (+260 MB) instead of staying flat (+17 MB). A fixed
    threshold keeps every tensor-sized block in its own mapping, returned when freed."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD; also turns the dynamic raise off
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def run_streamed(model_dir: Path, out: Path, recipe, batches, device: str, trust_remote_code: bool = False) -> dict:
    """Quantize and export layer by layer (see the module docstring). `recipe`: a BuiltRecipe
    whose steps stream (pipelines.choose refuses the others first: memory_plan.refusal_of).
    Returns facts for result.json."""
    import modelopt.torch.quantization as mtq

    by_key = {s.key: s for s in recipe.steps}  # the steps this pipeline runs per layer (recipes.Plan)
    smooth, gptq = by_key.get(recipes.Smooth.key), by_key.get(recipes.Gptq.key)
    hf, postprocess, get_quant_config, ExportContext, ShardWriter = _modelopt_parts()
    _return_freed_memory()
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    reader = ShardReader(model_dir)
    model = skeleton(model_dir, trust_remote_code=trust_remote_code)
    dtype = hf._resolve_export_dtype(model, None)
    decoder = model.get_decoder()
    layers = decoder.layers
    layer_names = {id(m): n for n, m in model.named_modules()}
    names = [layer_names[id(layer)] for layer in layers]
    layer_bytes = [sum(reader.nbytes(f"{n}.{p}") for p, _ in layer.named_parameters() if f"{n}.{p}" in reader)
                   for n, layer in zip(names, layers)]
    # Shards of about one bf16 layer: the writer's buffer adds at most that to the peak.
    writer = ShardWriter(out, max(layer_bytes))
    keep = "cpu"  # activations stay in host memory, moved per batch (on a Spark: the same pool)

    # 1. ModelOpt's conversion of everything outside the layers (lm_head and the embeddings are
    #    QuantLinear / QuantEmbedding with their quantizers off, as in the whole model), on meta.
    from modelopt.torch.opt import apply_mode
    from modelopt.torch.quantization.mode import QuantizeModeRegistry

    decoder.layers = nn.ModuleList()
    try:  # the conversion step of mtq.quantize alone: nothing to calibrate out here
        apply_mode(model, mode=[("quantize", dict(recipe.config))], registry=QuantizeModeRegistry)
    finally:
        decoder.layers = layers
    outside = [n for n, q in _enabled_quantizers(model)]
    if outside:
        raise PayloadError(f"recipe {recipe.name!r} quantizes {outside[0]}, outside the decoder layers: "
                           "it cannot stream; use --mode whole", kind="input")

    # 2. the decoder's own weights (embeddings, final norm), the first layer's inputs
    events.stage("calibrate", detail=f"streamed: capturing the first layer's inputs ({len(batches)} batches)")
    layer_keys = tuple(n + "." for n in names)
    decoder_prefix = layer_names[id(decoder)] + "." if layer_names[id(decoder)] else ""
    materialize(decoder, decoder_prefix, reader, device, dtype, skip="layers.")
    inputs, layer_calls = capture_inputs(model, batches, device, keep)
    # the recipe's other streams start from the same first-layer inputs (copies: the
    # calibration loop overwrites its own in place)
    stats = [_copy(h) for h in inputs] if smooth else None
    if gptq:
        fp, qs, chunk_calls = start_streams([_copy(h) for h in inputs], layer_calls)
        fit = Fit(ridge=gptq.ridge, kernel=gptq.kernel, scales=gptq.scales,
                  hessian_tf32=gptq.hessian_tf32, replay=False, device=device, keep=keep)
        timer = _Timer()
    free(decoder)  # the layers are meta already; embeddings and norm go (written in step 4)
    gc.collect()
    gc.freeze()  # the imports' million objects: the per-layer collections below skip them

    # 3. layer by layer. The next layer's tensors are read while this one is calibrated and
    #    exported (preadv releases the GIL): the read, from disk at 1-2 GB/s, was a third of the
    #    layer loop at 8B. One more layer in host memory (memory_plan.LAYER_COPIES counts it).
    from concurrent.futures import ThreadPoolExecutor

    phases = {"read_wait": 0.0, "smooth": 0.0, "calibrate": 0.0, "refine": 0.0, "export": 0.0}  # seconds
    smoothed, reached = Smoothed(), 0  # what smoothing and the GPTQ did, over all layers
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
    pending = ahead.submit(read_params, layers[0], names[0] + ".", reader, dtype) if layers else None
    for i, (name, layer) in enumerate(zip(names, layers)):
        events.progress("calibrate", i, len(layers))
        t = time.time()
        values = pending.result()
        phases["read_wait"] += time.time() - t
        pending = (ahead.submit(read_params, layers[i + 1], names[i + 1] + ".", reader, dtype)
                   if i + 1 < len(layers) else None)
        materialize(layer, name + ".", reader, device, dtype, values=values)
        del values
        root = prefixed(name, layer)
        args = layer_calls[i]  # (args, kwargs) per batch, as the decoder hands them to this layer
        probe = _first_sequence(_to([inputs[0], *args[0]], device))
        calls = [0]

        def forward_loop(_root, layer=layer, calls=calls, args=args):
            calls[0] += 1
            with torch.inference_mode():
                for j, (h, (a, k)) in enumerate(zip(inputs, args)):
                    o = layer_output(layer(h.to(device, non_blocking=True), *_to(a, device), **_to(k, device)))
                    if h.is_pinned() and o.shape == h.shape and o.dtype == h.dtype:
                        h.copy_(o, non_blocking=True)  # the next layer's input, in the same pinned buffer
                    else:
                        inputs[j] = o.to(keep)  # the next layer's input; this one is done
                if device == "cuda":
                    torch.cuda.synchronize()  # every output is back in host memory

        t = time.time()
        if smooth:
            smoothed.add(_smooth_layer(layer, stats, args, smooth.alpha, device, keep))
        phases["smooth"] += time.time() - t
        t = time.time()
        with contextlib.redirect_stdout(io.StringIO()):  # "Inserted 21 quantizers", per layer
            mtq.quantize(root, recipe.config, forward_loop)
        phases["calibrate"] += time.time() - t
        if calls[0] != 1:
            raise PayloadError(f"ModelOpt ran the calibration loop {calls[0]} times for {name}; streamed "
                               "mode supports one pass (max calibration); use --mode whole", kind="input")
        t = time.time()
        if gptq:
            linears = quantized_linears(root)
            with QuantizersOff(root), float32_linears(root):
                fp, qs, _ = refine_layer(layer, linears, fp, qs, chunk_calls[i], {}, fit, timer)
            reached += len(linears)
            del linears
        phases["refine"] += time.time() - t
        t = time.time()
        _export_layer(root, layer, name, probe, dtype, writer, hf, postprocess, get_quant_config, ExportContext)
        del probe, root
        free(layer)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        phases["export"] += time.time() - t
    events.progress("calibrate", len(layers), len(layers))
    ahead.shutdown()
    inputs = stats = None  # freed (the loop's closures held them)
    if gptq:
        del fp, qs, chunk_calls
        events.emit("log", message=f"refine: sequential activation-aware GPTQ, streamed ({timer})")

    # 4. everything outside the layers, as the source has it (cast to the export dtype)
    events.stage("export", detail=str(out))
    tied = _tied_output_key(model)
    for key in reader.where:
        if key.startswith(layer_keys) or key == tied:
            continue
        new_key, value = postprocess(key, reader.read(key, dtype), 448, None, False)
        if new_key is not None:
            writer.add(new_key, value.contiguous())
    writer.finalize()

    # 5. configs, as export_hf_checkpoint writes them: hf_quant_config.json from the whole
    #    (now meta) model's quantizers, config.json with its quantization_config
    quant_config = get_quant_config(model)
    hf._sanitize_generation_config_for_save(model)
    patches = hf._patch_revert_weight_conversion()
    try:
        model.config.save_pretrained(str(out))
    finally:
        hf._unpatch_revert_weight_conversion(patches)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    if getattr(model, "_auto_class", None) is not None:  # a model with its own code: its modeling file,
        from transformers.dynamic_module_utils import custom_object_save  # as save_pretrained copies it

        custom_object_save(model, str(out), config=model.config)
    hf._write_hf_export_config(model, quant_config, out)
    # the whole path's lines (steps.run), each marked "layer by layer"
    lines = {recipes.Smooth.key: smoothed.line(), recipes.Calibrate.key: f"ModelOpt {recipe.preset}",
             recipes.Gptq.key: f"{reached} quantized Linears"}
    applied = [f"{step.key}: {lines[step.key]}, layer by layer" for step in recipe.steps]
    return {"mode": "streamed", "layers": len(layers), "largest_layer_bytes": max(layer_bytes), "applied": applied,
            "stream_s": round(time.time() - t0, 3), "layer_loop_s": {k: round(v, 3) for k, v in phases.items()}}


def _smooth_layer(layer: nn.Module, stats: list, args: list, alpha: float, device: str, keep: str):
    """smoothing.smooth on one layer: its statistics from the unsmoothed stream `stats` (hidden
    states per batch, advanced in place through the still unsmoothed layer, as the whole path's
    one statistics pass runs the unsmoothed model), then the scales folded. `args`: the layer's
    (args, kwargs) per batch. Returns smoothing's report for the layer."""
    holder = nn.Module()
    holder.layers = nn.ModuleList([layer])  # smoothing finds its groups in `.layers`
    back = Fit(device=device, keep=keep).back

    def stats_loop(_holder):
        with torch.inference_mode():
            for j, (h, (a, k)) in enumerate(zip(stats, args)):
                stats[j] = back(layer_output(layer(h.to(device, non_blocking=True), *_to(a, device),
                                                       **_to(k, device))))

    with contextlib.redirect_stdout(io.StringIO()):
        return smooth(holder, stats_loop, alpha, log=False)


def _enabled_quantizers(module: nn.Module):
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [(n, q) for n, q in module.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled]


def _tied_output_key(model) -> str | None:
    """The output embedding's key when the config ties it to the input embedding: the whole
    export drops that alias (its TiedWeightMap); so does this path."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    out = model.get_output_embeddings()
    if out is None or not getattr(config, "tie_word_embeddings", False):
        return None
    return next(n for n, m in model.named_modules() if m is out) + ".weight"


def _export_layer(root, layer, name, probe, dtype, writer, hf, postprocess, get_quant_config, ExportContext):
    """One quantized layer through ModelOpt's export: the fused groups' shared amax (what
    requantize_resmooth_fused_llm_layers does on the whole model, here with one captured batch
    as its probe input), each module's export handler, the per-tensor post-processing."""
    h, a, k = probe
    inputs, norms = hf.collect_shared_input_modules(root, lambda: layer(h, *a, **k), collect_layernorms=True)
    hf._fuse_shared_input_modules(root, inputs, norms, qkv_only=False, fuse_layernorms=True,
                                  quantization_format=hf.get_quantization_format(root))
    kv_format = get_quant_config(root)["quantization"]["kv_cache_quant_algo"]
    ctx = ExportContext(model=root, dtype=dtype, is_modelopt_qlora=False)
    with torch.inference_mode():
        for sub_name, sub in layer.named_modules():
            hf._dispatch_export_handler(f"{name}.{sub_name}" if sub_name else name, sub, ctx)
        for key, tensor in layer.state_dict().items():
            new_key, value = postprocess(f"{name}.{key}", tensor, 448, kv_format, False)
            if new_key is not None:
                writer.add(new_key, value.detach().contiguous().cpu())
