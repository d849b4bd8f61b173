"""The two ways quantize.run carries out a recipe's steps: on the whole model, or layer by layer.

Both get the same resolved steps, the same calibration batches and the same BuiltRecipe, and
hand back the same facts for result.json (mode, loader, steps_applied, ...), so quantize.run
has one skeleton: start -> load -> (batches) -> run. Which one runs is decided once, by
`choose` (the job's mode, or the memory budget for mode "auto").

    start()        before the tokenizer and ModelOpt load: background reads of the checkpoint
    load()         what the batch size and the run need (the model, or only its config)
    batch_sizing() calibration.calibration_batches' keyword arguments
    run()          the steps and the export; returns facts for result.json
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path

from ..core import events, memory_plan
from ..core.contract import QuantizeJob
from ..core.events import PayloadError
from ..core.tuning import Tuning
from . import calibration, loading


class WholeModel:
    """The model in memory (one GPU, spread over several, or the CPU); steps.run, then ModelOpt's
    export_hf_checkpoint."""
    mode = "whole"

    def __init__(self, job: QuantizeJob, device: str, tuning: Tuning, mark):
        self.job, self.device, self.tuning, self.mark = job, device, tuning, mark
        self.model_dir = Path(job.model_dir)
        self.direct = self.prefetch = self.spread = self.model = None
        self.loader = None

    def start(self) -> None:
        job, model_dir, low_memory = self.job, self.model_dir, self.job.low_memory
        has_config = (model_dir / "config.json").exists()
        self.spread = loading.gpu_spread(self.device, job.gpu_memory_budget, model_dir) if has_config else None
        files = None if self.spread or job.trust_remote_code else loading.direct_load_files(
            self.tuning.direct_load, self.device, low_memory, model_dir)
        if files:
            from . import direct_load  # torch only: starts before transformers is imported

            opts = self.tuning.direct_load if isinstance(self.tuning.direct_load, dict) else {}
            self.direct = loading.Background(direct_load.read_state_dict, files, self.device,
                                             opts.get("readers", direct_load.READERS),
                                             opts.get("chunk_mb", direct_load.CHUNK >> 20) << 20)
        elif (not low_memory if self.tuning.prefetch is None else self.tuning.prefetch) and has_config:
            self.prefetch = loading.Background(loading.prefetch_page_cache, model_dir)

    def load(self) -> None:
        self.model, self.loader = loading.load_model(self.model_dir, self.device, self.direct, self.spread,
                                                     self.job.trust_remote_code)
        for name, reader in (("direct_read", self.direct), ("prefetch", self.prefetch)):
            if reader is not None:
                reader.result()
                self.mark(f"{name}_done", reader.ended)

    def batch_sizing(self) -> dict:
        return {"model": self.model, "low_memory": self.job.low_memory,
                "gpu_budget": self.job.gpu_memory_budget if self.spread else None}

    def run(self, recipe, batches, out: Path, timings: dict) -> dict:
        from ..steps import steps  # torch and ModelOpt: loaded by now

        t = time.time()
        loop_times = {}
        applied: list[str] = []
        step_s: dict = {}
        model = steps.run(self.model, recipe, calibration.forward_loop_for(batches, self.device, loop_times), applied,
                          step_s)
        timings["steps_s"] = step_s
        self.model = None  # export holds the only reference: freed when it returns
        timings["quantize_s"] = round(time.time() - t, 3)
        if "calibrate_s" in loop_times:
            timings["calibrate_s"] = round(loop_times["calibrate_s"], 3)
        t = time.time()
        export(model, self.model_dir, out, low_memory=self.job.low_memory)
        timings["export_s"] = round(time.time() - t, 3)
        return {"mode": self.mode, "loader": self.loader, "steps_applied": applied}


class Streamed:
    """One decoder layer in memory at a time (streaming.run_streamed): the skeleton on the meta
    device, each layer read from the shards, calibrated, refined and exported in turn."""
    mode = "streamed"

    def __init__(self, job: QuantizeJob, device: str, tuning: Tuning, mark):
        self.job, self.device, self.tuning, self.mark = job, device, tuning, mark
        self.model_dir = Path(job.model_dir)
        self.config = None

    def start(self) -> None:
        pass  # nothing to read ahead: each layer is read when its turn comes

    def load(self) -> None:
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=self.job.trust_remote_code)

    def batch_sizing(self) -> dict:
        # auto_batch_size reads the widths off `model.config`; low_memory: the batch's
        # temporaries are a large part of a streamed peak
        return {"model": type("Shape", (), {"config": self.config})(), "low_memory": True}

    def run(self, recipe, batches, out: Path, timings: dict) -> dict:
        from . import streaming  # torch and ModelOpt: loaded by now

        t = time.time()
        facts = streaming.run_streamed(self.model_dir, out, recipe, batches, self.device,
                                       self.job.trust_remote_code)
        loading.copy_tokenizer(self.model_dir, out)
        timings["quantize_s"] = round(time.time() - t, 3)  # calibration, refinement and export, per layer
        return {"mode": self.mode, "loader": "streamed: one layer at a time from the shards",
                "steps_applied": facts.pop("applied"), "streamed": facts}


def choose(job: QuantizeJob, device: str, tuning: Tuning, steps: tuple | None, mark):
    """The pipeline for this job: the mode the launcher planned (job.mode), checked again against
    the memory budget with the checkpoint's real layer sizes and the job's batch; "auto" (a job
    file written by hand) is decided here. A recipe that cannot stream, or a plan that does not
    fit, is refused here in one line, before anything loads."""
    mode = _planned_mode(job, steps, on_gpu=device == "cuda")
    if mode == "streamed":
        problem = memory_plan.refusal_of(job.recipe, steps)
        if problem:
            raise PayloadError(problem, kind="input")
    return (Streamed if mode == "streamed" else WholeModel)(job, device, tuning, mark)


def _planned_mode(job: QuantizeJob, steps: tuple | None, on_gpu: bool) -> str:
    budget = job.memory_budget
    if not budget:
        return "whole" if job.mode == "auto" else job.mode
    calib = job.calibration
    bs = memory_plan.planning_batch(calib.batch_size, on_gpu)  # the host's batch (memory_budget.plan)
    shape = memory_plan.shape_of(Path(job.model_dir), 0)
    need = memory_plan.peaks_of(shape, calib.samples * calib.seq_len, bs * calib.seq_len, steps)
    picked, problem = memory_plan.choose(job.mode, int(budget), need, memory_plan.refusal_of(job.recipe, steps))
    if problem:
        raise PayloadError(problem, kind="oom")
    events.stage("plan", detail=f"mode {picked} ({job.mode}), batch {bs}: whole needs ~{need['whole'] >> 20} MiB, "
                                f"streamed ~{need['streamed'] >> 20} MiB, budget {int(budget) >> 20} MiB")
    return picked


def export(model, model_dir: Path, out: Path, low_memory: bool = False) -> None:
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    events.stage("export", detail=str(out))
    kwargs = {}
    if low_memory:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # save_pretrained stages one shard at a time in host memory (plus its serialized
        # bytes): smaller shards keep that staging small on a unified-memory machine.
        # ModelOpt before ~0.43 has no such argument: it writes its default shards.
        if "max_shard_size" in inspect.signature(export_hf_checkpoint).parameters:
            kwargs["max_shard_size"] = "2GB"
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(out), **kwargs)
    loading.copy_tokenizer(model_dir, out)
