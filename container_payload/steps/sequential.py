"""Layer-sequential activation-aware GPTQ: each decoder layer is quantized on the inputs
the already-quantized layers before it produce, against the outputs of the original model.

Why: `gptq-aa` takes every Linear's inputs from the original model, so each layer is fitted
to inputs it will never see: in W4A4 the residual stream reaching layer 20 carries the error of
layers 0-19. Here two streams of hidden states run through the decoder side by side, the
original one (X) and the quantized one (X~, with the engine's input quantization emulated), and
every Linear is fitted by activation-aware GPTQ (gptq.activation_corrected_weight) with
H = Xq^T Xq, G = W (X - Xq)^T Xq (= W (C - H), C = X^T Xq), Xq = the engine's NVFP4 rounding of
X~. So it minimizes
||X W^T - Xq Q^T||^2: the error the layer inherits, as well as its own, is compensated where
the weights can absorb it (the idea behind GPTQ's layer-by-layer pipelines and GPTAQ).

Within a layer the fused units (q/k/v, o, gate/up, down) are fitted in execution order, each
on the inputs that the quantized units before it produce. The cost is about 3.5 passes of the
calibration set through each layer (one original; four staged ones, each stopped at its unit;
one to advance) against one for `gptq-aa`. The hidden states of both streams stay in memory
(tokens x hidden x 2 bytes each).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from ..core import events
from ..core.events import log as _log
from ..numerics.linear_compute import float32_linears, patch_forward
from .algorithms import quantize_unit
from .bf16_ranking import Emulation
from .hessians import SquareSums, keep_input_ids
from .host_memory import CopiesOut, pinned_copy
from .quantizers import QuantizersOff, fused_units, quantized_linears, unit_input_scale

# The ridge of the activation correction, relative to mean diag(H) (algorithms.
# activation_corrected_weight). On a sequential pass the correction can fit the calibration
# text's own rounding noise. Measured with 8 x 512 calibration tokens, no smoothing: with
# GPTQ's 0.01 the KL on calibration text fell to 0.06 while held out it rose to 0.67 (one-pass
# gptq-aa: 0.20 and 0.37); ridge 0.3 gave 0.33 held out, 3 / 10 / 30 gave 0.27 / 0.29 / 0.27.
# 1.0 is for make quantize's 16x more tokens, where the noise it guards against is smaller.
# The recipe parameter gptq.ridge overrides it.
RIDGE = 1.0
# Tokens per layer call on the streams (memory; the result does not depend on it).
CHUNK_TOKENS = 16384
# On CUDA, H = Xq^T Xq and G's products ((X - Xq) W^T, then its transpose times Xq) in TF32 (inputs
# rounded to 10 mantissa bits, float32 sums). At 8B shapes these products are about 2 PFLOP in all.
# Measured on an H200, 128 x 512 tokens, with C = X^T Xq then in G's place
# (benchmarks/results/gpu_8b-recipe-cost-tf32-fp32-vs-llmc.md): the sequential pass took 84.7 s with them in float32
# and 48.3 s in TF32, the recipe 3.78x and 2.71x the default recipe's wall time. The rounding
# (~5e-4 relative per input) is far below the damping (1% of mean diag H) and the ridge (100%).
# The CPU path always uses float32; the recipe parameter gptq.hessian_tf32=false gives float32 on
# CUDA too.


class LayerStandIn(nn.Module):
    """Stands in for a decoder layer during a pass of the decoder; what the decoder reads off a
    layer (Gemma 3's `attention_type`, Qwen3.5's `layer_type`) comes from the real one, which is
    kept out of this module's tree."""

    def __init__(self, real: nn.Module):
        super().__init__()
        self.__dict__["_real"] = real  # not a submodule: it stays out of this module's tree

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)


class _Catcher(LayerStandIn):
    """Stands in for decoder layer `index` during one pass of the decoder: keeps the arguments
    the decoder hands that layer, per batch (hybrid models hand each kind of layer its own mask
    or rotary embeddings: Gemma 2/3's sliding and global layers, Qwen3.5's linear and full
    attention), and for layer 0 the hidden states too, through `keep` (where they wait). It
    passes the hidden states on unchanged, so the pass costs only the embedding. What the
    decoder reads off a layer (Gemma 3's `attention_type`, Qwen3.5's `layer_type`) comes from
    the real one."""

    def __init__(self, real: nn.Module, index: int, hidden: list, calls: list, keep):
        super().__init__(real)
        self.index, self.hidden, self.calls, self.keep = index, hidden, calls, keep

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.index == 0:
            self.hidden.append(self.keep(hidden_states.detach()))
        return hidden_states


@dataclass
class Captured:
    """One pass of the calibration set through the decoder's stand-ins."""
    layers: nn.ModuleList   # the decoder's real layers
    hidden: list            # what layer 0 receives, per batch
    calls: list             # per layer, the (args, kwargs) the decoder hands it, per batch
    kept: list              # the first keep_batches input_ids batches (for keep_bf16's ranking)


def capture_layer_calls(decoder, run, keep=lambda h: h) -> tuple[list, list]:
    """run() passes the calibration set through `decoder` with its layers replaced by stand-ins
    (_Catcher); returns (layer 0's hidden states per batch, per layer its calls per batch)."""
    layers = decoder.layers
    hidden: list = []
    calls: list = [[] for _ in layers]
    decoder.layers = nn.ModuleList([_Catcher(layer, i, hidden, calls[i], keep) for i, layer in enumerate(layers)])
    try:
        run()
    finally:
        decoder.layers = layers
    return hidden, calls


def first_layer_inputs(model, forward_loop, keep_batches: int = 0) -> Captured:
    """One cheap pass of the calibration set (the layers stood in for): what every layer is
    handed, and the first keep_batches input_ids batches."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    kept: list = []
    handle = keep_input_ids(model, kept, keep_batches)
    try:
        hidden, calls = capture_layer_calls(decoder, lambda: forward_loop(model))
    finally:
        handle.remove()
    return Captured(decoder.layers, hidden, calls, kept)


def _split(value, bs: int, pieces: list[slice]):
    """A layer argument per piece of the batch: tensors of 2+ dims whose first dim is the batch
    (hidden states, a 4-D mask) are sliced; the rest (rotary cos/sin of batch 1, cache
    positions, flags) are shared."""
    if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == bs:
        return [value[p] for p in pieces]
    if isinstance(value, (tuple, list)):
        parts = [_split(v, bs, pieces) for v in value]
        return [type(value)(p[i] for p in parts) for i in range(len(pieces))]
    return [value] * len(pieces)


def chunked(inputs: list, max_tokens: int) -> list:
    """The captured batches cut into pieces of at most max_tokens tokens (whole sequences):
    a layer's MLP activations and their NVFP4 emulation in float32 scale with the tokens
    of one call (at 8B, 128 x 512 tokens in one call peaked at 68 GiB)."""
    out = []
    for h, args, kwargs in inputs:
        bs, seq = h.shape[0], h.shape[1] if h.dim() > 2 else 1
        rows = max(1, max_tokens // max(seq, 1))
        if bs <= rows:
            out.append((h, args, kwargs))
            continue
        pieces = [slice(i, min(i + rows, bs)) for i in range(0, bs, rows)]
        hs = _split(h, bs, pieces)
        a = _split(tuple(args), bs, pieces)
        ks = {k: _split(v, bs, pieces) for k, v in kwargs.items()}
        out += [(hs[i], a[i], {k: v[i] for k, v in ks.items()}) for i in range(len(pieces))]
    return out


def layer_output(out):
    """A decoder layer's hidden states, whether it returns them alone or in a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _progress(done: int, total: int) -> None:
    try:  # layers done, for the launcher's bar: this pass is most of the recipe's time
        events.progress("refine", done, total)
    except Exception:  # noqa: BLE001 - progress must never break quantization
        pass


class _Timer:
    """Seconds per phase of the pass, for the log line (on CUDA, synchronized at the phase's end)."""

    def __init__(self):
        self.s, self.t = {}, time.time()

    def lap(self, phase: str) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.time()
        self.s[phase] = self.s.get(phase, 0.0) + now - self.t
        self.t = now

    def __str__(self):
        return ", ".join(f"{k} {v:.1f}s" for k, v in self.s.items())


class _StopLayer(Exception):
    pass


class _Replay:
    """Outputs of the layer's submodules whose quantized units are all done, kept per batch and
    replayed in the later passes over the same layer instead of computed again.

    Why it is exact: units are fitted in execution order, so when every unit inside a module is
    done, so is every unit before it; its input and weights no longer change, and neither does
    its output. In a Llama layer this skips q/k/v after the o stage, the whole attention block
    after the gate/up stage, and gate/up in the last pass: about half of the quantized stream's
    compute (bf16 matrix products, NVFP4 input emulation).

    The outputs wait where fit says (fit.back when recorded, fit.on when replayed: host memory in
    a streamed run); tuples keep their structure, only tensors move. A module inside one that is
    recorded or replayed in the same pass is not recorded, and its outputs go once the outer one
    is complete (at 8B, 2 bytes x 38912 values a token at most: q/k/v, attention, gate/up). An
    output kept as the very tensor the layer made (no copy: fit keeps it where it is) is checked
    at each pass's end: if the layer changed it in place, or a module ran twice in a batch, that
    module is computed again instead."""

    def __init__(self, layer, units: list[list[str]], linears: dict, batch: list, fit: Fit):
        unit_of = {id(linears[n]): i for i, u in enumerate(units) for n in u}
        self.mods, names = [], {}
        for name, m in layer.named_modules():
            inside = {unit_of[id(x)] for x in m.modules() if id(x) in unit_of}
            if m is not layer and inside:
                self.mods.append((m, inside))
                names[id(m)] = name
        # per module, the modules of self.mods around it
        self.around = {k: {j for j, o in names.items() if n.startswith(o + ".")} for k, n in names.items()}
        # per module, the passes that would replay it: recorded in the pass after its last unit, it is
        # replayed from the next one until the pass after the one that records a module around it
        last = {id(m): max(inside) for m, inside in self.mods}
        self.uses = {k: min([len(units)] + [last[a] + 1 for a in self.around[k]]) - last[k] - 1 for k in last}
        self.batch, self.fit, self.cache, self.complete = batch, fit, {}, set()
        self.live, self.spoiled = {}, set()  # outputs kept uncopied: (tensor, version); modules not to replay
        self.handles, self.patched = [], []

    def start(self, done: int, record: bool = True) -> None:
        """Before a pass in which units[:done] are quantized (and emulated: call this after the
        Emulation is installed, so that the recorded output is the emulated one)."""
        ready = {id(m) for m, inside in self.mods if max(inside) < done} - self.spoiled
        for m, inside in self.mods:
            if id(m) not in ready or self.around[id(m)] & self.complete:
                continue  # not finished, or a finished module around it is replayed whole
            if id(m) in self.complete:
                self.patched.append(patch_forward(m, lambda *a, _k=id(m), **k: self._replay(_k)))
            elif record and not self.around[id(m)] & ready and self.uses[id(m)] >= self.fit.replay_min_uses:
                self.handles.append(m.register_forward_hook(self._record))

    def _record(self, mod, args, out) -> None:
        kept = self.cache.setdefault(id(mod), {})
        if self.batch[0] in kept:  # called twice in one batch: one output would stand for both
            self.spoiled.add(id(mod))
        live = self.live.setdefault(id(mod), [])

        def back(t):
            k = self.fit.back(t)
            if k is t and not t.is_inference():  # (inference tensors cannot change outside inference_mode)
                live.append((t, t._version))
            return k
        kept[self.batch[0]] = tree_map_only(torch.Tensor, back, out)

    def _replay(self, key: int):
        return tree_map_only(torch.Tensor, self.fit.on, self.cache[key][self.batch[0]])

    def stop(self, batches: int) -> None:
        for h in self.handles:
            h.remove()
        for undo in reversed(self.patched):
            undo()
        self.handles, self.patched = [], []
        for k, kept in self.live.items():  # changed in place since it was kept: not the output any more
            if any(t._version != v for t, v in kept):
                self.spoiled.add(k)
        self.complete |= {k for k, v in self.cache.items() if len(v) == batches}
        self.complete -= self.spoiled
        # what is left to replay: complete modules not inside another complete one
        self.complete = {k for k in self.complete if not self.around[k] & self.complete}
        self.cache = {k: v for k, v in self.cache.items() if k in self.complete}
        self.live = {k: v for k, v in self.live.items() if k in self.complete}


class _Capture:
    """Forward pre-hooks that hand each watched Linear's input to a callback."""

    def __init__(self, mods: dict, fn):
        self.handles = [m.register_forward_pre_hook(lambda mod, args, n=n: fn(n, args[0]))
                        for n, m in mods.items()]

    def remove(self):
        for h in self.handles:
            h.remove()


@dataclass(frozen=True)
class Fit:
    """How refine_layer fits a layer's units (the Gptq step's parameters) and where its
    streams live. device / keep: the device the layer runs on and where the streams and the
    captured unit inputs wait between calls (streaming.py keeps them in host memory under a GPU
    budget; None: where they are, as in the whole model). replay: _Replay's cache of finished
    submodules' outputs (up to ~9.5x the hidden states of a layer at 8B; it waits where `keep`
    says; the result is the same either way). replay_min_uses: only outputs that at least this many
    later passes replay are kept (in a Llama layer 1: q/k/v, attention, gate/up; 2: attention)."""
    damp: float = 0.01
    block_size: int = 128
    search: bool = True
    ridge: float | None = None    # None: RIDGE (the Gptq step's default)
    kernel: str = "auto"
    hessian_tf32: bool = True
    scales: str = "search"        # the Gptq step's block-scale choice (algorithms._gptq)
    replay: bool = True
    replay_min_uses: int = 1
    device: str | None = None
    keep: str | None = None

    def __post_init__(self):
        if self.ridge is None:
            object.__setattr__(self, "ridge", RIDGE)

    def on(self, t):
        return t if self.device is None else t.to(self.device, non_blocking=True)

    def back(self, t):
        if self.keep is None or t.device.type == self.keep:
            return t
        if t.is_cuda and self.keep == "cpu":  # the copies back to the GPU queue on the same stream, after these
            return pinned_copy(t, non_blocking=True)
        return t.to(self.keep)


def _parks(layer_bytes: int, members: list, fit: Fit) -> bool:
    """Whether the layer's other weights wait in host memory while this unit's squares are built and
    solved: in a streamed run (fit.keep) when the unit's Hessian (in^2 float32) outweighs the whole
    layer, as down_proj's does at 8B (0.82 GB against 0.44 GB): under a small GPU cap the two do not
    fit together. Only where tensors wait changes: the products and solves are the same."""
    if fit.keep is None or fit.device is None or fit.keep == fit.device:
        return False
    width = members[0].weight.shape[1]
    return width * width * 4 > layer_bytes


def _sums_at_catch(layer_bytes: int, members: list) -> bool:
    """Whether a unit's H and G (float32, in x (in + out)) are summed while its inputs are caught,
    beside the layer's activations: when they are at most half the layer's weights (q/k/v and o in
    a Llama layer, ~0.16 GB against 0.44 GB at 8B). Gate/up's (0.5 GB) beside a 16384-token chunk's
    activations would pass a GPU cap of 10% of the model; its inputs wait and are summed after."""
    width = members[0].weight.shape[1]
    sums = width * (width + sum(m.weight.shape[0] for m in members)) * 4
    return 2 * sums <= layer_bytes


def _to_host(fit: Fit) -> bool:
    """Whether what waits goes from a GPU to host memory (a streamed run on a GPU)."""
    return fit.keep == "cpu" and str(fit.device).startswith("cuda")


def _park(layer, unit: list[str], linears: dict, fit: Fit) -> list:
    """The layer's parameters other than the unit's own weights, moved to where what waits is kept
    (fit.back: pinned host memory); returns them for _unpark."""
    own = {id(linears[n].weight) for n in unit}
    parked = [p for p in layer.parameters() if id(p) not in own and p.device.type != fit.keep]
    for p in parked:
        p.data = fit.back(p.data)
    return parked


def _unpark(parked: list, fit: Fit) -> None:
    for p in parked:
        p.data = fit.on(p.data)


@torch.no_grad()
def refine_layer(layer, linears: dict, fp: list, qs: list, calls: list, originals: dict | None,
                 fit: Fit, timer: _Timer) -> tuple[list, list, int]:
    """One decoder layer of the sequential pass: its quantized units fitted by activation-aware
    GPTQ on the two streams. fp / qs: the original and quantized hidden states per chunk; calls:
    the (args, kwargs) per chunk; originals: where the units' original weights go (None: not
    kept; they would wait on the GPU beside the widest unit's solve). Returns the streams after
    the layer and the units fitted.
    The caller holds QuantizersOff (and float32_linears on the CPU)."""
    run = lambda h, a, k: layer(fit.on(h), *a, **k)  # noqa: E731
    name_of = {id(m): n for n, m in linears.items()}
    members = [name_of[id(m)] for m in layer.modules() if id(m) in name_of]
    units = fused_units(members)
    if not units:
        return ([fit.back(layer_output(run(h, a, k))) for h, (a, k) in zip(fp, calls)],
                [fit.back(layer_output(run(h, a, k))) for h, (a, k) in zip(qs, calls)], 0)
    heads = {u[0]: linears[u[0]] for u in units}
    scales = {u[0]: unit_input_scale([linears[n] for n in u]) for u in units}
    # 1. the original layer: every unit's input X, and the next layer's input
    x_fp = {n: [] for n in heads}
    cap = _Capture(heads, lambda n, x: x_fp[n].append(fit.back(x.detach().reshape(-1, x.shape[-1]))))
    try:
        fp = [fit.back(layer_output(run(h, a, k))) for h, (a, k) in zip(fp, calls)]
    finally:
        cap.remove()
    timer.lap("original stream")
    # 2. unit by unit, in execution order, on the quantized stream
    emulated = []
    batch = [0]
    replay = _Replay(layer, units, linears, batch, fit) if fit.replay else None
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())  # the units' placement rules
    for unit in units:
        head = unit[0]
        sums = SquareSums(tf32=fit.hessian_tf32)
        # the unit's input on the quantized stream, per chunk: caught at the unit, the rest of the
        # layer skipped. A unit with small sums (_sums_at_catch) adds it to them there, with the same
        # chunk of X (x_fp): nothing waits. Others' inputs wait where the streams wait (host memory
        # in a streamed run on a GPU, copied out on a side stream; held on the GPU they grow with the
        # calibration tokens, 1.75 GB at 8B's down_proj for 128 x 512 tokens) and are summed after
        # the pass, a parking unit's once the layer is parked. The same sums in the same order.
        mods = [linears[n] for n in unit]
        parks = _parks(layer_bytes, mods, fit)
        # (by chunk: X was caught once in every chunk, as a dense layer's units are)
        at_catch = not parks and len(x_fp[head]) == len(qs) and _sums_at_catch(layer_bytes, mods)
        # W: the members' weights as quantize_unit stacks them (every member shares the unit's H and G)
        members = [linears[n].weight.detach() for n in unit]
        caught = []
        aside = CopiesOut(fit.device) if not at_catch and _to_host(fit) else None

        def catch(n, x):
            x = x.detach().reshape(-1, x.shape[-1])
            if at_catch:  # summed where it is caught, in the same chunk order: nothing waits
                sums.add(x, scales[head], x_fp[head][batch[0]], members, on=fit.on)
                x_fp[head][batch[0]] = None
            else:  # summed below, after the pass (and the parking); till then it waits
                caught.append(aside.copy(x) if aside else fit.back(x))
            raise _StopLayer

        emu = Emulation(linears, emulated)
        if replay:
            replay.start(len(emulated))
        cap = _Capture({head: heads[head]}, catch)
        try:
            for i, (h, (a, k)) in enumerate(zip(qs, calls)):
                batch[0] = i
                try:
                    run(h, a, k)
                except _StopLayer:
                    pass
        finally:
            cap.remove()
            if replay:
                replay.stop(len(qs))
            emu.remove()
        timer.lap("quantized stream")
        parked = _park(layer, unit, linears, fit) if parks else []
        on = aside.on(fit.on) if aside else fit.on
        for i, x in enumerate(caught):
            # Xq's and X's chunks wait where fit.keep says: SquareSums brings them SQUARE_TOKENS at a time
            sums.add(x, scales[head], x_fp[head][i], members, on=on)
            caught[i] = None
        aside = None
        caught = None  # (the closure above holds the name, not the list)
        members = None  # (catch above reads these names: emptied, not deleted)
        timer.lap("H, G")
        # one H and one G for the whole unit (the same tensors: quantize_unit stacks the
        # members that share them into one GPTQ call)
        h_unit, g_unit = sums.h.div_(max(sums.count, 1)), sums.g.div_(max(sums.count, 1))  # in place
        sums = None
        hs = {n: h_unit for n in unit}
        gs = {n: g_unit for n in unit}
        del h_unit, g_unit  # quantize_unit consumes hs / gs and frees each when used up
        quantize_unit(unit, linears, hs, gs, originals, gptq=True, search=fit.search,
                      damp=fit.damp, block_size=fit.block_size, ridge=fit.ridge, kernel=fit.kernel,
                      scales=fit.scales)
        del hs, gs
        x_fp[head] = None
        _unpark(parked, fit)
        emulated.append(unit)
        timer.lap("GPTQ (activation correction included)")
    # 3. the quantized layer: the next layer's quantized input
    emu = Emulation(linears, emulated)
    if replay:
        replay.start(len(emulated), record=False)
    try:
        out = []
        for i, (h, (a, k)) in enumerate(zip(qs, calls)):
            batch[0] = i
            out.append(fit.back(layer_output(run(h, a, k))))
        qs = out
    finally:
        if replay:
            replay.stop(len(qs))
        emu.remove()
    timer.lap("quantized stream")
    return fp, qs, len(units)


def start_streams(hidden: list, calls: list) -> tuple[list, list, list]:
    """The two streams of the pass (original, quantized), from what layer 0 receives per batch,
    cut into chunks; and each layer's (args, kwargs) cut into the same chunks (`calls`: per
    layer, per batch)."""
    per_layer = [[(a, k) for _, a, k in chunked([(h, a, k) for h, (a, k) in zip(hidden, layer)], CHUNK_TOKENS)]
                 for layer in calls]
    fp = [h for h, _, _ in chunked([(h, (), {}) for h in hidden], CHUNK_TOKENS)]
    return fp, [h.clone() for h in fp], per_layer


@torch.no_grad()
def sequential_gptq(model, forward_loop, keep_batches: int = 0, damp: float = 0.01,
                    block_size: int = 128, search: bool = True, captured=None,
                    ridge: float | None = None, kernel: str = "auto", hessian_tf32: bool = True,
                    scales: str = "search"):
    """Quantize every quantized Linear layer by layer (see the module's docstring); Linears
    whose quantizers are off (kept in bf16) run unquantized in both streams. `captured`:
    first_layer_inputs' result, when the caller already has it. Returns (linears, originals,
    kept_ids), like algorithms.quantize_weights."""
    t0 = time.time()
    timer = _Timer()
    fit = Fit(damp=damp, block_size=block_size, search=search, ridge=ridge,
              kernel=kernel, hessian_tf32=hessian_tf32, scales=scales)
    linears = quantized_linears(model)
    originals: dict = {}
    with QuantizersOff(model), float32_linears(model):
        captured = captured or first_layer_inputs(model, forward_loop, keep_batches)
        layers, kept = captured.layers, captured.kept
        fp, qs, calls = start_streams(captured.hidden, captured.calls)
        del captured
        done_units = 0
        for li, layer in enumerate(layers):
            _progress(li, len(layers))
            fp, qs, n = refine_layer(layer, linears, fp, qs, calls[li], originals, fit, timer)
            done_units += n
        _progress(len(layers), len(layers))
    _log(f"refine: sequential activation-aware GPTQ on {len(originals)} Linears ({timer}) "
         f"({done_units} units, {len(layers)} layers) in {time.time() - t0:.1f}s")
    return linears, originals, kept
