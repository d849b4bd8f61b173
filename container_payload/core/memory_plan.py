"""Peak memory of a quantize job in each mode, and which mode a budget allows.

Standard library only: the launcher's preflight uses it before the download, and the payload
uses it again (mode "auto") with the checkpoint in hand. The estimates are simple and stated:

  whole    = 1.4 x bf16 weights for ModelOpt's recipes (the model, ModelOpt's export state dict
             of about 0.3x, and temporaries; what preflight has always assumed), 3 x for ours
             (a copy of the original weights beside the fitted ones, rankings, Hessians)
             + activations + runtime
  streamed = embeddings + lm_head + 4 x the largest decoder layer (the bf16 layer, its export,
             the shard buffer of about one layer, the next layer read ahead) + activations
             + the recipe's streams and GPTQ work + runtime
             + a MoE checkpoint's per-expert tensors of one layer (fused as they are read; measured on
             a 6-layer, 64-expert Qwen3-MoE of 50 MiB layers: 4.5 layers above runtime, embeddings
             and activations, where this counts 4.97)

activations = the captured hidden states (tokens x hidden x 2 bytes, kept once: each layer's
outputs replace its inputs) + one batch's temporaries inside a layer (float32 MLP products).
A sequential GPTQ adds two streams of hidden states (original, quantized), smoothing one more
(the unsmoothed model's, for its statistics); GPTQ holds one layer's unit inputs (3 x hidden +
intermediate per token, bf16), and for the widest unit (down_proj: intermediate inputs) the
activation correction and GPTQ: GPTQ_SQUARES intermediate^2 float32 squares and GPTQ_WEIGHTS
hidden x intermediate float32 ones, on the device that runs the layer (H's copy during the
correction waits in host memory); on a Spark GPU and host are one pool, and the streamed total
counts both. A ranking (keep_bf16),
before or after the GPTQ, holds instead its RANKING_STREAMS streams of hidden states on
RANKING_TOKENS tokens (bf16), as many of the head's inputs at its end, and the KL's work on one
chunk of the vocabulary at a time (bf16_ranking.mean_kls): float32 logits of the reference and one
stream with their temporaries (CHUNK_COPIES x RANKING_TOKENS x RANKING_VOCAB_CHUNK x 4 bytes) and
the head's chunk in float32. Never the whole vocabulary's logits (at 8B, 0.5 GB a copy).
runtime = torch + transformers + ModelOpt imported and a tokenizer loaded: about 0.5 GiB on
a CPU (tests/test_streaming.py measures it), counted as 1 GiB (a CUDA context adds more;
tokenizing the whole builtin Brown text adds about 0.6 GiB of its own on top).
Measured on the CPU (40-layer random Llama, 252 MiB bf16): the streamed peak was 601 MiB, of
which 510 MiB runtime; its largest moment is writing lm_head (the tensor + its serialized copy).
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from . import recipes

GiB = 1 << 30
RUNTIME_BYTES = 1 * GiB
WHOLE_FACTOR = 1.4
WHOLE_FACTOR_OURS = 3.0   # the measurement of make quantize's recipe
# The widest unit at GPTQ's peak (steps/gptq.py, steps/factor.py; bounded by tests/test_algorithms.py's
# gptq_memory): one square of intermediate^2 x 4 bytes (H, whose own storage takes the activation
# correction's factor and then GPTQ's inverse factor; its copy during the correction waits in host
# memory) and factor.py's panels (a quarter of a square counted; 2 x 1024 columns of 14336 at 8B
# are 0.14); and weight-sized tensors of hidden x intermediate x 4 bytes: G (then V in its storage,
# then GPTQ's working copy, handed over), counted 3 with the pieces and the unit's own weights as an
# upper bound (tests/test_algorithms.py's gptq_memory measures 1 + vectors). In a streamed run on a GPU the layer's other
# weights wait in host memory meanwhile (sequential._park). Before (float64 correction: A and its
# LU copy) it was 4 squares and 5 weights: 5.08 GiB at 8B on an H100 (6 GiB cap).
GPTQ_SQUARES = 1.25
GPTQ_WEIGHTS = 3
LAYER_COPIES = 4   # the layer at work, its host read, the writer's buffer, the next layer read ahead
# A ranking pass (keep_bf16) scores units by the KL of the model's logits on at most RANKING_TOKENS
# calibration tokens, RANKING_VOCAB_CHUNK vocabulary rows at a time. Its streams: the reference, the
# base and, per shortlisted unit (RANKING_CANDIDATES, in bf16 and FP8), one per format. A chunk's
# float32 logits: the reference's, its probabilities, a stream's and the bf16 product (measured on
# the CPU with tests/live_bytes.py: 4.3 copies, with the inputs' float32 copy).
RANKING_TOKENS = 1024
RANKING_VOCAB_CHUNK = 16384
RANKING_CANDIDATES = 12
RANKING_STREAMS = 2 + 2 * RANKING_CANDIDATES
CHUNK_COPIES = 5

# What streams (streaming.py): a recipe whose steps each work on one decoder layer at a time, as
# each step declares (recipes.Plan.whole_only).
STREAMED_RECIPES = tuple(name for name, r in recipes.RECIPES.items()
                         if not any(step.plan().whole_only for step in r.steps))
_LAYER_KEY = re.compile(r"^(.*\.)?layers\.(\d+)\.")
_EXPERT_KEY = re.compile(r"\.experts\.\d+\.")


@dataclass(frozen=True)
class Shape:
    """What the estimates need of a model; exact from its folder, else a guess from its size."""
    total_bytes: int
    outside_bytes: int          # everything not in a decoder layer: embeddings, lm_head, norm
    largest_layer_bytes: int
    hidden: int = 4096
    intermediate: int = 14336
    exact: bool = True
    # the largest layer's per-expert tensors (`experts.3.gate_proj.weight`): the streamed read fuses
    # them as transformers 5 loads them (checkpoint_map), one more copy of them while they stack
    expert_bytes: int = 0
    vocab: int = 128256


def shape_of(model_dir: Path | None, total_bytes: int) -> Shape:
    """From the folder's config.json and safetensors headers when it has them; otherwise (a hub
    model not yet downloaded) a conservative guess: the largest layer 1/16 of the weights and
    embeddings + lm_head 1/8 (Llama-3-8B: 1/32 and 1/8)."""
    if model_dir is not None:
        try:
            return _exact(Path(model_dir))
        except (OSError, ValueError, KeyError, struct.error):
            pass
    return Shape(total_bytes, total_bytes // 8, total_bytes // 16, exact=False)


def _exact(model_dir: Path) -> Shape:
    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError("no safetensors")
    layers: dict[str, int] = {}
    experts: dict[str, int] = {}
    outside = 0
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in header.items():
            size = info["data_offsets"][1] - info["data_offsets"][0]
            m = _LAYER_KEY.match(name)
            if m:
                layers[m.group(0)] = layers.get(m.group(0), 0) + size
                if _EXPERT_KEY.search(name):
                    experts[m.group(0)] = experts.get(m.group(0), 0) + size
            else:
                outside += size
    if not layers:
        raise ValueError("no decoder layers found")
    return Shape(outside + sum(layers.values()), outside, max(layers.values()),
                 int(config.get("hidden_size", 4096)), int(config.get("intermediate_size", 0) or 0)
                 or 4 * int(config.get("hidden_size", 4096)), expert_bytes=max(experts.values(), default=0),
                 vocab=int(config.get("vocab_size", 128256)))


def _steps(recipe: str, params: dict | None) -> tuple | None:
    if recipe not in recipes.RECIPES:
        return None  # a ModelOpt YAML recipe
    return recipes.with_params(recipe, params or {})


def refusal(recipe: str, params: dict | None = None) -> str | None:
    """Why `recipe` (with its --recipe-param values) cannot stream (one line), or None."""
    return refusal_of(recipe, _steps(recipe, params))


def refusal_of(recipe: str, steps: tuple | None) -> str | None:
    """refusal() for steps already resolved (None: a ModelOpt YAML recipe)."""
    why = "ModelOpt's YAML recipes run over the whole model" if steps is None else \
        next((s.plan().whole_only for s in steps if s.plan().whole_only), None)
    if why is None:
        return None
    return (f"recipe {recipe!r} needs the whole model in memory ({why}; streamed mode runs "
            f"{', '.join(STREAMED_RECIPES)}); use --mode whole, or one of those")


def planning_batch(batch_size: int | str, on_gpu: bool) -> int:
    """The calibration batch the memory plan assumes, the same on the host and in the payload:
    the job's own, else what calibration.auto_batch_size starts from (4 on a CPU; on a GPU it
    grows from 8 with the free memory, so 8 is the plan's floor)."""
    return batch_size if batch_size != "auto" else (8 if on_gpu else 4)


AUTO_BATCH_CAP = 128   # calibration.auto_batch_size's cap on a GPU


def planned_batch(batch_size: int | str, on_gpu: bool, samples: int, fits) -> int:
    """The calibration batch a plan runs: the job's own, else planning_batch, which on a GPU
    doubles up to AUTO_BATCH_CAP while fits(batch) (the planned mode's peak within the budget at
    that batch): fewer, larger batches calibrate faster, and the payload feeds exactly this one."""
    if batch_size != "auto":
        return batch_size
    bs = planning_batch(batch_size, on_gpu)
    while on_gpu and bs * 2 <= min(AUTO_BATCH_CAP, samples) and fits(bs * 2):
        bs *= 2
    return max(1, min(bs, samples))


def activation_bytes(shape: Shape, tokens: int, batch_tokens: int) -> int:
    return tokens * shape.hidden * 2 + batch_tokens * shape.intermediate * 4 * 4


def ranking_bytes(shape: Shape) -> int:
    """What a ranking pass holds beside the model (see the module docstring): its streams and the
    head's inputs (bf16), a vocabulary chunk's float32 logits and the head's chunk in float32."""
    chunk = min(RANKING_VOCAB_CHUNK, shape.vocab)
    return (2 * RANKING_STREAMS * RANKING_TOKENS * shape.hidden * 2
            + CHUNK_COPIES * RANKING_TOKENS * chunk * 4 + chunk * shape.hidden * 4)


def peaks(shape: Shape, tokens: int, batch_tokens: int, recipe: str = "default",
          params: dict | None = None) -> dict[str, int]:
    return peaks_of(shape, tokens, batch_tokens, _steps(recipe, params))


def peaks_of(shape: Shape, tokens: int, batch_tokens: int, steps: tuple | None) -> dict[str, int]:
    """peaks() for steps already resolved (None: a ModelOpt YAML recipe)."""
    plans = [s.plan() for s in steps or ()]
    act = activation_bytes(shape, tokens, batch_tokens)
    streams = tokens * shape.hidden * 2 * sum(p.hidden_streams for p in plans)
    work = 0  # the largest of our passes' own work at a time: a GPTQ unit, or a ranking's logits
    if any(p.unit_inputs for p in plans):
        work = tokens * (3 * shape.hidden + shape.intermediate) * 2 + int(GPTQ_SQUARES * shape.intermediate ** 2 * 4) \
            + GPTQ_WEIGHTS * shape.hidden * shape.intermediate * 4
    if any(p.ranking_batches for p in plans):
        work = max(work, ranking_bytes(shape))
    ours = any(p.ours for p in plans)
    return {"whole": int(shape.total_bytes * (WHOLE_FACTOR_OURS if ours else WHOLE_FACTOR)) + act + streams
            + work + RUNTIME_BYTES,
            "streamed": shape.outside_bytes + LAYER_COPIES * shape.largest_layer_bytes + shape.expert_bytes + act
            + streams + work + RUNTIME_BYTES}


def choose(requested: str, budget: int, need: dict[str, int], cannot_stream: str | None = None
           ) -> tuple[str, str | None]:
    """(mode to run, None), or (mode, one-line problem) when the budget allows nothing.
    `requested`: auto | whole | streamed; `cannot_stream`: why the recipe cannot stream
    (refusal()), None when it can."""
    g = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
    whole_fits, streamed_fits = need["whole"] <= budget, need["streamed"] <= budget
    if requested == "whole" or (requested == "auto" and whole_fits):
        if whole_fits:
            return "whole", None
        if cannot_stream is None and streamed_fits:
            hint = f"streamed mode fits ({g(need['streamed'])}): use --mode streamed or auto"
        else:
            hint = f"raise --memory-budget to {-(-need['whole'] // GiB)}g on a machine that has it"
        return "whole", (f"the whole model needs about {g(need['whole'])} and the memory budget is "
                         f"{g(budget)}; {hint}")
    if cannot_stream is not None:  # whole does not fit (auto) or streamed was asked for
        if requested == "auto":
            return "whole", (f"the whole model needs about {g(need['whole'])}, more than the memory budget "
                             f"of {g(budget)}, and {cannot_stream}")
        return "streamed", cannot_stream
    if streamed_fits:
        return "streamed", None
    lead = "neither mode fits" if requested == "auto" else "streamed mode does not fit"
    return "streamed", (f"{lead} the memory budget of {g(budget)} (whole needs about {g(need['whole'])}, "
                        f"streamed {g(need['streamed'])}); raise --memory-budget to "
                        f"{-(-need['streamed'] // GiB)}g on a machine that has it, or calibrate on fewer tokens")


def parse_bytes(text: str) -> int:
    """'24g', '512m', '1073741824' -> bytes (the --memory-limit syntax)."""
    m = re.fullmatch(r"(\d+)([bkmg]?)", text.strip().lower())
    if not m:
        raise ValueError(f"not a size: {text!r} (like 24g or 512m)")
    return int(m.group(1)) << {"": 0, "b": 0, "k": 10, "m": 20, "g": 30}[m.group(2)]
