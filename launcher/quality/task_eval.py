"""`launcher eval --tasks`: accuracy on lm-evaluation-harness tasks, quantized against the original.

The payload (container_payload/tasks.py) runs lm-eval in the same image, without network and
without a token: lm-eval's wheels come from the host (lm_eval_wheels.py), a local task file's
folder and the user's Hugging Face cache (where the real tasks' datasets are) are mounted
read-only, and the container runs with HF offline. lm-eval is installed by the image's first run into a
folder beside the wheels, which later runs mount read-only. The result, per task and metric, is both
scores with lm-eval's standard errors and the recovery (quantized / original); it goes to
--json-out (default CKPT/tasks.json) and into the checkpoint's model card, beside the KL.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from docker.errors import ImageNotFound
from rich.console import Console

from container_payload.core.contract import TasksJob

from ..common import paths
from ..common.errors import ConfigError
from ..common.output import MAX_RESULT_BYTES, markup, run_result
from ..common.output import console as stderr_console
from ..common.untrusted import read_json_object
from ..containers.container import Bind, PayloadRun, run_payload
from ..containers.image_probe import probe
from ..containers.session import DockerSession
from ..sources import model_source
from . import lm_eval_wheels, model_card
from .evaluation import _publish, check_json_out, checkpoint_and_reference

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")   # lm-eval's task, group and tag names
TASK_FILE_SUFFIXES = (".yaml", ".yml")


@dataclass
class TasksRequest:
    checkpoint: Path
    tasks: str                          # comma list: lm-eval task names, task YAML files or folders
    reference: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 1
    json_out: Path | None = None
    image: str = "auto"
    gpus: str = "auto"
    dry_run: bool = False
    trust_remote_code: bool = False


@dataclass
class TaskArg:
    text: str                           # as given
    folder: Path | None = None          # a local task's folder (mounted read-only)
    file: str | None = None             # a local task file's name in that folder


def parse_tasks(tasks: str) -> list[TaskArg]:
    """--tasks: each item an lm-eval name, or a task YAML file or folder of the host."""
    items = [t.strip() for t in tasks.split(",") if t.strip()]
    if not items:
        raise ConfigError("no task given", where="--tasks", advice="e.g. --tasks gsm8k,mmlu or --tasks my_task.yaml")
    out = []
    for t in items:
        path = Path(t).expanduser()
        if "/" not in t and not t.endswith(TASK_FILE_SUFFIXES) and not path.exists():
            if not TASK_NAME.fullmatch(t):
                raise ConfigError(f"not a task name: {t!r}", where="--tasks",
                                  advice="lm-eval task names are letters, digits, _ . -; or give a task file")
            out.append(TaskArg(t))
            continue
        try:
            mode = os.stat(path).st_mode   # follows a link: the user's own
        except OSError:
            raise ConfigError(f"task file not found: {path}", where="--tasks",
                              advice="give an existing .yaml file or folder, or an lm-eval task name") from None
        if stat.S_ISDIR(mode):
            out.append(TaskArg(t, path.resolve()))
        elif stat.S_ISREG(mode) and path.name.endswith(TASK_FILE_SUFFIXES):
            real = path.resolve()
            out.append(TaskArg(t, real.parent, real.name))
        else:
            raise ConfigError(f"task file is not a regular .yaml file: {path}", where="--tasks",
                              advice="give lm-eval's task YAML (or its folder)")
    return out


def evaluate_tasks(req: TasksRequest, console: Console | None = None) -> dict:
    console = console or stderr_console
    tasks = parse_tasks(req.tasks)  # a bad --tasks first: one line before anything is read
    ckpt, reference, ref_spec = checkpoint_and_reference(req.checkpoint, req.reference, req.trust_remote_code)
    json_out = check_json_out(req.json_out or ckpt / "tasks.json")

    docker = DockerSession.open(console)
    client, nvidia = docker.client, docker.nvidia
    image = docker.image_ref(req.image)
    if req.dry_run:
        return _dry_run(client, image, ckpt, reference, tasks, json_out, console)
    ref = model_source.resolve(ref_spec)
    model_source.check_remote_code(ref.host_dir, req.trust_remote_code, reference)
    rec = docker.start_run("eval-tasks", {"checkpoint": str(ckpt), "reference": reference, "tasks": req.tasks,
                                          "limit": req.limit, "num_fewshot": req.num_fewshot}, image)
    with rec.ends_on_error():
        docker.ensure_image(rec, image)
        wheels = lm_eval_wheels.fetch(probe(client, image, rec.id), console, record=lambda path: rec.add("cache", path))
        out_dir = rec.folder / "tasksout"
        out_dir.mkdir()
        site, installed = lm_eval_wheels.site_for(wheels)
        binds = [Bind(ckpt, "/ckpt"), Bind(wheels, "/wheels"), Bind(out_dir, "/tasksout", read_only=False),
                 Bind(site, "/lm-eval-site", read_only=installed)] + [b for b in ref.binds if b.target != "/assets"]
        names = []
        for i, t in enumerate(tasks):
            if t.folder is None:
                names.append(t.text)
                continue
            binds.append(Bind(t.folder, f"/tasks/{i}"))
            names.append(f"/tasks/{i}/{t.file}" if t.file else f"/tasks/{i}")
        hub = paths.hf_hub_cache()
        env = {"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": "/tmp/hf-datasets", "TOKENIZERS_PARALLELISM": "false"}
        if hub.is_dir() and not _holds_token(hub):
            binds.append(Bind(hub, "/hf-hub"))   # the real tasks' datasets, fetched on the host
            env["HF_HUB_CACHE"] = "/hf-hub"
        job = TasksJob(checkpoint="/ckpt", reference=ref.container_dir, tasks=names, wheels="/wheels",
                       site="/lm-eval-site", json_out=f"/tasksout/{json_out.name}",
                       lm_eval_version=lm_eval_wheels.LM_EVAL_VERSION, limit=req.limit, num_fewshot=req.num_fewshot,
                       batch_size=req.batch_size, device="cpu" if req.gpus == "none" or not nvidia else "auto",
                       trust_remote_code=req.trust_remote_code)
        try:
            run_payload(PayloadRun(client=client, image=image, record=rec, module="tasks", job=job, binds=binds,
                                   gpus=req.gpus, nvidia=nvidia, env=env), console)
        finally:
            if not installed:   # ~0.5 GB: kept for the image's next runs once complete, else removed
                lm_eval_wheels.keep_site(site, wheels)
        result = _publish(out_dir / json_out.name, json_out)
    rec.result = {"tasks": result.get("tasks")}
    rec.finish("complete")
    rec.write_result(run_result(rec, evaluation=None, extra={"output": str(json_out), "run_id": rec.id,
                                                            "tasks": result.get("tasks"),
                                                            "timings": result.get("timings")}))
    card = update_card(ckpt, result)
    if card:
        console.print(markup("model card: {}", card), highlight=False)
    result["run_id"] = rec.id
    return result


def _holds_token(folder: Path) -> bool:
    """Whether the hub's token file lies under `folder` (an HF_HUB_CACHE set to HF_HOME): never mounted."""
    from huggingface_hub import constants

    token = Path(constants.HF_TOKEN_PATH).expanduser().resolve()
    return token.is_relative_to(folder.resolve())


def update_card(ckpt: Path, tasks: dict) -> Path | None:
    """The checkpoint's model card again, with the recovery table beside the KL: only for a
    checkpoint this tool made (its result.json says so), never someone else's README."""
    made = read_json_object(ckpt / "result.json", MAX_RESULT_BYTES) or {}
    if not made.get("recipe"):
        return None
    evaluation = read_json_object(ckpt / "eval.json", MAX_RESULT_BYTES)
    if evaluation is not None and not all(isinstance(evaluation.get(k), (int, float)) for k in
                                          ("perplexity", "reference_perplexity", "kl_divergence", "top1_agreement")):
        evaluation = None   # not the quick check's file: the card says nothing about KL rather than wrong
    return model_card.write(ckpt, evaluation, None, tasks=tasks)


def _dry_run(client, image: str, ckpt: Path, reference: str, tasks: list[TaskArg], json_out: Path,
             console: Console) -> dict:
    """What a run would do; no run record, nothing fetched or written (as quantize --dry-run)."""
    try:
        client.images.get(image)
        have = lm_eval_wheels.ready(probe(client, image))
        wheels = f"reuse {have}" if have else f"fetch lm-eval {lm_eval_wheels.LM_EVAL_VERSION}'s wheels on the host"
    except ImageNotFound:
        wheels = f"pull {image}, then fetch lm-eval {lm_eval_wheels.LM_EVAL_VERSION}'s wheels for it on the host"
    console.print(markup("would {}; run lm-eval on {} and {} (reference) in {} without network, tasks: {}; "
                         "write {}", wheels, ckpt, reference, image, ", ".join(t.text for t in tasks), json_out),
                  highlight=False)
    return {"command": "eval", "status": "dry-run", "exit_code": 0, "dry_run": True, "image": image,
            "lm_eval_wheels": wheels, "tasks": [t.text for t in tasks], "output": str(json_out)}


def summary_lines(result: dict) -> list[str]:
    lines = []
    for task, rows in (result.get("tasks") or {}).items():
        for name, row in rows.items():
            if row.get("recovery") is None:
                continue
            lines.append(f"{task} {name}: {row['quantized']:.4f} vs {row['reference']:.4f} original, recovery "
                         f"{100 * row['recovery']:.1f}%" + (f" ± {100 * row['recovery_stderr']:.1f}"
                                                            if row.get("recovery_stderr") is not None else ""))
    return lines
