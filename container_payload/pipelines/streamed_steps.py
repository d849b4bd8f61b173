"""The streamed pipeline's runner of each step type (RUNNERS, by the step's key): what a step does
to one decoder layer at a time, as steps.RUNNERS say what it does to the whole model.

streaming.run_streamed makes passes over the decoder layers; in each layer it calls the runners
of the recipe's steps in the recipe's order, then exports the layer. A step that ranks over all
layers (recipes.Plan.ranking_batches: keep_bf16) gets a pass of its own first, over the steps up
to it and on a copy of each layer, and decides at its end; the final pass then runs every step
with that decision in hand. The steps before the ranking see the same layers and streams in both
passes: what they computed in the ranking pass (smoothing scales, calibrated quantizers) the
final pass applies again instead of computing it twice (Runner.reused counts it). Each runner
keeps its own streams of hidden states, started from the first layer's inputs at the beginning
of each pass.

    prepare(run)             once, while the decoder's own weights (embeddings, norm) are in memory
    begin(run, final)        at the start of a pass (final: the pass that exports)
    layer(run, at, final)    one layer (at: Layer), in recipe order
    end(run, final)          after the last layer
    line()                   what it did, for result.json's steps_applied
"""
from __future__ import annotations

import contextlib
import copy
import io
import time
from dataclasses import dataclass

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
import torch
from torch import nn

from ..core import events, recipes
from ..core.events import PayloadError
from ..numerics.linear_compute import float32_linears, patch_forward
from ..steps.bf16_ranking import (
    Emulation,
    decide,
    fp8_round_unit_,
    keep_units,
    kept_line,
    head_input,
    limit_tokens,
    logits_post,
    mean_kls,
    model_bytes_default,
    round_weights,
    shortlist,
    unit_costs,
)
from ..steps.host_memory import pinned_copy
from ..steps.quantizers import QuantizersOff, fused_units, quantized_linears
from ..steps.sequential import Fit, LayerStandIn, _Timer, capture_layer_calls, layer_output, refine_layer, start_streams
from ..steps.smoothing import Smoothed, refold, smooth


@dataclass
class Layer:
    """One decoder layer at its turn: its place, the module (materialized), the root that names
    it as the whole model does, and the (args, kwargs) the decoder hands it per batch."""
    index: int
    name: str
    layer: nn.Module
    root: nn.Module
    args: list


def to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def copy_stream(hidden: list) -> list:
    """Copies of captured hidden states, pinned like them when they are (clone() would not pin)."""
    return [pinned_copy(h) if h.is_pinned() else h.clone() for h in hidden]


class Runner:
    """A step's part in a streamed run (see the module docstring); the defaults do nothing."""

    def __init__(self, step, run):
        self.step = step
        self.reused = 0  # layers whose final pass took what this runner's ranking pass computed

    def prepare(self, run) -> None:
        pass

    def begin(self, run, final: bool) -> None:
        pass

    def layer(self, run, at: Layer, final: bool) -> None:
        pass

    def end(self, run, final: bool) -> None:
        pass

    def line(self) -> str:
        raise NotImplementedError


class _Smooth(Runner):
    """Each layer's statistics from a stream of the unsmoothed model's hidden states (the whole
    path measures every layer in one pass before it folds anything), folded before calibration.
    A ranking pass keeps each layer's scales (a vector per group): the final pass, on the same
    source layer and the same stream, folds them again (smoothing.refold) without the statistics."""

    def __init__(self, step, run):
        super().__init__(step, run)
        self.scales: list | None = None  # per layer, {group index: scales}, from a ranking pass

    def begin(self, run, final):
        if final and self.scales is not None:
            return  # the ranking pass's scales and report stand
        self.stats, self.smoothed = copy_stream(run.inputs), Smoothed()
        self.scales = None if final else []

    def layer(self, run, at, final):
        if final and self.scales is not None:
            refold(_holder(at.layer), self.scales[at.index])
            self.scales[at.index] = None
            self.reused += 1
            return
        scales = {}
        self.smoothed.add(_smooth_layer(at.layer, self.stats, at.args, self.step.alpha, run.device, run.back, scales))
        if not final:
            self.scales.append({i: s.to(run.keep) for i, s in scales.items()})

    def end(self, run, final):
        self.stats = None

    def line(self):
        return self.smoothed.line()


def _holder(layer: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.layers = nn.ModuleList([layer])  # smoothing finds its groups in `.layers`
    return holder


def _smooth_layer(layer: nn.Module, stats: list, args: list, alpha: float, device: str, back, scales: dict):
    """smoothing.smooth on one layer: its statistics from the unsmoothed stream `stats` (advanced
    in place through the still unsmoothed layer), then the scales folded (and put in `scales`)."""
    holder = _holder(layer)

    def stats_loop(_holder):
        with torch.inference_mode():
            for j, (h, (a, k)) in enumerate(zip(stats, args)):
                stats[j] = back(layer_output(layer(h.to(device, non_blocking=True), *to_device(a, device),
                                                   **to_device(k, device))))

    with contextlib.redirect_stdout(io.StringIO()):
        return smooth(holder, stats_loop, alpha, log=False, scales=scales)


class _Calibrate(Runner):
    """ModelOpt's calibration of the layer on the calibration stream (run.inputs, which each
    layer's outputs replace in place: the next layer's inputs). A ranking pass keeps each layer's
    calibrated quantizers (ModelOpt's state and their amax: _calibrated); the final pass, on the
    same smoothed layer and the same stream, converts and restores them without the forward, and
    takes the export's probe from the ranking pass (run.probes), as its stream does not advance."""

    def __init__(self, step, run):
        super().__init__(step, run)
        self.calibrated: list | None = None  # per layer, _calibrated's answer, from a ranking pass

    def begin(self, run, final):
        if not final:
            self.calibrated, run.probes = [], []

    def layer(self, run, at, final):
        if final and self.calibrated is not None:
            _restore_calibrated(at.root, self.calibrated[at.index])
            self.calibrated[at.index] = None
            self.reused += 1
        else:
            self._calibrate(run, at)
            if not final:
                self.calibrated.append(_calibrated(at.root, run.keep))
        if run.recipe.check is not None:  # as steps._calibrate does on the whole model (moe.check_calibrated)
            run.recipe.check(at.root)

    def _calibrate(self, run, at):
        device, keep, inputs, calls = run.device, run.keep, run.inputs, [0]

        def forward_loop(_root):
            calls[0] += 1
            with torch.inference_mode():
                for j, (h, (a, k)) in enumerate(zip(inputs, at.args)):
                    o = layer_output(at.layer(h.to(device, non_blocking=True), *to_device(a, device),
                                              **to_device(k, device)))
                    if h.is_pinned() and o.shape == h.shape and o.dtype == h.dtype:
                        h.copy_(o, non_blocking=True)  # the next layer's input, in the same pinned buffer
                    else:
                        inputs[j] = o.to(keep)
                if device == "cuda":
                    torch.cuda.synchronize()  # every output is back in host memory

        with contextlib.redirect_stdout(io.StringIO()):  # "Inserted 21 quantizers", per layer
            mtq.quantize(at.root, run.recipe.config, forward_loop)
        if calls[0] != 1:
            raise PayloadError(f"ModelOpt ran the calibration loop {calls[0]} times for {at.name}; streamed "
                               "mode supports one pass (max calibration); use --mode whole", kind="input")

    def line(self):
        return f"ModelOpt {self.step.preset}"


def _calibrated(root: nn.Module, keep: str) -> tuple[dict, dict]:
    """What ModelOpt's calibration left on `root`, as mto.save keeps it: its modelopt state (each
    quantizer's settings, the modes applied) and the tensors that are not the model's parameters
    (the quantizers' amax and the like), copied to `keep`."""
    params = {name for name, _ in root.named_parameters()}
    tensors = {k: v.detach().to(keep, copy=True) for k, v in root.state_dict().items() if k not in params}
    return copy.deepcopy(mto.modelopt_state(root)), tensors


def _restore_calibrated(root: nn.Module, saved: tuple[dict, dict]) -> None:
    """_calibrated's answer back onto an unconverted `root` of the same layer, as mto.restore does."""
    state, tensors = saved
    mto.restore_from_modelopt_state(root, state)
    unexpected = root.load_state_dict(tensors, strict=False).unexpected_keys
    if unexpected:  # the same layer converted the same way has every one of them
        raise PayloadError(f"restoring the calibration of {unexpected[0]} found no such tensor")


class _Gptq(Runner):
    """The sequential GPTQ: sequential.refine_layer after the layer's calibration, on its own two
    streams (original, quantized), kept where run.keep says (host memory under a GPU budget)."""

    def begin(self, run, final):
        self.fp, self.qs, self.chunk_calls = start_streams(copy_stream(run.inputs), run.layer_calls)
        step = self.step
        # replay: finished submodules' outputs wait in host memory (Fit.back) instead of being computed
        # again; only those replayed twice or more (the attention block). Estimated, not measured: at ~55 GB/s
        # a round trip of a projection's output (gate/up at 8B: 117 MB a 2048-token batch, ~4 ms) costs more
        # than computing it again (its input's NVFP4 emulation and the product, ~1.2 ms on an H100)
        self.fit = Fit(ridge=step.ridge, kernel=step.kernel, scales=step.scales, hessian_tf32=step.hessian_tf32,
                       replay=True, replay_min_uses=2, device=run.device, keep=run.keep)
        self.timer, self.reached = _Timer(), 0

    def layer(self, run, at, final):
        linears = quantized_linears(at.root)
        with QuantizersOff(at.root), float32_linears(at.root):
            self.fp, self.qs, _ = refine_layer(at.layer, linears, self.fp, self.qs, self.chunk_calls[at.index], None,
                                               self.fit, self.timer)
        self.reached += len(linears)

    def end(self, run, final):
        self.fp = self.qs = self.chunk_calls = None
        events.emit("log", message=f"refine: sequential activation-aware GPTQ, streamed ({self.timer})")

    def line(self):
        return f"{self.reached} quantized Linears"


class _Gives(LayerStandIn):
    """Stands in for a decoder layer and returns `value` (the last layer's stored output), so that
    the model's own forward turns stored hidden states into logits (final norm, head, softcap)."""

    def __init__(self, real: nn.Module, value):
        super().__init__(real)
        self.__dict__["_value"] = value

    def forward(self, hidden_states, *args, **kwargs):
        return self.__dict__["_value"]


class _KeepBf16(Runner):
    """bf16_ranking's choice made layer by layer, with the whole path's numbers: in a ranking pass
    each layer (a copy, smoothed and calibrated as in the final pass) is scored on the ranking
    batches' streams: the original model's (the reference), every unit emulated on round-to-
    nearest weights (the base and each Linear's output error), and, for each unit in the running
    shortlist, every unit emulated but that one, which is kept in each format (bf16 on its
    original weights; with fp8 also FP8, on fp8_weights with FP8 inputs). A (unit, format)'s
    stream starts from the base stream at its layer; a unit that leaves the shortlist is dropped:
    the final shortlist's units were in it when their layer was scored. At the end each stream's
    final norm (the head's inputs), the KLs (bf16_ranking.mean_kls: the vocabulary in chunks, the
    head's weight in host memory) and bf16_ranking.decide; in the final pass bf16_ranking.keep_units applies the
    decision to the layer's calibrated weights (bf16: quantizers off; FP8: set_fp8) before the
    GPTQ that follows fits around them."""

    def __init__(self, step, run):
        super().__init__(step, run)
        before = run.recipe.steps[:run.recipe.steps.index(step)]
        if any(s.plan().on == "quantized" for s in before):
            raise PayloadError(f"recipe {run.recipe.name!r}: keep_bf16 after a weight step ranks the fitted "
                               "weights of the whole model and cannot stream; use --mode whole", kind="input")
        self.kept: list = []           # [(unit, fmt)] the decision kept
        self.total = 0

    def prepare(self, run):
        """The ranking batches' layer inputs (the decoder is in memory now), and the budget and
        units of the whole model, from a converted copy of its (meta) layers."""
        self.ids = limit_tokens([b.to(run.device) for b in run.batches[:self.step.batches]])
        with torch.no_grad():
            self.first, self.calls = capture_layer_calls(
                run.decoder, lambda: [run.decoder(input_ids=ids, use_cache=False) for ids in self.ids], run.back)
        run.materialize_head()  # before the budget: a tied head counts once, as in the whole model
        converted = copy.deepcopy(run.layers)
        for name, layer in zip(run.names, converted):
            run.convert(layer, name)
        with run.layers_as(converted):
            linears = quantized_linears(run.model)
            self.budget = self.step.budget * model_bytes_default(run.model, linears)
        units = fused_units(linears)
        self.costs = unit_costs(units, {n: m.weight for n, m in linears.items()}, self.step.fp8)
        self.total = len(units)
        self.rank = bool(self.ids) and self.budget > 0

    def begin(self, run, final):
        if final or not self.rank:
            return
        self.t0 = time.time()
        self.ref, self.base, self.streams = list(self.first), list(self.first), {}
        self.err, self.seen, self.tuple_out = {}, [], False

    @torch.no_grad()
    def layer(self, run, at, final):
        linears = quantized_linears(at.root)
        units = fused_units(linears)
        if final:  # the weights are what the whole path hands keep_units as its originals
            kept = {u[0]: fmt for u, fmt in self.kept}
            keep_units(linears, [(u, kept[u[0]]) for u in units if u[0] in kept])
            return
        if not self.rank:
            return
        # the layer's two weight sets and every stream in host memory (pinned on CUDA): beside the
        # layer the GPU holds one batch's work (at 8B, 26 streams and 2 weight sets were 2 GB)
        originals = {n: run.host(m.weight.detach(), copy=True) for n, m in linears.items()}
        round_weights(linears)
        rounded = {n: run.host(m.weight.detach(), copy=True) for n, m in linears.items()}
        calls, back = self.calls[at.index], run.back

        def set_weights(src, names):
            for n in names:
                linears[n].weight.data.copy_(src[n])

        def through(stream, emulated, originals=None, fp8_units=()):
            emu = Emulation(linears, emulated, originals, fp8_units)
            out = []
            try:
                for h, (a, k) in zip(stream, calls):
                    o = at.layer(h.to(run.device, non_blocking=True), *a, **k)
                    self.tuple_out = isinstance(o, (tuple, list))
                    out.append(back(layer_output(o)))
            finally:
                emu.remove()
            return out, emu.err

        with QuantizersOff(at.root), float32_linears(at.root):
            set_weights(originals, linears)
            self.ref, _ = through(self.ref, [])
            set_weights(rounded, linears)
            base_in = self.base
            self.base, err = through(base_in, units, originals)
            self.err.update(err)
            self.seen += units
            streams, costs = {}, self.costs
            for unit in shortlist(self.seen, self.err, costs.cheapest, self.budget, costs.width):
                others = [u for u in units if u is not unit]
                for fmt in costs.fmts:
                    key = (unit[0], fmt)
                    if key in self.streams:  # a unit of an earlier layer: this layer all emulated
                        streams[key], _ = through(self.streams[key], units)
                    elif unit in units:      # one of this layer's: it alone in fmt, from the base stream
                        fp8 = fmt == "fp8"
                        set_weights(originals, unit)
                        if fp8:  # fp8_weights, in place on the layer's (original) weights
                            fp8_round_unit_(unit, {n: linears[n].weight.detach() for n in unit})
                        streams[key], _ = through(base_in, others, fp8_units=[unit] if fp8 else ())
                        set_weights(rounded, unit)
            self.streams = streams

    @torch.no_grad()
    def end(self, run, final):
        if final or not self.rank:
            return
        costs = self.costs
        scored = [(u, fmt) for u in shortlist(self.seen, self.err, costs.cheapest, self.budget, costs.width)
                  for fmt in costs.fmts]
        with QuantizersOff(run.model), float32_linears(run.model):
            finals = [self._finals(run, stream) for stream in [self.ref, self.base]
                      + [self.streams[u[0], fmt] for u, fmt in scored]]
            base, *kls = mean_kls(run.model.get_output_embeddings(), logits_post(run.model), finals[0], finals[1:],
                                  run.device)
        measured = [(u, fmt, kl, costs.extra[u[0], fmt]) for (u, fmt), kl in zip(scored, kls)]
        kept = decide(base, measured, self.budget, len(self.ids), self.t0)
        self.kept = kept
        self.ref = self.base = self.streams = self.first = self.calls = None  # the ranking's streams go

    def _finals(self, run, outputs: list) -> list:
        """The hidden states entering the output head per ranking batch (the final norm applied by
        the model's own forward), from the last layer's outputs (`outputs`)."""
        # the input embeddings are freed (run.free_embeddings) and the stand-ins ignore what they
        # return, but the decoder builds its masks and rotary from it: zeros of the right shape
        embed = run.model.get_input_embeddings()
        width, dtype = embed.weight.shape[-1], embed.weight.dtype
        undo = patch_forward(embed, lambda ids, *a, **k: torch.zeros((*ids.shape, width), dtype=dtype,
                                                                      device=run.device))
        try:
            return [self._final(run, ids, h) for ids, h in zip(self.ids, outputs)]
        finally:
            undo()

    def _final(self, run, ids, h):
        h = h.to(run.device, non_blocking=True)
        value = (h,) if self.tuple_out else h
        stand_ins = nn.ModuleList([_Gives(layer, value) for layer in run.layers])
        with run.layers_as(stand_ins):
            final = head_input(run.model, lambda: run.model(input_ids=ids, use_cache=False))
        return run.back(final)  # mean_kls moves it in per chunk

    def line(self):
        return kept_line(self.kept, self.total)


# step key -> its streamed runner: Runner(step, run). A step whose Plan says it needs the whole
# model (whole_only) has none: pipelines.choose refuses its recipe in streamed mode first.
RUNNERS = {recipes.Smooth.key: _Smooth, recipes.Calibrate.key: _Calibrate, recipes.Gptq.key: _Gptq,
           recipes.KeepBf16.key: _KeepBf16}
