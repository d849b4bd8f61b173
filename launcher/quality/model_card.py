"""The output's README.md: what was quantized and how, what it cost, how to serve it."""
from __future__ import annotations

from pathlib import Path

from ..common.files import atomic_write_text
from ..common.untrusted import link_out_of, read_json_object

ENGINES = """\
## Serve it

Every command publishes the port on 127.0.0.1 only. Inside the container the server must
listen on 0.0.0.0 (`--host 0.0.0.0`): the published port arrives on the container's
bridge interface, so a server bound to its own localhost is never reached.

TensorRT-LLM (DGX Spark, in the same image, with NVIDIA's container settings):

    docker run --rm -it --gpus all --ipc host --ulimit memlock=-1 --ulimit stack=67108864 \\
      -p 127.0.0.1:8000:8000 -v {path}:/ckpt:ro \\
      nvcr.io/nvidia/tensorrt-llm/release:spark-single-gpu-dev \\
      trtllm-serve /ckpt --host 0.0.0.0 --port 8000

vLLM, as NVIDIA runs it on a Spark: its NGC image, and 0.4 of the unified memory for the
engine so the system keeps the rest (VLLM_TAG: the current tag at
catalog.ngc.nvidia.com/orgs/nvidia/containers/vllm). It reads `quantization_config`
from config.json; with VLLM_API_KEY set, every route but /health needs
`Authorization: Bearer $VLLM_API_KEY` (passed by name, so it is not in `ps`):

    export VLLM_API_KEY=$(openssl rand -hex 24)
    docker run --rm -it --gpus all --ipc host -p 127.0.0.1:8000:8000 -e VLLM_API_KEY \\
      -v {path}:/ckpt:ro nvcr.io/nvidia/vllm:$VLLM_TAG \\
      vllm serve /ckpt --host 0.0.0.0 --port 8000 --quantization modelopt_fp4 \\
      --gpu-memory-utilization 0.4
    until curl -sf http://127.0.0.1:8000/health; do sleep 5; done   # ready when this answers

SGLang:

    python -m sglang.launch_server --model-path {path} --quantization modelopt_fp4 --host 127.0.0.1

Or `launcher serve {path}`, which starts and checks the server for you.
"""


# What each recipe cost at 8B shapes on one H200, 128 x 512 calibration, all in one call
# (benchmarks/results/gpu_8b-recipe-cost-tf32-fp32-vs-llmc.md, 2026-11-30): the wall time of the whole payload run.
GPU_8B_COST = {
    "default": "32.4 s",
    "smooth-gptq-seq-mp": "87.8 s (2.7x the default recipe)",
}


def _model_name(model: str | None) -> str:
    return "`SmolLM2-135M-Instruct` (the embedded default)" if model == "embedded" else f"`{model or '?'}`"


def _mb(n: int | None) -> str:
    return f"{n / 1e6:,.1f} MB" if n else "?"


def tasks_table(tasks: dict) -> list[str]:
    """`launcher eval --tasks`' result as the card's recovery table (lm-eval's metrics and stderrs)."""
    args = tasks.get("task_args") or {}
    lines = ["### Accuracy on tasks (lm-evaluation-harness)", "",
             f"lm-evaluation-harness {tasks.get('versions', {}).get('lm_eval', '?')} on both models, the quantized one "
             "as the engines compute it (exact emulation)"
             + (f", {args['limit']} documents per task" if args.get("limit") else "")
             + (f", {args['num_fewshot']}-shot" if args.get("num_fewshot") is not None else "")
             + ". Recovery = quantized / original; ± one standard error (lm-eval's, propagated).", "",
             "| task | metric | original | quantized | recovery |", "|---|---|---|---|---|"]
    for task, rows in (tasks.get("tasks") or {}).items():
        for name, row in rows.items() if isinstance(rows, dict) else ():
            if not isinstance(row, dict) or not all(isinstance(row.get(k), (int, float))
                                                    for k in ("reference", "quantized", "recovery")):
                continue
            lines.append(f"| {task} | {name} | {_with_se(row['reference'], row.get('reference_stderr'))} | "
                         f"{_with_se(row['quantized'], row.get('quantized_stderr'))} | "
                         f"{_with_se(100 * row['recovery'], _scaled(row.get('recovery_stderr')), 1)}% |")
    return lines + [""]


def _scaled(se):
    return 100 * se if isinstance(se, (int, float)) else None


def _with_se(value: float, se, digits: int = 4) -> str:
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if isinstance(se, (int, float)) else "")


def render(output: Path, result: dict, evaluation: dict | None, source_bytes: int | None,
           tasks: dict | None = None) -> str:
    calib = result.get("calibration", {})
    src = result.get("source", {})
    lines = [
        f"# {output.name}",
        "",
        f"NVFP4 checkpoint of {_model_name(src.get('model'))}"
        + (f" (revision `{src['revision']}`)" if src.get("revision") else "")
        + ", made by spark-nvfp4 with NVIDIA ModelOpt and checked by `launcher verify`.",
        "",
        "| | |", "|---|---|",
        f"| format | {result.get('format')} ({'weights and activations' if result.get('format') == 'nvfp4' else 'see format'}) |",
        f"| recipe | {result.get('recipe')} (ModelOpt preset {result.get('modelopt_preset')}) |",
        f"| KV cache | {result.get('kv_cache', 'none')} |",
        f"| calibration | {calib.get('samples')} windows x {calib.get('seq_len')} tokens of `{Path(str(calib.get('source', '?'))).name}` |",
        f"| size | {_mb(result.get('checkpoint_bytes'))} (original {_mb(source_bytes)}) |",
        f"| tools | ModelOpt {result.get('versions', {}).get('modelopt')}, torch {result.get('versions', {}).get('torch')}, "
        f"transformers {result.get('versions', {}).get('transformers')} |",
        f"| quantized on | {result.get('device')} in {result.get('timings', {}).get('total_s', '?')} s |",
    ]
    if result.get("steps_applied"):  # which parts of the recipe applied to this architecture
        lines.append(f"| recipe steps | {'; '.join(map(str, result['steps_applied']))} |")
    timings = result.get("timings", {})
    if timings.get("quantize_s") is not None:
        lines.append(f"| recipe's own time | {timings['quantize_s']:.0f} s (calibration and refinement, "
                     "without loading and export) |")
    if result.get("recipe") in GPU_8B_COST:
        lines.append(f"| this recipe on an 8B model | {GPU_8B_COST[result['recipe']]} on one H200 "
                     "(128 x 512 calibration; spark-nvfp4's benchmarks/results/gpu_8b-recipe-cost-tf32-fp32-vs-llmc.md) |")
    lines += [
        "",
    ]
    if evaluation:
        lines += [
            "## What quantization cost",
            "",
            f"On held-out text `{Path(str(evaluation.get('text', '?'))).name}` ({evaluation['tokens']} tokens, "
            "never used for calibration), the quantized model as the engines compute it (exact emulation) "
            "against the original:",
            "",
            "| metric | value |", "|---|---|",
            f"| perplexity | {evaluation['perplexity']:.3f} (original {evaluation['reference_perplexity']:.3f}) |",
            f"| KL(original ‖ quantized) | {evaluation['kl_divergence']:.4f} nats/token |",
            f"| top-1 token agreement | {evaluation['top1_agreement']:.3f} |",
            "",
        ]
        gens = evaluation.get("generations") or []
        if gens:
            lines += ["### Greedy generations, side by side", ""]
            for g in gens:
                lines += [f"**Prompt:** {g.get('prompt')}", "",
                          f"- original: {g.get('reference', '').strip()!s}",
                          f"- quantized: {g.get('quantized', '').strip()!s}", ""]
    elif not tasks:
        lines += ["Quality was not measured for this run (`--no-eval`); run `launcher eval` on it.", ""]
    if tasks:
        if not evaluation:
            lines += ["## What quantization cost", ""]
        lines += tasks_table(tasks)
    lines.append(ENGINES.format(path=output))
    return "\n".join(lines)


def write(output: Path, evaluation: dict | None, source_bytes: int | None = None, tasks: dict | None = None) -> Path:
    # written by the container: a regular file of the output, or the card says "?"
    made = output / "result.json"
    result = (None if link_out_of(made) else read_json_object(made, limit=64 << 20)) or {}
    text = render(output, result, evaluation, source_bytes, tasks)
    return atomic_write_text(output / "README.md", text)
