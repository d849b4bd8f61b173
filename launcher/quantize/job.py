"""A quantize job from spec to finished folder: the one place that sequences the pieces.

    inputs (no Docker) -> Docker -> record -> lock -> reuse? (reuse.py) -> preflight (incl. download)
    -> model and calibration data (host, recorded as they start) -> image -> payload
    container -> verify -> promote -> eval

Everything that can be checked without Docker or the network is checked first, so a
typo never costs a pull. The output lock is taken before the output is looked at, so
two runs on one output cannot both decide to write it.

The payload writes into a hidden partial folder beside the output; only a verified,
complete checkpoint is renamed into place, so a folder at --output is always whole.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from container_payload.core import contract, recipes

from ..common import files, paths
from ..common.config import JobSpec
from ..common.errors import ConfigError, Interrupted, LauncherError, PayloadFailed, VerifyFailed
from ..common.output import MAX_RESULT_BYTES, markup, run_result
from ..common.output import console as stderr_console
from ..common.untrusted import parse, read_capped
from ..containers import derived_image
from ..containers.container import Bind, PayloadRun, check_gpus, run_payload
from ..containers.session import DockerSession
from ..quality import model_card
from ..quality.evaluation import QUICK_TOKENS, EvalRequest, evaluate, summary_line
from ..records import runs
from ..records.destination import check_output, partial_path, replaced_path
from ..records.locks import OutputLock, lock_path
from ..records.rollback import recorded_path_ok
from ..sources import assets, model_source
from ..verify import MAX_PRINTED, summary, verify_checkpoint
from . import memory_budget, preflight, reuse
from .job_inputs import fingerprint, job_inputs, model_identity


@dataclass
class JobOutcome:
    run: runs.RunRecord
    output: Path
    reused: bool = False
    evaluation: dict | None = None   # the quick quality check (launcher eval's JSON), when it ran
    result: dict | None = None       # the run's result.json (what --json prints)


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


def check_calibration(spec: JobSpec) -> None:
    """The calibration input, checked before Docker and the network."""
    src = spec.calibration.source
    if src.startswith("hf:"):
        model_source.parse_hf_source(src)
    elif src != "builtin" and not Path(src).expanduser().is_file():
        raise ConfigError(f"calibration file not found: {Path(src).expanduser()}", where="--calib",
                          advice="pass an existing .txt or .jsonl file, or `builtin`")


def calibration_bind(spec: JobSpec, on_create=None) -> tuple[str, list[Bind]]:
    """What the payload reads, mounted read-only. A hub dataset is fetched here, on the
    host, with the token: the container gets files, never the token or the network."""
    src = spec.calibration.source
    if src == "builtin":
        text = assets.calibration_text()
        return f"/calib/{text.name}", [Bind(text, f"/calib/{text.name}")]
    if src.startswith("hf:"):
        data = model_source.fetch_dataset(src, spec.hf_token_env, model_source.is_offline(spec), on_create)
        return data.source, [data.bind]
    check_calibration(spec)
    path = Path(src).expanduser()
    return f"/calib/{path.name}", [Bind(path.resolve(), f"/calib/{path.name}")]




def _secrets(spec: JobSpec) -> list[str]:
    """Values to scrub from every log line: the HF token wherever it comes from, the NGC key."""
    return [v for v in (model_source.token_from(spec.hf_token_env), os.environ.get(spec.ngc_key_env)) if v]


def quantize_job(spec: JobSpec, plan: memory_budget.Plan, model, calib_src: str, recipe: str, device_kind: str,
                 job_fingerprint: str, run_id: str) -> contract.QuantizeJob:
    """The payload's job: the spec, with the host's plan (its mode and calibration batch) as what
    the payload runs, not the spec's "auto" for the payload to decide again."""
    return contract.QuantizeJob(
        model_dir=model.container_dir, gguf=model.gguf, output_dir="/out",
        format=spec.format.value, recipe=recipe, recipe_params=spec.recipe_params, kv_cache=spec.kv_cache,
        calibration=contract.Calibration(**{**spec.calibration.model_dump(), "source": calib_src,
                                            "batch_size": plan.batch}),
        device="auto" if device_kind == "gpu" else "cpu", low_memory=spec.low_memory,
        mode=plan.mode, memory_budget=plan.budget, trust_remote_code=spec.trust_remote_code,
        job_fingerprint=job_fingerprint, run_id=run_id)


class QuantizeRun:
    """One `launcher quantize`, host side: checks, image, model, the payload container, the output."""
    def __init__(self, spec: JobSpec, console: Console | None = None, *, dry_run: bool = False):
        self.spec = spec
        self.console = console or stderr_console
        self.dry_run = dry_run
        self.device_kind = "cpu"
        self.model = None
        self.runnable = None  # the image the payload ran in: the user's, or its derived image
        self.plan = None      # memory_budget.Plan: whole or streamed, and the budget
        self.inputs = None    # job_inputs.job_inputs: what the job reads, by content
        self.previous = None  # reuse.Previous: what lay at the output, and what we do with it

    def run(self) -> JobOutcome:
        spec = self.spec
        # 1. everything that needs neither Docker nor the network
        output = check_output(spec.output, model_folder=Path(spec.model).expanduser() if spec.is_local else None)
        model_source.validate(spec)
        check_calibration(spec)
        docker = DockerSession.open(self.console)
        nvidia = docker.nvidia
        check_gpus(spec.gpus, nvidia)  # what the container's start would say, before any download
        self.device_kind = "gpu" if nvidia and spec.gpus != "none" else "cpu"
        image_ref = docker.image_ref(spec.image)
        rec = docker.start_run("quantize", spec.model_dump(mode="json"), image_ref, str(output))
        self.console.print(markup("run [bold]{}[/] -> {}", rec.id, output), highlight=False)
        try:
            return self._run_recorded(docker, rec, output, image_ref)
        finally:
            # A dry run changes nothing and leaves no record (thousands of them made `list` slow);
            # its record existed while it ran, so a kill -9 still gets its probe container reaped.
            if self.dry_run:
                rec.discard()

    def _run_recorded(self, docker: DockerSession, rec: runs.RunRecord, output: Path, image_ref: str) -> JobOutcome:
        with rec.ends_on_error():
            lock = None
            if not self.dry_run:  # 2. the lock first: the output is judged under it
                rec.add("locks", str(lock_path(output)))  # a kill -9 leaves it; rollback checks it is ours
                lock = OutputLock(output, rec.id).acquire()
            try:
                outcome = self._run_locked(docker, rec, output, image_ref)
            finally:
                if lock is not None:
                    lock.release()
        if outcome is None:  # quantized: the checkpoint is complete, whatever its description does
            # the real bf16 size where the folder exists (the embedded estimate is from its GGUF)
            source = model_source.weight_bytes(self.model.host_dir) or self.model.bytes
            outcome = JobOutcome(rec, output, evaluation=self.describe(output, self.runnable, source))
        why = self.previous.why if self.previous else None
        outcome.result = rec.write_result(run_result(rec, evaluation=outcome.evaluation, reused=outcome.reused,
                                                     extra={"dry_run": self.dry_run, "why_not_reused": why}))
        return outcome

    def _run_locked(self, docker: DockerSession, rec: runs.RunRecord, output: Path,
                    image_ref: str) -> JobOutcome | None:
        """Under the output lock: reuse, or preflight, fetch, pull and quantize. Returns the
        outcome when the job ends early (reused, dry run), None when it quantized."""
        spec = self.spec
        self.inputs = job_inputs(spec)  # by content: a hub model's commit is asked for here
        self.previous = previous = reuse.judge(output, self.inputs)
        if previous.action == "reuse":
            verify_or_raise(output, self.console, reused=True)  # damaged since? never handed out as done
            self.console.print(markup("[green]{} is already a complete checkpoint of this job; reusing it[/]", output))
            rec.result, evaluation = reuse.carried(previous)
            rec.finish("complete")
            return JobOutcome(rec, output, reused=True, evaluation=evaluation)
        if previous.why:
            self.console.print(markup("[yellow]not reusing[/] {}: {}; {}", output, previous.why,
                                      "a real run quantizes again" if self.dry_run else "quantizing again"),
                               highlight=False, soft_wrap=True)
        client, nvidia = docker.client, docker.nvidia
        model_bytes, to_download = model_source.download_bytes(spec)
        # whole or streamed, from the memory budget (the image's needs depend on it)
        self.plan = memory_budget.plan(spec, model_bytes, self.device_kind == "gpu")
        # An image already here is probed (and derived, if it falls short) before the
        # model download: a 16 GB download must not precede a one-line "cannot run".
        runnable = self._runnable_image(client, rec, image_ref) if docker.images.get(image_ref) else None
        # 3. preflight, including what the download will need, before downloading anything
        preflight.enforce(preflight.quantize_checks(
            model_bytes=model_bytes, output=output, download_bytes=to_download,
            cache_dir=paths.hf_hub_cache(), on_gpu=self.device_kind == "gpu", memory=self.plan.check))
        self.console.print(markup("memory: {}", self.plan.check.detail), highlight=False)
        slow = preflight.cpu_calibration_note(model_bytes, spec.calibration.samples * spec.calibration.seq_len,
                                              on_gpu=self.device_kind == "gpu")
        if slow:
            self.console.print(markup("[yellow]note:[/] {}", slow), highlight=False)
        # 4. downloads on the host, each recorded as it starts (a dry run creates nothing)
        record = None if self.dry_run else (lambda path: rec.add("cache", path))
        model = self.model = model_source.resolve(spec, dry_run=self.dry_run, on_create=record, access_checked=True)
        if not self.dry_run and not spec.is_embedded:
            model_source.check_remote_code(model.host_dir, spec.trust_remote_code, spec.model)
        calib = None
        if not self.dry_run or (spec.calibration.source.startswith("hf:") and model_source.is_offline(spec)):
            calib = calibration_bind(spec, on_create=record)  # offline it only looks in the cache: a dry run too
        image = docker.ensure_image(rec, image_ref, ngc_key_env=spec.ngc_key_env, dry_run=self.dry_run)
        if runnable is None and image.id:
            runnable = self._runnable_image(client, rec, image_ref)
        if self.dry_run:
            rec.finish("complete")
            return JobOutcome(rec, output)
        self.runnable = rec.image = runnable
        rec.save()
        self._quantize(client, rec, model, runnable, output, nvidia, calib)
        rec.result = json.loads((output / "result.json").read_text())
        rec.finish("complete")
        return None

    def _runnable_image(self, client, rec: runs.RunRecord, image_ref: str) -> str:
        """`image_ref`, or the image derived from it when its packages fall short of the job."""
        spec = self.spec
        needs = recipes.needs_for(spec.recipe, spec.format.value, spec.kv_cache, steps=spec.steps,
                                  embedded=spec.is_embedded and model_source.embedded_needs_conversion())
        if self.plan is not None and self.plan.mode == "streamed":
            needs = needs | memory_budget.STREAMED_NEEDS
        return derived_image.runnable(client, image_ref, needs, cuda=self.device_kind == "gpu", rec=rec,
                                      console=self.console, upgrade=spec.image_upgrade, offline=spec.offline,
                                      dry_run=self.dry_run)

    def describe(self, output: Path, image_ref: str, source_bytes: int) -> dict | None:
        """Quick quality check and model card; returns the evaluation. The checkpoint is already
        complete: a failure here is reported, never turned into a failed run; an interrupt ends
        the command (exit 130) and leaves the checkpoint in place."""
        evaluation = None
        if self.spec.evaluate:
            try:
                evaluation = evaluate(EvalRequest(output, reference=self.spec.model, tokens=QUICK_TOKENS[self.device_kind],
                                                  image=image_ref, gpus=self.spec.gpus,
                                                  keep=self.spec.keep_container,
                                                  trust_remote_code=self.spec.trust_remote_code), self.console)
                self.console.print(f"quality: {summary_line(evaluation)}", highlight=False)
            except (KeyboardInterrupt, Interrupted):  # an interrupt is the user's, not a failed check
                raise Interrupted("interrupted during the quality check; the checkpoint itself is complete "
                                  "and verified", where=str(output),
                                  advice=f"`launcher eval {output}` measures its quality") from None
            except LauncherError as e:
                self.console.print(markup("[yellow]warning:[/] evaluation failed, the checkpoint is fine: {}", e))
        card = model_card.write(output, evaluation, source_bytes or None)
        self.console.print(markup("model card: {}", card), highlight=False)
        return evaluation

    def _quantize(self, client, rec: runs.RunRecord, model, image_ref: str, output: Path,
                  nvidia: bool, calib: tuple[str, list[Bind]]) -> None:
        spec = self.spec
        clean_stale_partials(output, self.console)
        partial = partial_path(output, rec.id)
        partial.mkdir(parents=True)
        rec.add("partials", str(partial))

        calib_src, calib_binds = calib
        recipe, recipe_binds = recipe_bind(spec)
        job = quantize_job(spec, self.plan, model, calib_src, recipe, self.device_kind, fingerprint(self.inputs), rec.id)
        # No token and no network, ever: a hub dataset was fetched on the host (calibration_bind).
        env = {"HF_DATASETS_OFFLINE": "1"} if calib_src.startswith("hf:") else {}
        try:
            run_payload(PayloadRun(
                client=client, image=image_ref, record=rec, module="quantize", job=job,
                binds=model.binds + calib_binds + recipe_binds + [Bind(partial, "/out", read_only=False)],
                gpus=spec.gpus, nvidia=nvidia, env=env, network="none", mem_limit=spec.memory_limit,
                keep=spec.keep_container, secrets=tuple(_secrets(spec))), self.console)
        finally:  # also after a failed run: a finished conversion is kept, a cut one leaves no staging folder
            model_source.finish_embedded(model)
        if model.staging is not None:  # the embedded model was converted just now: it is its files
            self.inputs["model"] = model_identity(spec)

        result_path = partial / "result.json"
        # the container wrote it (a model's own code may run there): read as untrusted
        raw = read_capped(result_path, MAX_RESULT_BYTES, "the payload's result.json", error=PayloadFailed,
                          missing_ok=True)
        if raw is None:
            raise LauncherError("the payload exited cleanly but wrote no result.json", where=str(partial))
        result = parse(raw, "json", "the payload's result.json", str(result_path), error=PayloadFailed)
        if not isinstance(result, dict):
            raise PayloadFailed("the payload's result.json is not a JSON object", where=str(result_path))
        result["job_inputs"] = self.inputs
        result["job_fingerprint"] = fingerprint(self.inputs)
        result["run_id"] = rec.id
        result["source"] = {"model": spec.model, "revision": spec.revision}
        files.atomic_write_json(result_path, result)
        files.make_shareable(partial)  # 0644 like any output (safetensors writes 0600): see files.py

        verify_or_raise(partial, self.console)
        try:
            if self.previous.action == "replace":
                self._replace(partial, output, rec)
            else:
                os.replace(partial, output)
        except OSError as e:  # under the lock only a folder made by hand can be in the way
            raise ConfigError(f"cannot move the finished checkpoint into place: {e.strerror}", where=str(output),
                              advice=f"the checkpoint is complete in {partial}; move it yourself or free "
                                     "the output path") from None
        rec.created.partials.remove(str(partial))
        rec.add("outputs", str(output))
        self.console.print(markup("[green]checkpoint complete:[/] {} ({:.1f} MB)", output,
                                  result.get("checkpoint_bytes", 0) / 1e6))

    def _replace(self, partial: Path, output: Path, rec: runs.RunRecord) -> None:
        """The new checkpoint in place of the old one of another job (reuse.py: ours to replace).
        The old one is moved aside under a name this run's record holds before the move, then
        deleted: a crash between the two renames leaves it for `rollback` / the next run."""
        reuse.check_replaceable(output, self.previous.result, self.previous.why)  # again: minutes passed
        aside = replaced_path(output, rec.id)
        rec.add("partials", str(aside))
        os.replace(output, aside)
        os.replace(partial, output)
        shutil.rmtree(aside, ignore_errors=True)
        if not aside.exists():
            rec.created.partials.remove(str(aside))
            rec.save()


def verify_or_raise(folder: Path, console: Console, reused: bool = False) -> None:
    """The independent host-side check; a checkpoint that fails it is never promoted, nor
    reused: an existing output is verified again, since it may have been damaged since."""
    report = verify_checkpoint(folder)
    if report.problems:
        for p in report.problems[:MAX_PRINTED]:
            console.print(markup("[red]verify[/] {}", str(p)), highlight=False)
        if reused:
            raise VerifyFailed(f"the existing output matches this job but fails verification "
                               f"({len(report.problems)} problems): it was damaged since it was written",
                               where=str(folder), advice="remove it (or `launcher rollback RUN_ID --outputs`) "
                                                         "and run again")
        raise VerifyFailed(f"the new checkpoint failed verification ({len(report.problems)} problems)",
                           where=str(folder), advice="this is a bug in the recipe or export; please report it")
    console.print(markup("verify: ok ({})", summary(report)), highlight=False)


def clean_stale_partials(output: Path, console: Console) -> None:
    """Partial folders of runs that died are ours (their records say so): remove them. Only
    the exact partial a record's run could have made (beside its own output, named after
    its id), since a record is a file anyone can edit."""
    for rec in runs.all_runs():
        if rec.status == "running":
            continue
        for p in list(rec.created.partials):
            path = Path(p)
            if (path.parent == output.parent and path.name.startswith(f".{output.name}.partial-")
                    and recorded_path_ok(rec, "partials", p) and not path.is_symlink()):
                shutil.rmtree(path, ignore_errors=True)
                if path.exists():  # keep it in the record: rollback reports why it cannot go
                    continue
                rec.created.partials.remove(p)
                rec.save()
                console.print(markup("removed the partial output of interrupted run {}", rec.id))

