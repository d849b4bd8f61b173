"""`launcher eval`: what quantization cost, measured in the same image and mounts.

The payload (container_payload/evaluate.py) runs an exact emulation of what the
engines compute, so this works on CPUs and on GPUs without FP4 units. The held-out
texts are never the calibration text.

Every input is mounted read-only. The payload writes its JSON into a fresh folder of
the run (never the folder of --json-out, which could be all of $HOME); the launcher then
copies it to --json-out atomically. An image it pulls is recorded for rollback.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from container_payload.core.contract import EvalJob

from ..common import paths
from ..common.config import JobSpec
from ..common.errors import ConfigError, LauncherError
from ..common.files import atomic_write_json, refuse_link
from ..common.output import MAX_RESULT_BYTES, run_result
from ..common.output import console as stderr_console
from ..common.untrusted import read_json_object
from ..containers.container import Bind, PayloadRun, run_payload
from ..containers.session import DockerSession
from ..sources import assets, model_source

# The check at the end of `launcher quantize`: held-out tokens scored. The CPU emulation
# scores ~512 tokens in 10-40 s on 2 cores, so the stand-in gets a smaller sample.
QUICK_TOKENS = {"gpu": 8192, "cpu": 2048}


@dataclass
class EvalRequest:
    checkpoint: Path
    reference: str | None = None        # hub id, folder or 'embedded'; default: the checkpoint's source
    text: str = assets.HELDOUT[0]       # heldout-wiki | heldout-brown | FILE
    tokens: int = EvalJob.tokens
    seq_len: int = EvalJob.seq_len
    json_out: Path | None = None
    image: str = "auto"
    gpus: str = "auto"
    generations: bool = True
    keep: bool = False                  # leave the container for inspection (quantize --keep-container)
    trust_remote_code: bool = False     # the models' own code (auto_map) may run: model_source.check_remote_code


def text_path(text: str) -> Path:
    if text in assets.HELDOUT:
        return assets.heldout_text(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"evaluation text not found: {path}", where="--text",
                          advice=f"pass a text file, or one of {', '.join(assets.HELDOUT)}")
    return path.resolve()


def source_of(checkpoint: Path) -> str | None:
    """The model a checkpoint was made from, per its result.json (a checkpoint from a tarball or a
    clone is anyone's: read as untrusted, and a name only when it is one)."""
    source = (read_json_object(checkpoint / "result.json", MAX_RESULT_BYTES) or {}).get("source")
    model = source.get("model") if isinstance(source, dict) else None
    return model if isinstance(model, str) and model else None


def checkpoint_and_reference(checkpoint: Path, reference: str | None, trust_remote_code: bool
                             ) -> tuple[Path, str, JobSpec]:
    """The checkpoint to evaluate and the model it is compared with, both checked before Docker and
    the network (`eval` and `eval --tasks`): (checkpoint folder, reference, the reference's spec)."""
    ckpt = checkpoint.expanduser().resolve()
    if not (ckpt / "config.json").exists():
        raise ConfigError(f"not a checkpoint folder (no config.json): {ckpt}", where="CKPT")
    model_source.refuse_links_out(ckpt)  # before its result.json and config.json are read here
    reference = reference or source_of(ckpt)
    if reference is None:
        raise ConfigError("the checkpoint does not say which model it came from", where="--reference",
                          advice="pass --reference MODEL (hub id, folder, or embedded)")
    # the checkpoint carries its source's code (quantize copies it): the same rule for both models
    model_source.check_remote_code(ckpt, trust_remote_code, str(ckpt))
    ref_spec = JobSpec(model=reference, output=Path("/nonexistent"), trust_remote_code=trust_remote_code)
    model_source.validate(ref_spec)  # a bad id or missing folder: before Docker and the network
    if ref_spec.is_embedded and not (paths.models_dir() / model_source.EMBEDDED_DIRNAME / "config.json").exists():
        raise LauncherError("the embedded model has not been converted yet",
                            advice="run `launcher quantize` once (it converts it), then evaluate")
    return ckpt, reference, ref_spec


def evaluate(req: EvalRequest, console: Console | None = None) -> dict:
    console = console or stderr_console
    ckpt, reference, ref_spec = checkpoint_and_reference(req.checkpoint, req.reference, req.trust_remote_code)
    text = text_path(req.text)
    json_out = check_json_out(req.json_out or ckpt / "eval.json")
    ref = model_source.resolve(ref_spec)
    model_source.check_remote_code(ref.host_dir, req.trust_remote_code, reference)

    docker = DockerSession.open(console)
    client, nvidia = docker.client, docker.nvidia
    image = docker.image_ref(req.image)
    rec = docker.start_run("eval", {"checkpoint": str(ckpt), "reference": reference, "text": str(text),
                                    "tokens": req.tokens, "seq_len": req.seq_len}, image)
    with rec.ends_on_error():
        docker.ensure_image(rec, image)  # rollback --images may remove what eval pulled
    out_dir = rec.folder / "evalout"   # the only folder the payload may write
    out_dir.mkdir()
    job = EvalJob(checkpoint="/ckpt", reference=ref.container_dir, text=f"/text/{text.name}",
                  tokens=req.tokens, seq_len=req.seq_len, json_out=f"/evalout/{json_out.name}",
                  device="cpu" if req.gpus == "none" or not nvidia else "auto",
                  generations=None if req.generations else [], trust_remote_code=req.trust_remote_code)
    binds = [Bind(ckpt, "/ckpt"), Bind(text, f"/text/{text.name}"),
             Bind(out_dir, "/evalout", read_only=False)] + [b for b in ref.binds if b.target != "/assets"]
    with rec.ends_on_error():
        run_payload(PayloadRun(client=client, image=image, record=rec, module="evaluate", job=job,
                               binds=binds, gpus=req.gpus, nvidia=nvidia, keep=req.keep), console)
        result = _publish(out_dir / json_out.name, json_out)
    rec.result = {k: result.get(k) for k in ("perplexity", "reference_perplexity", "kl_divergence",
                                            "top1_agreement", "tokens")}
    rec.finish("complete")

    rec.write_result(run_result(rec, evaluation=result, extra={"output": str(json_out), "run_id": rec.id,
                                                                "timings": result.get("timings")}))
    result["run_id"] = rec.id   # (not in --json-out's file: written before)
    return result


def check_json_out(path: Path) -> Path:
    """--json-out (default CKPT/eval.json) as the file itself, never a link's target: the
    folder is resolved (the user's own links), the name is not (a checkout may plant one)."""
    path = Path(path).expanduser()
    path = path.parent.resolve() / path.name
    if path.is_dir() and not path.is_symlink():
        raise ConfigError(f"--json-out names a folder: {path}", where="--json-out", advice="give a file name, e.g. eval.json")
    if not path.parent.is_dir():
        raise ConfigError(f"the folder of --json-out does not exist: {path.parent}", where="--json-out",
                          advice="create it first, or choose another path")
    refuse_link(path)  # before the container runs; _publish refuses one planted since
    return path


def _publish(made: Path, json_out: Path) -> dict:
    """The payload's JSON, checked, then written to --json-out atomically (temp file + rename)."""
    result = read_json_object(made, limit=MAX_RESULT_BYTES)
    if result is None:
        raise LauncherError("the evaluation wrote no readable JSON", where=str(made), advice="see the run's log")
    try:
        atomic_write_json(json_out, result)  # refuses a link planted at json_out since the check
    except OSError as e:
        raise ConfigError(f"cannot write the evaluation: {e.strerror or e}", where=str(json_out),
                          advice=f"the result is kept in {made}; choose a writable --json-out") from None
    return result


def summary_line(r: dict) -> str:
    return (f"KL {r['kl_divergence']:.4f} nats/token, top-1 agreement {r['top1_agreement']:.3f}, "
            f"perplexity {r['perplexity']:.3f} vs {r['reference_perplexity']:.3f} original "
            f"({r['tokens']} tokens)")
