"""`launcher`: the command line. Thin on purpose: parse, call a module, print.

Every user mistake or environment failure is a LauncherError: one line on stderr
(what, where, what to do) and a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import enum
import sys
import typing
from pathlib import Path

import click

from container_payload.core.contract import EvalJob

from . import ending
from .common.config import FLAG_NAMES, QuantFormat, flagged_fields, load_spec
from .common.errors import ConfigError
from .common.output import console, print_json, stdout
from .sources.assets import HELDOUT

# Each command imports its own modules in its body (the only imports inside functions here): the
# docker SDK, huggingface_hub and the records load only for the commands that use them, so
# `launcher --help` and `launcher verify` start in a fraction of a second.


class Launcher(click.Group):
    """Every ending of a command, success or not, goes through ending.conclude: one error line,
    the exit code of README's table, and under --json exactly one JSON object on stdout."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = sys.argv[1:] if args is None else list(args)
        ending.catch_sigterm()
        try:  # standalone_mode=False: click raises its usage errors and Ctrl-C to us
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit:
            raise
        except BaseException as e:  # noqa: BLE001 - every ending, a bug's included, is reported
            sys.exit(ending.conclude(e, *ending.wants_json(args)))
        sys.exit(rv if isinstance(rv, int) else 0)  # click returns --help's and --version's code


@click.group(cls=Launcher, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="spark-nvfp4")
def main():
    """spark-nvfp4: quantize a Hugging Face model to a verified NVFP4 checkpoint.

    Runs ModelOpt inside NVIDIA's TensorRT-LLM image (or the CPU stand-in built by
    `make image`), checks the result on the host, measures what it cost, and can
    undo everything it created (`launcher rollback`).
    """


JSON_HELP = ("Print one JSON object on stdout for CI jobs (status, run id, output, sizes, quality, timings; "
             "the error's kind and message on failure). The run also keeps it as result.json.")


def _spec_option(dotted: str, info) -> click.Option:
    """The click option of one spec field, from its annotation and config.flag metadata."""
    extra = info.json_schema_extra
    kw = dict(help=extra["help"], default=None, **extra.get("click", {}))
    kind = info.annotation
    if "/" in extra["flag"]:
        pass  # --x/--no-x: click makes it a boolean pair
    elif kind is bool:
        kw["is_flag"] = True
    elif isinstance(kind, type) and issubclass(kind, enum.Enum):
        kw["type"] = click.Choice([m.value for m in kind])
    elif typing.get_origin(kind) is typing.Literal:
        kw["type"] = click.Choice(list(typing.get_args(kind)))
    elif typing.get_origin(kind) is dict:
        kw["multiple"] = True
    elif kind is int:
        kw["type"] = int
    elif Path in typing.get_args(kind):
        kw["type"] = click.Path(path_type=Path)
    default = info.get_default(call_default_factory=True)
    if default not in (None, {}, "") and not isinstance(default, bool) and "[default" not in kw["help"]:
        kw["help"] += f" [default: {getattr(default, 'value', default)}]"
    return click.Option([extra["flag"], dotted.replace(".", "__")], **kw)


def spec_options(f):
    """One option per JobSpec field that has a flag (config.flagged_fields): written once."""
    for dotted, info in reversed(flagged_fields()):
        f.__click_params__ = getattr(f, "__click_params__", []) + [_spec_option(dotted, info)]
    return f


def spec_option(dotted: str):
    """One JobSpec field's option on a command without a spec (eval, serve): the flag and help
    quantize has, so that the rule reads the same everywhere."""
    info = dict(flagged_fields())[dotted]

    def add(f):
        f.__click_params__ = getattr(f, "__click_params__", []) + [_spec_option(dotted, info)]
        return f
    return add


def spec_flags(kw: dict) -> dict:
    """The nested spec values given on the command line (None: not given)."""
    flags: dict = {}
    for dotted, _ in flagged_fields():
        value = kw.pop(dotted.replace(".", "__"))
        if value == ():  # an unused repeatable option
            value = None
        node = flags
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return flags


@main.command()
@spec_options
@click.option("--weights-only", is_flag=True, help="Shorthand for --format nvfp4-w4a16.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON/TOML file with job fields.")
@click.option("--dry-run", is_flag=True, help="Check everything and say what would be pulled and run; change nothing.")
@click.option("--json", "json_mode", is_flag=True, help=JSON_HELP)
def quantize(weights_only, config_file, dry_run, json_mode, **kw):
    """Quantize a model to NVFP4 (exit 0 only when the checkpoint is complete and verified).

    Values come from --config < SPARK_NVFP4_<FIELD> variables < these flags."""
    from .quantize.job import QuantizeRun

    flags = spec_flags(kw)
    if weights_only:
        flags["format"] = QuantFormat.NVFP4_W4A16.value
    spec = load_spec(flags, FLAG_NAMES, config_file)
    outcome = QuantizeRun(spec, console, dry_run=dry_run).run()
    if json_mode:
        print_json(outcome.result)
    else:
        click.echo(str(outcome.output))


@main.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--json-out", type=click.Path(path_type=Path), help="Also write the full report to this JSON file.")
@click.option("--json", "json_mode", is_flag=True, help="Print the report as one JSON object on stdout "
              "(status, exit code, summary, problems).")
def verify(ckpt, json_out, json_mode):
    """Check an NVFP4 checkpoint (ModelOpt or compressed-tensors) against what TensorRT-LLM,
    vLLM and SGLang require. On the host, no GPU, no container. Exit 0 only when valid."""
    from .common.errors import VerifyFailed
    from .verify import print_report, verify_checkpoint, write_report

    report = verify_checkpoint(ckpt)
    print_report(report, console if json_mode else stdout)
    if json_out is not None:
        write_report(report, json_out)
    code = 0 if report.ok else VerifyFailed.exit_code
    if json_mode:
        print_json({"command": "verify", "status": "valid" if report.ok else "invalid", "exit_code": code,
                    **report.to_json()})
    sys.exit(code)


@main.command("eval")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--reference", help="The original model (hub id, folder, or embedded) [default: the "
              "checkpoint's source, from its result.json].")
@click.option("--text", default=HELDOUT[0], show_default=True,
              help="Held-out text: heldout-wiki, heldout-brown, or a text file (never the calibration text).")
@click.option("--tokens", type=click.IntRange(min=2), default=EvalJob.tokens, show_default=True,
              help="Score the first T tokens of the text.")
@click.option("--seq-len", type=click.IntRange(min=2), default=EvalJob.seq_len, show_default=True,
              help="Window length L.")
@click.option("--json-out", type=click.Path(path_type=Path), help="Where to write the full results "
              "[default: CKPT/eval.json].")
@click.option("--image", default="auto", show_default=True, help="Container image (as for quantize).")
@click.option("--gpus", default="auto", show_default=True, help="auto | none | all | 0,1 ...")
@click.option("--no-generations", is_flag=True, help="Skip the side-by-side greedy generations.")
@click.option("--tasks", help="Instead: lm-evaluation-harness tasks, comma-separated: task names (gsm8k,mmlu) "
              "or task YAML files/folders; recovery per task goes to CKPT/tasks.json and the model card.")
@click.option("--limit", type=click.IntRange(min=1), help="--tasks: documents per task [default: all].")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="--tasks: few-shot examples [default: the task's].")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="--tasks: lm-eval's batch.")
@click.option("--dry-run", is_flag=True, help="--tasks: say what would be pulled, fetched and run; change nothing.")
@spec_option("trust_remote_code")
@click.option("--json", "json_mode", is_flag=True, help=JSON_HELP)
def eval_(ckpt, reference, text, tokens, seq_len, json_out, image, gpus, no_generations, tasks, limit, num_fewshot,
          batch_size, dry_run, trust_remote_code, json_mode):
    """Measure what quantization cost: perplexity of both models, KL(original || quantized),
    top-1 agreement and greedy generations side by side, on held-out text. The quantized
    model is an exact emulation of what the engines compute, so no FP4 GPU is needed.

    With --tasks: accuracy on lm-evaluation-harness tasks instead, both models, and the
    recovery (quantized / original) with its standard error. lm-eval's wheels and the tasks'
    datasets are fetched on the host; the container runs without network or token."""
    from .quality.evaluation import EvalRequest, evaluate, summary_line
    from .records import runs

    if tasks is not None:
        from .quality.task_eval import TasksRequest, evaluate_tasks, summary_lines

        result = evaluate_tasks(TasksRequest(ckpt, tasks, reference, limit, num_fewshot, batch_size, json_out, image,
                                             gpus, dry_run=dry_run, trust_remote_code=bool(trust_remote_code)), console)
        if result.get("dry_run"):
            if json_mode:
                print_json(result)
            return
        for line in summary_lines(result):
            console.print(line, highlight=False)
        if json_mode:
            print_json(runs.load(result["run_id"]).read_result())
        return
    if dry_run or limit is not None or num_fewshot is not None:
        raise ConfigError("--dry-run, --limit and --num-fewshot go with --tasks", where="launcher eval",
                          advice="add --tasks, or drop them")

    result = evaluate(EvalRequest(ckpt, reference, text, tokens, seq_len, json_out, image, gpus,
                                  generations=not no_generations, trust_remote_code=bool(trust_remote_code)), console)
    console.print(summary_line(result), highlight=False)
    if json_mode:
        print_json(runs.load(result["run_id"]).read_result())


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
    from .records.rollback import run_rollback

    run_rollback(run_id, all_runs=all_runs, outputs=outputs, images=images, cache=cache, dry_run=dry_run,
                 yes=yes, console=console)


@main.command("list")
@click.option("--all", "show_all", is_flag=True, help="Every run, not only the latest 100.")
def list_(show_all):
    """The runs of this home, oldest first (runs whose launcher died are marked interrupted)."""
    from .records.run_views import print_runs

    print_runs(console, stdout, show_all=show_all)


@main.command()
@click.argument("run_id")
def status(run_id):
    """One run: its record, what it created (and whether that still exists), its files."""
    from .records.run_views import print_status

    print_status(run_id, console, stdout)


@main.command()
@click.argument("run_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing while the run is going.")
def logs(run_id, follow):
    """Print the run's log (the payload's output); --follow tails it until the run ends."""
    from .records.run_views import print_log

    print_log(run_id, follow, console)


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
@spec_option("trust_remote_code")
def serve(output, port, image, timeout, api_key, trust_remote_code):
    """Serve the checkpoint OUTPUT (OpenAI-compatible, http://127.0.0.1:PORT/v1) in a detached
    container, check it with one chat request, and leave it running; stop it with
    `launcher rollback RUN_ID`."""
    from .serve import ServeRequest
    from .serve import serve as run_serve

    run_serve(ServeRequest(output, port=port, image=image, timeout=timeout, api_key=api_key,
                           trust_remote_code=bool(trust_remote_code)), console)


@main.command()
@click.argument("out_html", type=click.Path(path_type=Path))
@click.argument("evals", nargs=-1, required=True)
def report(out_html, evals):
    """One self-contained HTML page comparing candidates: EVAL.json[:NAME] files written by
    `launcher eval` (KL and perplexity table, per-layer error, KL distribution, size and memory)."""
    from .quality.report import build_report, candidate

    missing = [e for e in evals if not Path(e).exists() and not Path(e.rsplit(":", 1)[0]).exists()]
    if missing:
        raise ConfigError(f"evaluation file not found: {missing[0]}", where="EVALS",
                          advice="pass JSON files written by `launcher eval --json`")
    click.echo(str(build_report([candidate(e) for e in evals], out_html)))


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
    from .containers.derived_image import prepare

    click.echo(prepare(image_ref, console, dry_run=dry_run))
