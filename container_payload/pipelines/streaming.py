"""Layer-streamed quantization: the whole model is never in memory at once.

    skeleton on the meta device -> embeddings read, first layer's inputs captured ->
    per pass, per decoder layer: read from the shards, each step's streamed runner in recipe
    order (streamed_steps.RUNNERS: smoothing, ModelOpt quantize + calibrate on the captured
    inputs, the ranking's scores, the sequential GPTQ), on the final pass ModelOpt's per-module
    export, tensors written, freed -> the rest, configs last

One pass, unless a step ranks over all layers (keep_bf16): then a ranking pass over the steps up
to it comes first, on copies of the layers, and the final pass runs with its decision (and with
its smoothing scales and calibrated quantizers: no statistics or calibration forward of its own).

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

What streams: memory_plan.STREAMED_RECIPES, the recipes whose steps each have a streamed
runner (streamed_steps.py says what each does per layer and why its bytes are the whole path's).
The calibration stream stays separate from the GPTQ's original stream: the whole path's
calibration runs in bf16, its GPTQ pass in float32 on a CPU (linear_compute.py), and each stream
here is the whole path's, bit for bit. Tested on nvfp4, and with an FP8 KV cache through
moe-w4a16-experts (which sets one; --kv-cache fp8 on a dense model too: before ModelOpt's plugins
saw the whole skeleton, its KV scales were silently missing); --format nvfp4-w4a16 / fp8 go the
same way but are untested. The one-pass GPTQ, the scale search and ModelOpt's searches are refused
in one line (memory_plan.refusal).
Checkpoints that transformers 5 loads converted (fused MoE experts, Mixtral's block_sparse_moe)
are read through checkpoint_map.MappedWeights, and the export's names go back through
checkpoint_map.HubNames, as from_pretrained and export_hf_checkpoint do on the whole model.
Needs ModelOpt >= 0.47 (its streaming shard writer and per-tensor export post-processing).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import gc
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from modelopt.torch.opt import apply_mode
from modelopt.torch.quantization.mode import QuantizeModeRegistry
from modelopt.torch.quantization.plugins.custom import register_custom_model_plugins_on_the_fly
from torch import nn

from ..core import events, recipes
from ..core.events import PayloadError
from ..steps.host_memory import pinned_copy
from ..steps.sequential import Fit, capture_layer_calls
from . import streamed_steps
from .checkpoint_map import HubNames, MappedWeights
from .direct_load import _read_into, checkpoint_files, read_header

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


def read_params(module: nn.Module, prefix: str, weights, dtype, skip: str | None = None) -> dict:
    """The host tensors of every meta parameter of `module` (but those under `skip`), by name.
    `weights`: checkpoint_map.MappedWeights (the checkpoint's keys mapped as from_pretrained maps them)."""
    names = [name for name, p in module.named_parameters() if p.is_meta and not (skip and name.startswith(skip))]
    missing = next((prefix + name for name in names if prefix + name not in weights), None)
    if missing is not None:
        raise PayloadError(f"streamed mode reads tensors by the model's parameter names and "
                           f"{missing} is not in the checkpoint (a converted layout); use --mode whole",
                           kind="input")
    values = weights.read_many([prefix + name for name in names], dtype)
    return {name: values[prefix + name] for name in names}


def materialize(module: nn.Module, prefix: str, weights, device: str, dtype,
                skip: str | None = None, values: dict | None = None) -> None:
    """Every meta parameter of `module` (but those under `skip`) read from the shards, or taken
    from `values` (read_params' answer, read ahead); accelerate sets each in place."""
    from accelerate.utils import set_module_tensor_to_device

    values = read_params(module, prefix, weights, dtype, skip) if values is None else values
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


def capture_inputs(model, batches, device: str, back) -> tuple[list, list]:
    """(the first layer's hidden states per batch, through `back` (Run.back); per layer, the (args,
    kwargs) the decoder hands it per batch): sequential.capture_layer_calls over the calibration
    batches. On a GPU the hidden states go to pinned host memory (Fit.back): each layer's calibration
    copies them in and its outputs back, asynchronously."""
    def run():
        with torch.inference_mode():
            for batch in batches:
                decoder(input_ids=batch.to(device), use_cache=False)
        if device == "cuda":
            torch.cuda.synchronize()  # the copies are done before the host copies them (_copy)

    decoder = model.get_decoder()
    return capture_layer_calls(decoder, run, back)


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
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD; also turns the dynamic raise off
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class Peaks:
    """The GPU's peak allocated bytes in each phase of a streamed run (result.json's
    streamed.gpu_peak_bytes): which phase sets the floor of a GPU cap. Nothing on the CPU."""

    def __init__(self, device: str):
        self.on, self.by = str(device).startswith("cuda"), {}
        # the allocator's retries (a cache flush and a device synchronize each, when an allocation
        # would pass the cap) per phase: what a GPU cap costs in time, beside what it holds
        self.retries, self._seen = {}, 0

    def mark(self, phase: str) -> None:
        """The peak since the last mark, counted for `phase`."""
        if self.on:
            self.by[phase] = max(self.by.get(phase, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            seen = torch.cuda.memory_stats().get("num_alloc_retries", 0)
            self.retries[phase] = self.retries.get(phase, 0) + seen - self._seen
            self._seen = seen


class Run:
    """What the streamed pipeline's step runners (streamed_steps.RUNNERS) share: the skeleton, the
    shard reader, where tensors live, the calibration batches, the first layer's inputs."""

    def __init__(self, model, reader: MappedWeights, recipe, batches, device: str, dtype):
        self.model, self.reader, self.recipe, self.batches = model, reader, recipe, batches
        self.device, self.dtype = device, dtype
        self.keep = "cpu"  # activations stay in host memory, moved per batch (on a Spark: the same pool)
        # a tensor to where what waits between uses is kept: pinned host memory from CUDA, asynchronously
        self.back = Fit(device=device, keep=self.keep).back
        self.decoder = model.get_decoder()
        self.layers = self.decoder.layers
        names = {id(m): n for n, m in model.named_modules()}
        self.names = [names[id(layer)] for layer in self.layers]
        self.prefix = names[id(self.decoder)] + "." if names[id(self.decoder)] else ""
        self.inputs: list = []        # the calibration stream: each layer's inputs per batch
        self.layer_calls: list = []   # per layer, the (args, kwargs) the decoder hands it per batch
        self.probes: list | None = None  # per layer, the export's probe, kept by a ranking pass whose
        #                                  calibration the final pass reuses (streamed_steps._Calibrate)
        self.head = False             # lm_head in memory (a ranking's logits)
        self.peaks = Peaks(device)

    @contextlib.contextmanager
    def layers_as(self, modules: nn.ModuleList):
        """The decoder with `modules` in place of its layers for a while."""
        self.decoder.layers = modules
        try:
            yield
        finally:
            self.decoder.layers = self.layers

    def convert(self, layer: nn.Module, name: str) -> None:
        """ModelOpt's conversion of `layer` (named as in the whole model) alone, no calibration."""
        apply_mode(prefixed(name, layer), mode=[("quantize", dict(self.recipe.config))], registry=QuantizeModeRegistry)

    def host(self, t: torch.Tensor, copy: bool = False) -> torch.Tensor:
        """`t` in host memory, pinned when the device is CUDA (copies to the GPU go asynchronously);
        on the CPU `t` itself (the device is the host), or with copy=True a copy of it."""
        if not str(self.device).startswith("cuda"):
            return t.clone() if copy else t
        return pinned_copy(t)

    def materialize_head(self) -> None:
        """Everything outside the layers in memory for the ranking's KL: the final norm on the
        device, the output embedding's weight in host memory (bf16_ranking.mean_kls copies one
        chunk of it at a time to the device). A tied head shares the input embedding's weight
        (counted once, as in the whole model) until free_embeddings gives it a host copy."""
        head = self.model.get_output_embeddings()
        if _tied_output_key(self.model):
            head.weight = self.model.get_input_embeddings().weight
        elif head.weight.is_meta:
            name = next(n for n, m in self.model.named_modules() if m is head)
            weight = read_params(head, name + ".", self.reader, self.dtype)["weight"]
            head.weight = nn.Parameter(self.host(weight), requires_grad=False)
        materialize(self.model, "", self.reader, self.device, self.dtype, skip=self.prefix + "layers.")
        self.head = True

    def free_embeddings(self) -> None:
        """The input embeddings go once the first layer's inputs and the ranking batches' are
        captured (the ranking's later forwards stand them in: streamed_steps._KeepBf16._finals);
        a tied head keeps their weight, in host memory."""
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if self.head and head.weight is embed.weight:
            head.weight = nn.Parameter(self.host(embed.weight.detach()), requires_grad=False)
        free(embed)

    def free_outside(self) -> None:
        free(self.decoder)  # the layers are meta already; embeddings and norm go (written in step 4)
        if self.head:
            free(self.model.get_output_embeddings())


def passes(recipe) -> list[tuple[int, bool]]:
    """(how many of the recipe's steps run, final) per pass over the layers: a step that ranks over
    all layers (Plan.ranking_batches) first gets a pass over the steps up to it."""
    rank = next((i for i, s in enumerate(recipe.steps) if s.plan().ranking_batches), None)
    return ([(rank + 1, False)] if rank is not None else []) + [(len(recipe.steps), True)]


def run_streamed(model_dir: Path, out: Path, recipe, batches, device: str, trust_remote_code: bool = False) -> dict:
    """Quantize and export layer by layer (see the module docstring). `recipe`: a BuiltRecipe
    whose steps stream (pipelines.choose refuses the others first: memory_plan.refusal_of), each
    run by its streamed_steps.RUNNERS entry. Returns facts for result.json."""
    hf, postprocess, get_quant_config, _, ShardWriter = _modelopt_parts()
    _return_freed_memory()
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    reader = ShardReader(model_dir)
    model = skeleton(model_dir, trust_remote_code=trust_remote_code)
    weights = MappedWeights(reader, model)  # by the model's names: fused MoE experts (transformers 5)
    hub_names = HubNames(model)  # and the export's names back to the checkpoint's
    run = Run(model, weights, recipe, batches, device, hf._resolve_export_dtype(model, None))
    decoder, layers, names = run.decoder, run.layers, run.names
    layer_bytes = [sum(weights.nbytes(f"{n}.{p}") for p, _ in layer.named_parameters() if f"{n}.{p}" in weights)
                   for n, layer in zip(names, layers)]
    # Shards of about one bf16 layer: the writer's buffer adds at most that to the peak.
    writer = ShardWriter(out, max(layer_bytes))
    runners = [streamed_steps.RUNNERS[step.key](step, run) for step in recipe.steps]

    # 1. ModelOpt's conversion of everything outside the layers (lm_head and the embeddings are
    #    QuantLinear / QuantEmbedding with their quantizers off, as in the whole model), on meta.
    # ModelOpt's model plugins see the whole model, as in mtq.quantize on it: they register its
    # attention class for KV-cache quantization and its MoE blocks, and put fused experts on the
    # eager path their quantizers hook (a layer's root alone is no transformers model to them)
    register_custom_model_plugins_on_the_fly(model)
    with run.layers_as(nn.ModuleList()):  # the conversion step of mtq.quantize alone: nothing to calibrate out here
        apply_mode(model, mode=[("quantize", dict(recipe.config))], registry=QuantizeModeRegistry)
    outside = [n for n, q in _enabled_quantizers(model)]
    if outside:
        raise PayloadError(f"recipe {recipe.name!r} quantizes {outside[0]}, outside the decoder layers: "
                           "it cannot stream; use --mode whole", kind="input")

    # 2. the decoder's own weights (embeddings, norm), the first layer's inputs, what the runners
    #    take from the decoder while it is in memory
    events.stage("calibrate", detail=f"streamed: capturing the first layer's inputs ({len(batches)} batches)")
    layer_keys = tuple(n + "." for n in names)
    materialize(decoder, run.prefix, weights, device, run.dtype, skip="layers.")
    first, run.layer_calls = capture_inputs(model, batches, device, run.back)
    for runner in runners:
        runner.prepare(run)
    run.free_embeddings()
    run.peaks.mark("prepare")

    # 3. pass by pass, layer by layer. The next layer's tensors are read while this one is worked on
    #    (preadv releases the GIL): the read, from disk at 1-2 GB/s, was a third of the layer loop at
    #    8B. One more layer in host memory (memory_plan.LAYER_COPIES counts it).
    phases = {"read_wait": 0.0, **{s.key: 0.0 for s in recipe.steps}, "export": 0.0}  # seconds
    for count, final in passes(recipe):
        # the calibration stream starts from the first layer's inputs (a copy while a pass follows)
        run.inputs = first if final else streamed_steps.copy_stream(first)
        active = runners[:count]
        for runner in active:
            runner.begin(run, final)
        if final:
            run.free_outside()
            first = None
            gc.collect()
            gc.freeze()  # the imports' million objects: the per-layer collections below skip them
        views = _layer_loop(run, active, final, phases, writer if final else None, hub_names)
        for runner in active:
            runner.end(run, final)
            run.peaks.mark(f"{runner.step.key} end")
    run.inputs = run.probes = None

    # 4. everything outside the layers, as the source has it (cast to the export dtype)
    events.stage("export", detail=str(out))
    tied = _tied_output_key(model)
    for key in reader.where:
        if weights.model_key(key).startswith(layer_keys) or key == tied:
            continue
        new_key, value = postprocess(key, reader.read(key, run.dtype), 448, None, False)
        if new_key is not None:
            writer.add(new_key, value.contiguous())
    writer.finalize()

    # 5. configs, as export_hf_checkpoint writes them: hf_quant_config.json from the whole
    #    (now meta) model's quantizers as they were before the export (views), config.json
    #    with its quantization_config
    decoder.layers = nn.ModuleList(views)
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
    hub_names.quant_config(quant_config)
    hf._write_hf_export_config(model, quant_config, out)
    # the whole path's lines (steps.run), each marked "layer by layer"
    applied = [f"{step.key}: {runner.line()}, layer by layer" for step, runner in zip(recipe.steps, runners)]
    return {"mode": "streamed", "layers": len(layers), "largest_layer_bytes": max(layer_bytes), "applied": applied,
            "passes": len(passes(recipe)), "stream_s": round(time.time() - t0, 3),
            "reused": {step.key: runner.reused for step, runner in zip(recipe.steps, runners) if runner.reused},
            "layer_loop_s": {k: round(v, 3) for k, v in phases.items()}, "gpu_peak_bytes": run.peaks.by or None,
            "gpu_alloc_retries": run.peaks.retries or None}


def _layer_loop(run: Run, runners: list, final: bool, phases: dict, writer, hub_names: HubNames) -> list:
    """One pass over the decoder layers: each read (the next one ahead, in a thread), materialized
    (a ranking pass works on a copy: the final pass converts the skeleton's own layer), handed to
    the runners in recipe order, exported on the final pass, freed. Returns the exported layers on
    meta, as get_quant_config must see them (_export_layer)."""
    layers, names, reader, device, dtype = run.layers, run.names, run.reader, run.device, run.dtype
    stage = "calibrate" if final else "rank"
    views = []
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
    pending = ahead.submit(read_params, layers[0], names[0] + ".", reader, dtype) if len(layers) else None
    for i, (name, skeleton_layer) in enumerate(zip(names, layers)):
        events.progress(stage, i, len(layers))
        t = time.time()
        values = pending.result()
        phases["read_wait"] += time.time() - t
        pending = (ahead.submit(read_params, layers[i + 1], names[i + 1] + ".", reader, dtype)
                   if i + 1 < len(layers) else None)
        layer = skeleton_layer if final else copy.deepcopy(skeleton_layer)
        materialize(layer, name + ".", reader, device, dtype, values=values)
        del values
        at = streamed_steps.Layer(i, name, layer, prefixed(name, layer), run.layer_calls[i])
        # the export's probe: this layer's inputs (one sequence), before calibration advances them; a
        # ranking pass keeps it for a final pass whose calibration stream does not advance (run.probes)
        probe = None
        if final and run.probes:
            probe, run.probes[i] = streamed_steps.to_device(run.probes[i], device), None
        elif final:
            probe = _first_sequence(streamed_steps.to_device([run.inputs[0], *at.args[0]], device))
        elif run.probes is not None:
            run.probes.append(_first_sequence([run.inputs[0], *at.args[0]]))
        for runner in runners:
            t = time.time()
            runner.layer(run, at, final)
            phases[runner.step.key] += time.time() - t
            run.peaks.mark(runner.step.key)
        t = time.time()
        if final:
            views.append(_export_layer(at.root, layer, name, probe, dtype, writer, hub_names))
        del probe, at
        free(layer)
        del layer
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        phases["export"] += time.time() - t
        run.peaks.mark("export")
    events.progress(stage, len(layers), len(layers))
    ahead.shutdown()
    return views


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


def _export_layer(root, layer, name, probe, dtype, writer, hub_names: HubNames) -> nn.Module:
    """One quantized layer through ModelOpt's export, in export_hf_checkpoint's order: the MoE
    inputs' missing amax, the fused groups' shared amax (what requantize_resmooth_fused_llm_layers
    does on the whole model, here with one captured batch as its probe input), the experts'
    gate/up amax synced, each module's export handler, fused experts split back into per-expert
    Linears, the per-tensor post-processing and the checkpoint's names. Returns the layer on the
    meta device as it was before the handlers (what get_quant_config reads)."""
    hf, postprocess, get_quant_config, ExportContext, _ = _modelopt_parts()
    from modelopt.torch.quantization.plugins.huggingface import _reconstruct_fused_moe_linear

    h, a, k = probe
    hf._prepare_moe_inputs(root, dtype, False)
    view = _on_meta(layer)  # before the handlers replace fused experts' quantizers by their scales
    inputs, norms = hf.collect_shared_input_modules(root, lambda: layer(h, *a, **k), collect_layernorms=True)
    fused = hf._fuse_shared_input_modules(root, inputs, norms, qkv_only=False, fuse_layernorms=True,
                                          quantization_format=hf.get_quantization_format(root))
    _fuse_every_expert(root, fused, hf)
    hf._warn_on_unsynced_moe_gate_up(root)
    kv_format = get_quant_config(root)["quantization"]["kv_cache_quant_algo"]
    ctx = ExportContext(model=root, dtype=dtype, is_modelopt_qlora=False)
    tensors = {}
    with torch.inference_mode():
        for sub_name, sub in layer.named_modules():  # as _process_quantized_modules: it visits what handlers add
            hf._dispatch_export_handler(f"{name}.{sub_name}" if sub_name else name, sub, ctx)
        _reconstruct_fused_moe_linear(layer)
        for key, tensor in layer.state_dict().items():
            new_key, value = postprocess(f"{name}.{key}", tensor, 448, kv_format, False)
            if new_key is not None:
                tensors[new_key] = value.detach().contiguous().cpu()
    for key, value in hub_names.state_dict(tensors).items():
        writer.add(key, value)
    return view


def _on_meta(module: nn.Module) -> nn.Module:
    """A copy of `module` with every parameter and buffer on the meta device: its structure and
    quantizer settings without its memory."""
    memo = {}
    for t in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _fuse_every_expert(root, fused: dict, hf) -> None:
    """The experts the probe did not route to, fused like those it did: the loop at the end of
    ModelOpt's requantize_resmooth_fused_llm_layers (per-expert Linears, transformers 4.x; the
    fused experts of 5.x have no Linear per expert)."""
    names = {n for n, _ in root.named_modules()}
    for first, group in fused.items():
        if not re.search(r"experts?\.\d+", first):
            continue
        expert = 0
        while True:
            other = re.sub(r"(experts?\.)\d+", rf"\g<1>{expert}", first, count=1)
            if other in fused:
                expert += 1
                continue
            if other not in names:
                break
            hf.preprocess_linear_fusion([root.get_submodule(re.sub(r"(experts?\.)\d+", rf"\g<1>{expert}", n))
                                         for n in group])
            expert += 1
