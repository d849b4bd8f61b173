"""A quantize job from spec to finished folder: the one place that sequences the pieces.

    preflight -> model (host) -> image -> lock -> payload container -> verify -> promote -> eval

The payload writes into a hidden partial folder beside the output; only a verified,
complete checkpoint is renamed into place, so a folder at --output is always whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from container_payload import recipes

from . import assets, derived_image, model_source, paths, preflight, runs
from .config import JobSpec
from .container import Bind, PayloadRun, run_payload
from .daemon import connect, has_nvidia_runtime
from .errors import ConfigError, LauncherError
from .image import ImageStore, choose_image
from .locks import OutputLock, lock_path
from .orphans import guard, reap


@dataclass
class JobOutcome:
    run: runs.RunRecord
    output: Path
    reused: bool = False


def job_fingerprint(spec: JobSpec) -> str:
    """What makes two runs produce the same checkpoint (not where it goes)."""
    keys = spec.model_dump(mode="json", include={"model", "revision", "format", "recipe", "calibration", "kv_cache"})
    recipe_file = recipe_path(spec)
    if recipe_file is not None:  # a YAML recipe of the user's: what it says, not where it lies
        keys["recipe"] = hashlib.sha256(recipe_file.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def recipe_path(spec: JobSpec) -> Path | None:
    """The user's ModelOpt YAML recipe file, when --recipe names one (the spec checked it exists)."""
    if spec.recipe.endswith(recipes.YAML_SUFFIXES):
        return Path(spec.recipe).expanduser().resolve()
    return None


def recipe_bind(spec: JobSpec) -> tuple[str, list[Bind]]:
    """The recipe as the payload sees it: a name, or the YAML file mounted read-only."""
    path = recipe_path(spec)
    if path is None:
        return spec.recipe, []
    return f"/recipe/{path.name}", [Bind(path, f"/recipe/{path.name}")]


def calibration_bind(spec: JobSpec) -> tuple[str, list[Bind]]:
    src = spec.calibration.source
    if src == "builtin":
        text = assets.texts().calibration
        return f"/calib/{text.name}", [Bind(text, f"/calib/{text.name}")]
    if src.startswith("hf:"):
        return src, []
    path = Path(src).expanduser()
    if not path.is_file():
        raise ConfigError(f"calibration file not found: {path}", where="--calib",
                          advice="pass an existing .txt or .jsonl file, or `builtin`")
    return f"/calib/{path.name}", [Bind(path.resolve(), f"/calib/{path.name}")]


def completed_output(output: Path, fingerprint: str) -> bool:
    try:
        result = json.loads((output / "result.json").read_text())
    except (OSError, ValueError):
        return False
    return result.get("status") == "complete" and result.get("job_fingerprint") == fingerprint


def _secrets(spec: JobSpec) -> list[str]:
    """Values to scrub from every log line: the HF token wherever it comes from, the NGC key."""
    return [v for v in (model_source.token_from(spec.hf_token_env), os.environ.get(spec.ngc_key_env)) if v]


class QuantizeJob:
    def __init__(self, spec: JobSpec, console: Console | None = None, *, dry_run: bool = False):
        self.spec = spec
        self.console = console or Console(stderr=True)
        self.dry_run = dry_run
        self.device_kind = "cpu"

    def run(self) -> JobOutcome:
        spec = self.spec
        output = Path(spec.output).expanduser().resolve()
        fingerprint = job_fingerprint(spec)
        client = connect()
        reap(client, self.console)
        nvidia = has_nvidia_runtime(client)
        self.device_kind = "gpu" if nvidia and spec.gpus != "none" else "cpu"
        image_ref = choose_image(spec.image, nvidia)

        rec = runs.new_run("quantize", spec.model_dump(mode="json"))
        rec.image = image_ref
        rec.output = str(output)
        rec.save()
        guard(rec)  # removes the container at once if this launcher is killed
        self.console.print(f"run [bold]{rec.id}[/] -> {output}")
        with rec.ends_on_error():
            if completed_output(output, fingerprint):
                self.console.print(f"[green]{output} is already a complete checkpoint of this job; reusing it[/]")
                rec.finish("complete")
                return JobOutcome(rec, output, reused=True)
            if output.exists() and any(output.iterdir()):
                raise ConfigError(f"output folder exists and is not a finished run of this job: {output}",
                                  where="--output", advice="choose another --output, or remove the folder")
            store = ImageStore(client, self.console)
            # An image already here is probed (and derived, if it falls short) before the
            # model download: a 16 GB download must not precede a one-line "cannot run".
            runnable = self._runnable_image(client, rec, image_ref) if store.get(image_ref) else None
            model = model_source.resolve(spec, dry_run=self.dry_run)
            preflight.enforce(preflight.quantize_checks(
                model_bytes=model.bytes, output=output, download_bytes=0,
                cache_dir=paths.hf_hub_cache(), on_gpu=self.device_kind == "gpu"))
            for c in [] if self.dry_run else model.created_cache:  # a dry run creates nothing
                rec.add("cache", c)
            image = store.ensure(image_ref, ngc_key_env=spec.ngc_key_env, dry_run=self.dry_run)
            if image.pulled and not self.dry_run:  # "would pull" is not a pull
                rec.add("images", image_ref)
            if runnable is None and image.id:
                runnable = self._runnable_image(client, rec, image_ref)
            if self.dry_run:
                rec.finish("complete")
                return JobOutcome(rec, output)
            rec.image = runnable
            rec.save()
            rec.add("locks", str(lock_path(output)))  # a kill -9 leaves it; rollback checks it is ours
            with OutputLock(output, rec.id):
                self._quantize(client, rec, model, runnable, output, fingerprint, nvidia)
            rec.result = json.loads((output / "result.json").read_text())
            rec.finish("complete")
        # the real bf16 size where the folder exists (the embedded estimate is from its GGUF)
        self.describe(output, runnable, model_source.weight_bytes(model.host_dir) or model.bytes)
        return JobOutcome(rec, output)

    def _runnable_image(self, client, rec: runs.RunRecord, image_ref: str) -> str:
        """`image_ref`, or the image derived from it when its packages fall short of the job."""
        spec = self.spec
        needs = recipes.needs_for(spec.recipe, spec.format.value, spec.kv_cache,
                                  embedded=spec.is_embedded and model_source.embedded_needs_conversion())
        return derived_image.runnable(client, image_ref, needs, cuda=self.device_kind == "gpu", rec=rec,
                                      console=self.console, upgrade=spec.image_upgrade, offline=spec.offline,
                                      dry_run=self.dry_run)

    def describe(self, output: Path, image_ref: str, source_bytes: int) -> None:
        """Quick quality check and model card. The checkpoint is already complete:
        a failure here is reported, never turned into a failed run."""
        from . import model_card
        from .evaluation import QUICK_TOKENS, EvalRequest, evaluate, summary_line

        evaluation = None
        if self.spec.evaluate:
            try:
                evaluation = evaluate(EvalRequest(output, reference=self.spec.model, tokens=QUICK_TOKENS[self.device_kind],
                                                  image=image_ref, gpus=self.spec.gpus), self.console)
                self.console.print(f"quality: {summary_line(evaluation)}", highlight=False)
            except LauncherError as e:
                self.console.print(f"[yellow]warning:[/] evaluation failed, the checkpoint is fine: {e}")
        card = model_card.write(output, evaluation, source_bytes or None)
        self.console.print(f"model card: {card}")

    def _quantize(self, client, rec: runs.RunRecord, model, image_ref: str, output: Path, fingerprint: str,
                  nvidia: bool) -> None:
        spec = self.spec
        clean_stale_partials(output, self.console)
        partial = output.parent / f".{output.name}.partial-{rec.id}"
        partial.mkdir(parents=True)
        rec.add("partials", str(partial))

        calib_src, calib_binds = calibration_bind(spec)
        recipe, recipe_binds = recipe_bind(spec)
        job = {
            "model_dir": model.container_dir, "gguf": model.gguf, "output_dir": "/out",
            "format": spec.format.value, "recipe": recipe, "kv_cache": spec.kv_cache,
            "calibration": {**spec.calibration.model_dump(), "source": calib_src},
            "device": "auto" if self.device_kind == "gpu" else "cpu",
            "low_memory": spec.low_memory, "job_fingerprint": fingerprint, "run_id": rec.id,
        }
        env = {}
        network = "none"  # the payload needs no network unless it streams a hub dataset
        if calib_src.startswith("hf:"):
            network = None
            token = model_source.token_from(spec.hf_token_env)
            if token:
                env["HF_TOKEN"] = token
            env["HF_HUB_OFFLINE"] = "0"
        run_payload(PayloadRun(
            client=client, image=image_ref, record=rec, module="quantize", job=job,
            binds=model.binds + calib_binds + recipe_binds + [Bind(partial, "/out", read_only=False)],
            gpus=spec.gpus, nvidia=nvidia, env=env, network=network, mem_limit=spec.memory_limit,
            keep=spec.keep_container, secrets=tuple(_secrets(spec))), self.console)

        result_path = partial / "result.json"
        if not result_path.exists():
            raise LauncherError("the payload exited cleanly but wrote no result.json", where=str(partial))
        result = json.loads(result_path.read_text())
        result["job_fingerprint"] = fingerprint
        result["run_id"] = rec.id
        result["source"] = {"model": spec.model, "revision": spec.revision}
        result_path.write_text(json.dumps(result, indent=2))

        verify_or_raise(partial, self.console)
        os.replace(partial, output)
        rec.created.partials.remove(str(partial))
        rec.add("outputs", str(output))
        self.console.print(f"[green]checkpoint complete:[/] {output} "
                           f"({result.get('checkpoint_bytes', 0) / 1e6:.1f} MB)")


def verify_or_raise(folder: Path, console: Console) -> None:
    """The independent host-side check; a checkpoint that fails it is never promoted."""
    from .verify import _summary, verify_checkpoint

    report = verify_checkpoint(folder)
    if report.problems:
        from .errors import VerifyFailed
        for p in report.problems:
            console.print(f"[red]verify[/] {p}")
        raise VerifyFailed(f"the new checkpoint failed verification ({len(report.problems)} problems)",
                           where=str(folder), advice="this is a bug in the recipe or export; please report it")
    console.print(f"verify: ok ({_summary(report)})", highlight=False)


def clean_stale_partials(output: Path, console: Console) -> None:
    """Partial folders of runs that died are ours (their records say so): remove them."""
    for rec in runs.all_runs():
        if rec.status == "running":
            continue
        for p in list(rec.created.partials):
            path = Path(p)
            if path.parent == output.parent and path.name.startswith(f".{output.name}.partial-"):
                shutil.rmtree(path, ignore_errors=True)
                if path.exists():  # keep it in the record: rollback reports why it cannot go
                    continue
                rec.created.partials.remove(p)
                rec.save()
                console.print(f"removed the partial output of interrupted run {rec.id}")

