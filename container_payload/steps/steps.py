"""The whole-model pipeline's runner of each step type (RUNNERS, by the step's key), run in order.

smoothing.py before calibration, ModelOpt's mtq.quantize for Calibrate, algorithms.py /
sequential.py / bf16_ranking.py after it (streaming.py runs the steps that stream, per layer). Steps after
Calibrate hand each other what they made (the quantized Linears, their original weights, the
calibration batches kept for ranking) through one small State.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import modelopt.torch.quantization as mtq
import torch

from ..core import events
from ..core.recipes import Calibrate, Gptq, KeepBf16, ScaleSearch, Smooth
from ..numerics.linear_compute import float32_linears
from .algorithms import quantize_weights
from .bf16_ranking import keep_sensitive_in_bf16, kept_line, round_weights
from .quantizers import QuantizersOff, fused_units, quantized_linears, weights_out_of_reach
from .sequential import first_layer_inputs, sequential_gptq
from .smoothing import smooth


@dataclass
class State:
    model: object = None             # the model the steps work on (ModelOpt's calibration returns it)
    linears: dict | None = None      # the quantized Linears, by name
    originals: dict | None = None    # their weights before GPTQ / rounding
    kept_ids: list = field(default_factory=list)   # calibration input_ids batches kept for ranking
    captured: object = None          # sequential.first_layer_inputs' Captured, for a sequential Gptq


def run(model, recipe, forward_loop, applied: list | None = None, seconds: dict | None = None):
    """All of `recipe`'s steps (recipe_build.BuiltRecipe), each by its RUNNERS entry; returns the
    quantized model. `applied` gets one line per step: what it did on this model, or why it
    skipped (the model card shows them: a step made for Llama-style blocks may not apply to
    another architecture). `seconds` gets each step's wall time by its key, and its CPU
    seconds (all threads) by key + "_cpu" (result.json's timings.steps_s: where a recipe's time
    goes, benchmarks/demo_time.py; on a shared host the wall time is inflated, the CPU time much less)."""
    state = State(model=model)
    seconds = {} if seconds is None else seconds
    calibrated = False
    applied = [] if applied is None else applied
    for i, step in enumerate(recipe.steps):
        on = step.plan().on
        if on == "quantized" and not calibrated:
            raise ValueError(f"recipe {recipe.name}: {step.key} must come after calibrate")
        t, c = time.time(), time.process_time()
        line = RUNNERS[step.key](state, step, forward_loop, recipe.steps[i + 1:], recipe)
        seconds[step.key] = round(seconds.get(step.key, 0.0) + time.time() - t, 3)
        seconds[f"{step.key}_cpu"] = round(seconds.get(f"{step.key}_cpu", 0.0) + time.process_time() - c, 3)
        applied.append(f"{step.key}: {line}")
        calibrated = calibrated or on == "calibrate"
    return state.model


def _smooth(state: State, step: Smooth, forward_loop, later, recipe) -> str:
    events.stage("pre-calibrate", detail=f"{recipe.name}: smoothing statistics, folded into the bf16 weights")
    return smooth(state.model, forward_loop, step.alpha).line()


def _calibrate(state: State, step: Calibrate, forward_loop, later, recipe) -> str:
    events.stage("calibrate", detail=f"recipe {recipe.name} ({recipe.preset})")
    state.model = mtq.quantize(state.model, recipe.config, forward_loop)
    if recipe.check is not None:  # e.g. moe.py: every expert's quantizers saw data
        recipe.check(state.model)
    if later:
        events.stage("refine", detail=recipe.name)
    return f"ModelOpt {recipe.preset}"


def _reach(model, linears: dict | None, did: str = "") -> str:
    """What a weight step did, in a few words, and which quantized weights it could not reach."""

    out = (did or f"{len(linears)} quantized Linears") if linears else "skipped (no quantized Linear it applies to)"
    missed = weights_out_of_reach(model, linears or {})
    if missed:
        out += "; not reached, left at ModelOpt's calibration: " + ", ".join(
            f"{n} {what}" for what, n in missed.items())
    return out


def _ranking_batches(later) -> int:
    """Calibration batches to keep now for a ranking pass that follows (KeepBf16)."""
    return next((s.plan().ranking_batches for s in later if s.plan().ranking_batches), 0)


def _scale_search(state: State, step: ScaleSearch, forward_loop, later, recipe) -> str:
    model = state.model

    state.linears, state.originals, state.kept_ids = quantize_weights(
        model, forward_loop, gptq=False, search=True, keep_batches=_ranking_batches(later))
    return _reach(model, state.linears)


def _gptq(state: State, step: Gptq, forward_loop, later, recipe) -> str:
    model = state.model
    captured, state.captured = state.captured, None  # handed over: freed with the pass
    blockers = sequential_blockers(model, forward_loop, state.linears) if step.sequential else []
    if step.sequential and not blockers:
        state.linears, state.originals, state.kept_ids = sequential_gptq(
            model, forward_loop, keep_batches=_ranking_batches(later), captured=captured,
            ridge=step.ridge, kernel=step.kernel, hessian_tf32=step.hessian_tf32, scales=step.scales)
        return _reach(model, state.linears)
    del captured

    # a sequential step falls back to one pass here: its ridge default is the one-pass one (recipes.Gptq)
    state.linears, state.originals, state.kept_ids = quantize_weights(
        model, forward_loop, gptq=True, search=True, keep_batches=_ranking_batches(later),
        act_aware=step.act_aware, ridge=step.ridge, kernel=step.kernel, scales=step.scales)
    line = _reach(model, state.linears)
    if blockers:
        line += " by one-pass activation-aware GPTQ, not the sequential pass: " + "; ".join(blockers)
    return line


class _FirstBatchSeen(Exception):
    pass


@torch.no_grad()
def sequential_blockers(model, forward_loop, linears: dict | None = None) -> list[str]:
    """Why the sequential pass (sequential.py) would compute the wrong thing on this model, from
    one calibration batch (empty: it applies). That pass pairs each Linear's original and
    quantized inputs row by row, so routed Linears (experts as nn.Linear, transformers 4.57's
    MoE), which see a subset of the tokens that differs between the two streams, cannot be
    fitted by it. (Layers called with other masks or rotary embeddings than layer 0, as Gemma 3's
    global layers are, are not a blocker: the pass calls each layer with its own arguments.)"""

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = list(getattr(decoder, "layers", []))
    if not layers:
        return []
    linears = quantized_linears(model) if linears is None else linears
    inside = {id(m) for layer in layers for m in layer.modules()}
    watched = {n: m for n, m in linears.items() if id(m) in inside}
    tokens, rows = [], {}

    def count_tokens(mod, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        tokens.append(h.numel() // h.shape[-1])

    def linear_hook(name):
        def hook(mod, args):
            rows[name] = rows.get(name, 0) + args[0].numel() // args[0].shape[-1]
        return hook

    def stop(*_):
        raise _FirstBatchSeen  # one batch tells

    handles = [layers[0].register_forward_pre_hook(count_tokens, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(linear_hook(n)) for n, m in watched.items()]
    handles.append(layers[-1].register_forward_hook(stop))
    try:
        with QuantizersOff(model), float32_linears(model):
            forward_loop(model)
    except _FirstBatchSeen:
        pass
    finally:
        for h in handles:
            h.remove()
    routed = [n for n in watched if tokens and rows.get(n, 0) != tokens[0]]
    if routed:
        return [f"{len(routed)} Linears see only the tokens routed to them (experts as Linears, e.g. "
                f"{routed[0]}), which differ between its two streams"]
    return []


@torch.no_grad()
def _keep_bf16(state: State, step: KeepBf16, forward_loop, later, recipe) -> str:
    model = state.model

    if state.originals is not None:  # after GPTQ / rounding: rank the weights it chose
        kept = keep_sensitive_in_bf16(model, state.linears, state.originals, state.kept_ids, step.budget)
        return _reach(model, state.linears, kept_line(kept, len(fused_units(state.linears))))  # (fp8 refused here: recipes.with_params)
    # Before GPTQ: rank round-to-nearest weights, then give the originals back to the GPTQ that
    # follows (it fits around the units kept in bf16). A sequential one reuses the captured inputs.
    with QuantizersOff(model):
        captured = first_layer_inputs(model, forward_loop, step.batches)
    linears = quantized_linears(model)
    originals = {n: m.weight.detach().clone() for n, m in linears.items()}
    round_weights(linears)
    kept = keep_sensitive_in_bf16(model, linears, originals, captured.kept, step.budget, fp8=step.fp8)
    for n, m in linears.items():
        m.weight.data.copy_(originals[n])
    del originals  # the GPTQ keeps its own copy: one at a time (16 GB at 8B)
    if any(s.plan().layer_inputs for s in later):
        state.captured = captured
    return _reach(model, linears, kept_line(kept, len(fused_units(linears))))


# step key -> its runner(state, step, forward_loop, later steps, recipe) -> the line it applied
RUNNERS = {Smooth.key: _smooth, Calibrate.key: _calibrate, ScaleSearch.key: _scale_search, Gptq.key: _gptq,
           KeepBf16.key: _keep_bf16}
