"""Accuracy on lm-evaluation-harness tasks, quantized against the original, as users read it.

    python3 -m container_payload tasks JOB.json

The job is a contract.TasksJob. lm-evaluation-harness is not in NVIDIA's images: the launcher
fetched its wheels on the host (resolved against this image's own packages) and mounts them
read-only; they are installed here, without network (pip --no-index), only those the image
lacks, into the job's `site` folder (a host folder: Docker's tmpfs is noexec, and pandas' and
pyarrow's libraries must be mapped executable; the launcher keeps it for the image's later
runs), after the image's own packages on sys.path.

Both models run through lm-eval's own HF model class (HFLM) given the model object: the
reference in float32, the checkpoint as the engines compute it (emulated_model.py, float32),
so the numbers are what `lm_eval.simple_evaluate` gives on the same models. Recovery per
metric = quantized / reference, its standard error by the delta method from lm-eval's own
standard errors (treated as independent: an upper bound when the two are correlated).

Stages: install -> tasks -> reference -> quantized -> write json_out.
"""
import math
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from .core import events
from .core.contract import DONE, TasksJob
from .core.events import PayloadError

SITE_MARKER = "COMPLETE"   # written last into `site`: a later run mounts it read-only and skips pip


def install_lm_eval(wheels: Path, site: Path, version: str) -> str:
    """lm-eval from the mounted wheels, beside (never over) the image's packages; a site folder
    installed by an earlier run of this image (its marker present) is used as it is."""
    if not (site / SITE_MARKER).is_file():
        events.stage("install", detail=f"lm-eval {version} from {wheels}")
        if not any(wheels.glob("lm_eval-*.whl")):
            raise PayloadError(f"no lm-eval wheel in {wheels}", kind="input")
        have = {_dist_key(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
        todo = [str(w) for w in sorted(wheels.glob("*.whl")) if _dist_key(w.name.split("-")[0]) not in have]
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                               "--disable-pip-version-check", "--no-compile", "--target", str(site), *todo],
                              capture_output=True, text=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
        if proc.returncode != 0:
            last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["?"]
            raise PayloadError(f"could not install lm-eval from {wheels}: {last[0][:300]}", kind="image")
    sys.path.append(str(site))   # after the image's own site-packages: theirs win
    import lm_eval

    if getattr(lm_eval, "__version__", version) != version:
        raise PayloadError(f"the wheels hold lm-eval {lm_eval.__version__}, not {version}", kind="input")
    if not (site / SITE_MARKER).is_file():
        (site / SITE_MARKER).write_text(f"lm-eval=={version}\n")
    return lm_eval.__version__


def _dist_key(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def task_specs(tasks: list[str]):
    """Task names for lm-eval, and the task manager that knows the local ones. A local task file's
    relative data_files are read against its own folder (lm-eval reads them against the working
    directory, which is nobody's here)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader (pinned version)

    events.stage("tasks", detail=", ".join(tasks))
    folders, specs = [], []
    for t in tasks:
        path = Path(t)
        if not path.is_absolute():
            specs.append(t)
        elif path.is_dir():
            folders.append(str(path))
        else:
            folders.append(str(path.parent))
            try:
                config = load_yaml(path)
            except Exception as e:  # noqa: BLE001 - yaml.YAMLError, ValueError, OSError, a !function import: the file is wrong
                raise PayloadError(f"task file {path.name}: {str(e).splitlines()[0][:200]}", kind="input") from None
            if not isinstance(config, dict) or not isinstance(config.get("task"), str):
                raise PayloadError(f"{path.name} is not an lm-eval task file (no `task:` name)", kind="input")
            specs.append(_local_data(config, path.parent))
    # lm-eval's ~10k built-in task files are indexed only when a task is named (about 30 s on 2 cores)
    manager = TaskManager(include_path=folders or None, include_defaults=any(not Path(t).is_absolute() for t in tasks))
    for d in (p for p in tasks if Path(p).is_dir()):   # a folder: every task it defines
        specs += sorted(n for n, e in manager.task_index.items() if str(getattr(e, "yaml_path", "")).startswith(d))
    unknown = [s for s in specs if isinstance(s, str) and s not in manager.all_tasks]
    if unknown:
        raise PayloadError(f"unknown task {unknown[0]!r} for lm-eval (see `lm-eval ls tasks`)", kind="input")
    return specs, manager


def _local_data(config: dict, folder: Path) -> dict:
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if isinstance(files, str):
        kwargs["data_files"] = str(folder / files)
    elif isinstance(files, dict):
        kwargs["data_files"] = {k: str(folder / v) if isinstance(v, str) else [str(folder / x) for x in v]
                                for k, v in files.items()}
    return {**config, "dataset_kwargs": kwargs} if files is not None else config


def evaluate_model(model, tokenizer, specs, manager, job: TasksJob, device: str) -> tuple[dict, dict]:
    """lm-eval's simple_evaluate on `model` (an object, not a name): its results per task, and per
    document the filtered responses (the loglikelihoods of the choices, or the answer generated)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=job.batch_size, device=device)
    try:
        out = simple_evaluate(model=lm, tasks=list(specs), task_manager=manager, num_fewshot=job.num_fewshot,
                              limit=job.limit, log_samples=True, bootstrap_iters=job.bootstrap_iters)
    except (ConnectionError, OSError) as e:   # a hub dataset that is not in the mounted cache
        raise PayloadError(f"a task's dataset is not available offline ({str(e).splitlines()[0][:200]}); "
                           "fetch it on the host first", kind="input") from None
    samples = {task: [{"doc_id": d.get("doc_id"), "filtered_resps": d.get("filtered_resps")} for d in docs]
               for task, docs in (out.get("samples") or {}).items()}
    return out["results"], samples


def recovery(ref: dict, quant: dict) -> dict:
    """Per task and metric: both values, their stderrs, and quantized / reference with its stderr."""
    table = {}
    for task, metrics in ref.items():
        rows = {}
        for key, r in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(r, (int, float)):
                continue   # lm-eval's keys are "metric,filter"; sample_len and alias are not metrics
            q = quant.get(task, {}).get(key)
            name, _, filt = key.partition(",")
            se_r = _num(metrics.get(f"{name}_stderr,{filt}"))
            se_q = _num(quant.get(task, {}).get(f"{name}_stderr,{filt}"))
            row = {"metric": name, "filter": filt, "reference": r, "quantized": q,
                   "reference_stderr": se_r, "quantized_stderr": se_q, "recovery": None, "recovery_stderr": None}
            if isinstance(q, (int, float)) and r:
                row["recovery"] = q / r
                if se_r is not None and se_q is not None:
                    rel = (se_q / q) ** 2 if q else 0.0
                    row["recovery_stderr"] = abs(q / r) * math.sqrt(rel + (se_r / r) ** 2)
            rows[name] = row
        table[task] = rows
    return table


def _num(x):
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def run(job: TasksJob) -> dict:
    import torch
    from transformers import AutoTokenizer

    from .evaluate import model_folders, write_json
    from .numerics.emulated_model import load_any, load_reference
    from .quantize import pick_device

    timings = {}
    t0 = time.time()
    checkpoint, reference = model_folders(job)
    version = install_lm_eval(Path(job.wheels), Path(job.site), job.lm_eval_version)
    timings["install_s"] = round(time.time() - t0, 3)
    specs, manager = task_specs(list(job.tasks))
    device = pick_device(job.device)
    tokenizer = AutoTokenizer.from_pretrained(reference, trust_remote_code=job.trust_remote_code)

    results, samples, info = {}, {}, {}
    for side, path in (("reference", reference), ("quantized", checkpoint)):
        t = time.time()
        events.stage(side, detail=str(path))
        if side == "reference":
            model, info[side] = load_reference(path, device, trust_remote_code=job.trust_remote_code)
        else:
            model, info[side] = load_any(path, device, trust_remote_code=job.trust_remote_code)
        results[side], samples[side] = evaluate_model(model, tokenizer, specs, manager, job, device)
        del model
        timings[f"{side}_s"] = round(time.time() - t, 3)
    timings["total_s"] = round(time.time() - t0, 3)

    import transformers

    result = {
        "tasks": recovery(results["reference"], results["quantized"]),
        "lm_eval_results": results,
        "samples": samples,
        "task_args": {"tasks": list(job.tasks), "limit": job.limit, "num_fewshot": job.num_fewshot,
                      "batch_size": job.batch_size},
        "checkpoint": str(checkpoint), "reference": str(reference), "format": info.get("quantized"),
        "device": device, "compute_dtype": "float32", "timings": timings,
        "versions": {"lm_eval": version, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
    }
    out = Path(job.json_out)
    write_json(out, result)
    events.emit(DONE, result=str(out), timings=timings)
    return result


if __name__ == "__main__":
    sys.exit(events.run_command(["tasks", *sys.argv[1:]]))
