"""The README's table of what each mode needs, from the estimates preflight uses
(container_payload/core/memory_plan.py), for the models Spark users quantize.

    python3 benchmarks/memory_table.py      # prints the markdown table; no torch, no GPU

The shapes are the models' published configs (bf16 bytes from their parameter counts):
Llama-3-8B (DeepSeek-R1-Distill-Llama-8B), Qwen3.6-35B-A3B (transformers' Qwen3_5MoeTextConfig
defaults: 40 layers of 256 experts) and Llama-3-70B. Calibration: make quantize's 128 x 512
tokens, batch 8.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from container_payload.core import memory_plan  # noqa: E402
from container_payload.core.memory_plan import GiB, Shape  # noqa: E402


def llama(layers: int, hidden: int, inter: int, kv_heads: int, vocab: int = 128256) -> Shape:
    head = 128
    layer = (2 * hidden * hidden + 2 * hidden * kv_heads * head + 3 * hidden * inter + 2 * hidden) * 2
    outside = 2 * vocab * hidden * 2 + hidden * 2
    return Shape(outside + layers * layer, outside, layer, hidden, inter)


def qwen36_35b_a3b() -> Shape:
    hidden, experts, inter, vocab, layers = 2048, 256, 512, 248320, 40
    moe = (experts + 1) * 3 * hidden * inter + experts * hidden          # experts, shared expert, router
    attn = 2 * hidden * 16 * 256 + 2 * hidden * 2 * 256 + 16 * 256 * hidden  # full attention (q gated)
    layer = (moe + attn) * 2
    outside = 2 * vocab * hidden * 2
    # the hub checkpoint stores the routed experts one by one: streamed mode fuses them as it reads
    return Shape(outside + layers * layer, outside, layer, hidden, inter, expert_bytes=experts * 3 * hidden * inter * 2)


MODELS = {"8B (Llama-3-8B shapes)": llama(32, 4096, 14336, 8),
          "35B-A3B (Qwen3.6 MoE)": qwen36_35b_a3b(),
          "70B (Llama-3-70B shapes)": llama(80, 8192, 28672, 8)}
RECIPES = ("default", "smooth-gptq-seq", "smooth-gptq-seq-mp", "moe-w4a16-experts")


def main() -> None:
    g = lambda b: f"{b / GiB:.0f} GiB"  # noqa: E731
    print("| model | bf16 weights | recipe | whole | streamed |")
    print("|---|---|---|---|---|")
    for name, shape in MODELS.items():
        moe = "MoE" in name
        for recipe in RECIPES:
            if (recipe.startswith("moe") and not moe) or (moe and "gptq" in recipe):
                continue
            need = memory_plan.peaks(shape, 128 * 512, 8 * 512, recipe)
            streams = memory_plan.refusal(recipe) is None
            print(f"| {name} | {g(shape.total_bytes)} | `{recipe}` | {g(need['whole'])} | "
                  f"{g(need['streamed']) if streams else 'does not stream'} |")


if __name__ == "__main__":
    main()
