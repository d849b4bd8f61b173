"""`launcher doctor`: is this machine ready to quantize (and serve) a model?

One row per check, each with a status and what to do. Nothing is pulled, downloaded
or written: the image is checked against its registry's manifest only, the model
against the hub's metadata only. The GPU is asked in a short-lived container of the
image itself, because what counts is what the container sees, not the host.

Required checks decide the exit code; warnings (no token, no FP4 tensor cores, CPU
stand-in) are things the flow can live with.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from docker.errors import APIError, ContainerError, DockerException
from huggingface_hub import constants
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from container_payload.core import recipes

from .common import output, paths
from .common.config import STANDIN_IMAGE, JobSpec
from .common.daemon import connect, has_nvidia_runtime
from .common.errors import ConfigError, DockerUnavailable, LauncherError, ModelError, PreflightError, docker_detail
from .containers.container import gpu_requests
from .containers.image import ImageStore, choose_image, is_standin, registry_of, standin_build_target
from .containers.image_probe import probe
from .quantize import preflight
from .records.destination import check_output
from .sources import model_source

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
# SmolLM2-135M in bf16, when the embedded model is neither converted nor fetched yet.
EMBEDDED_BYTES_GUESS = 270_000_000
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader"]


@dataclass
class Row:
    name: str
    status: str           # ok | warn | FAIL | skip
    detail: str
    advice: str = ""
    required: bool = True

    @property
    def failed(self) -> bool:
        return self.status == FAIL and self.required


@dataclass
class Gpu:
    name: str
    major: int
    minor: int
    memory: str           # as nvidia-smi says it; "[N/A]" on GB10 (unified memory)

    @property
    def sm(self) -> str:
        return f"sm_{self.major}{self.minor}"


@dataclass
class DoctorRequest:
    model: str | None = None
    output: Path | None = None
    image: str = "auto"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.failed]


# ---------------------------------------------------------------- GPU facts

def parse_gpus(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader` lines.
    The name may itself hold commas in principle, so split from the right."""
    gpus = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        name, cap, mem = parts
        m = re.fullmatch(r"(\d+)\.(\d+)", cap)
        if not m:
            raise ValueError(f"unexpected compute capability {cap!r} in {line!r}")
        gpus.append(Gpu(name, int(m.group(1)), int(m.group(2)), mem))
    return gpus


def fp4_support(gpu: Gpu) -> tuple[bool, str]:
    """(native FP4 tensor cores?, what that means for this project).

    Blackwell has FP4 tensor cores: sm_100/103 (B200, B300), sm_110 (Thor), sm_120/121
    (RTX 50, GB10 in the DGX Spark). Older GPUs can still quantize (calibration runs in
    bf16) and `launcher eval` emulates exactly, but engines serve NVFP4 there only by
    emulation or as weight-only dequantization, without the FP4 speed-up."""
    if gpu.major in (10, 11, 12):
        return True, f"native NVFP4 (Blackwell {gpu.sm})"
    if gpu.major == 9:
        return False, f"no FP4 tensor cores (Hopper {gpu.sm}): quantizing works; NVFP4 serving is emulated or weight-only"
    if gpu.major == 8 and gpu.minor == 9:
        return False, f"no FP4 tensor cores (Ada {gpu.sm}, FP8 only): NVFP4 serving is emulated or weight-only"
    return False, f"no FP4 or FP8 tensor cores ({gpu.sm}): NVFP4 runs only as emulation or weight-only"


# ---------------------------------------------------------------- the checks

def check_daemon():
    try:
        client = connect(timeout=30)
    except DockerUnavailable as e:
        return None, Row("Docker daemon", FAIL, f"{e.what} [{e.where}]", e.advice or "")
    v = client.version()
    return client, Row("Docker daemon", OK, f"Docker {v.get('Version', '?')} at "
                       f"{os.environ.get('DOCKER_HOST', 'unix:///var/run/docker.sock')}")


def check_runtime(client, image: str) -> tuple[bool, Row]:
    runtimes = sorted((client.info().get("Runtimes") or {}).keys())
    if has_nvidia_runtime(client):
        return True, Row("NVIDIA runtime", OK, f"runtimes: {', '.join(runtimes)}")

    # A CPU stand-in needs no GPU: then the missing runtime is a warning, not a failure. An
    # absent image cannot say (its label decides), so it counts as one that needs a GPU.
    present = ImageStore(client).get(image)
    needs_gpu = present is None or not is_standin(present)
    return False, Row(
        "NVIDIA runtime", FAIL if needs_gpu else WARN,
        f"Docker has no 'nvidia' runtime (runtimes: {', '.join(runtimes) or 'none'}): containers get no GPU",
        "install nvidia-container-toolkit and run `sudo nvidia-ctk runtime configure --runtime=docker` "
        f"then restart Docker; or use the CPU stand-in (`make image`, --image {STANDIN_IMAGE})",
        required=needs_gpu)


def check_gpu(client, image: str, image_present: bool) -> Row:
    if not image_present:
        return Row("GPU", SKIP, f"asked in the image, which is not here yet ({image})",
                   "pull it (`launcher quantize` does), then run doctor again", required=False)
    try:
        # The entrypoint is replaced: NVIDIA's images print a banner from theirs.
        out = client.containers.run(image, NVIDIA_SMI[1:], entrypoint=NVIDIA_SMI[:1], remove=True, network_mode="none",
                                    device_requests=gpu_requests("all", True), stdout=True, stderr=True)
        gpus = parse_gpus(out.decode("utf-8", "replace"))
    except ContainerError as e:
        msg = (e.stderr or b"").decode("utf-8", "replace").strip().splitlines() if isinstance(e.stderr, bytes) else []
        return Row("GPU", FAIL, f"nvidia-smi failed in the image: {msg[-1] if msg else e}",
                   "check the driver on the host (`nvidia-smi`) and the toolkit (`nvidia-ctk --version`)")
    except (APIError, DockerException, ValueError) as e:
        return Row("GPU", FAIL, f"cannot query the GPU in the image: {docker_detail(e)}",
                   "check that `docker run --rm --gpus all IMAGE nvidia-smi` works")
    if not gpus:
        return Row("GPU", FAIL, "nvidia-smi in the image lists no GPU", "check the driver and the toolkit")
    native = [fp4_support(g) for g in gpus]
    detail = "; ".join(f"{g.name} ({g.major}.{g.minor}, memory {g.memory}): {n[1]}" for g, n in zip(gpus, native))
    if all(n[0] for n in native):
        return Row("GPU", OK, detail)
    return Row("GPU", WARN, detail, "quantizing and `launcher eval` work; for FP4 speed serve on Blackwell "
               "(DGX Spark GB10, B200, RTX 50)", required=False)


def _model_bytes(spec: JobSpec) -> tuple[int, int, str]:
    """(weight bytes, bytes still to download, where the number comes from), raising ModelError."""
    if spec.is_embedded:
        converted = paths.models_dir() / model_source.EMBEDDED_DIRNAME
        if (converted / "config.json").exists():
            return model_source.weight_bytes(converted), 0, "embedded model, converted"
        gguf = sorted(paths.assets_dir().glob("*.gguf"))
        if gguf:
            return gguf[0].stat().st_size * 3, 0, "embedded model, from its GGUF"
        return EMBEDDED_BYTES_GUESS, 0, "embedded model (estimate; fetched on first quantize)"
    if spec.is_local:
        resolved = model_source._local(Path(spec.model).expanduser())
        return resolved.bytes, 0, "local folder"
    cached = _cached_snapshot_bytes(spec.model)
    if model_source.is_offline(spec):
        if cached is None:
            raise ModelError(f"offline (HF_HUB_OFFLINE=1) and {spec.model} is not in the Hugging Face cache",
                             where=str(paths.hf_hub_cache()), advice="download it once while online")
        return cached, 0, "Hugging Face cache (offline: hub not asked)"
    size = model_source.check_access(spec.model, spec.revision, model_source.token_from(spec.hf_token_env))
    return size, 0 if cached else size, "hub metadata"


def _cached_snapshot_bytes(repo_id: str) -> int | None:
    return model_source.cached_weight_bytes(repo_id) or None


def check_token(spec: JobSpec) -> Row:
    env = spec.hf_token_env
    if os.environ.get(env):
        return Row("Hugging Face token", OK, f"from ${env}", required=False)

    token = model_source.token_from(env)
    if token:
        return Row("Hugging Face token", OK, f"stored login ({constants.HF_TOKEN_PATH})", required=False)
    return Row("Hugging Face token", WARN, f"missing: ${env} is not set and there is no stored login "
               f"({constants.HF_TOKEN_PATH})",
               f"export {env}=hf_... (https://huggingface.co/settings/tokens) or run `hf auth login`; "
               "needed for gated and private models", required=False)


def check_model_and_disk(spec: JobSpec, output: Path, on_gpu: bool) -> list[Row]:
    """The model row, then preflight's disk and memory rows for that model's size."""
    try:
        size, download, source = _model_bytes(spec)
    except ModelError as e:
        where = f" [{e.where}]" if e.where else ""
        rows = [Row("model", FAIL, f"{e.what}{where}", e.advice or "")]
        # Disk and memory still get a row: without a size they can only say so.
        rows.append(Row("disk / memory", SKIP, "model size unknown", "fix the model row first", required=False))
        return rows
    label = "embedded" if spec.is_embedded else spec.model
    detail = f"{label}: {size / 1e9:.2f} GB of weights ({source})"
    if model_source.is_offline(spec) and not (spec.is_embedded or spec.is_local):
        rows = [Row("model", WARN, detail + "; offline, so access was not checked", required=False)]
    else:
        rows = [Row("model", OK, detail)]
    checks = preflight.quantize_checks(model_bytes=size, output=output, download_bytes=download,
                                       cache_dir=paths.hf_hub_cache(), on_gpu=on_gpu)
    rows += [Row(c.name, OK if c.ok else FAIL, c.detail, c.advice) for c in checks]
    return rows


def check_image(client, ref: str) -> tuple[bool, Row]:
    """(present locally?, row). Absent: ask the registry for the manifest, pull nothing."""
    store = ImageStore(client)
    img = store.get(ref)
    if img is not None:
        kind = " (CPU stand-in)" if is_standin(img) else ""
        return True, Row("image", OK, f"{ref}{kind} present locally ({img.attrs.get('Size', 0) / 1e9:.2f} GB)")
    if target := standin_build_target(ref):
        return False, Row("image", FAIL, f"the CPU stand-in {ref} is not built", f"run `make {target}`")
    registry = registry_of(ref)
    auth = ImageStore._auth(ref, "NGC_API_KEY")
    need_key = registry == "nvcr.io" and auth is None
    try:
        dist = client.api.inspect_distribution(ref, auth_config=auth)
    except APIError as e:
        err = ImageStore.pull_error(ref, registry, e, auth is not None)
        advice = err.advice or ""
        if need_key:
            advice = "export NGC_API_KEY (create one at ngc.nvidia.com) and retry"
        return False, Row("image", FAIL, f"{ref} is not here and cannot be pulled: {err.what} [{registry}]",
                          advice)
    except DockerException as e:
        return False, Row("image", FAIL, f"cannot ask {registry} about {ref}: {e}",
                          "check the network or proxy of the Docker daemon")
    digest = (dist.get("Descriptor") or {}).get("digest", "")
    detail = f"{ref} not here; pullable from {registry} ({digest[:19]}...)"
    advice = "the first quantize pulls it (several GB)"
    if need_key:
        advice += "; export NGC_API_KEY if the pull is refused"
    return False, Row("image", OK, detail, advice)


def check_stack(client, ref: str, cuda: bool) -> list[Row]:
    """The image's probe (image_probe.py), then which recipes and formats it runs as it is and
    which need its derived image (derived_image.py), with the reason."""
    try:
        found = probe(client, ref, run_id="doctor")
    except LauncherError as e:
        return [Row("image stack", FAIL, e.what, e.advice or "")]
    serve = f"trtllm-serve at {found.trtllm_serve}" if found.trtllm_serve else "no trtllm-serve"
    rows = [Row("image stack", OK, f"{found.summary()}; numpy {found.version('numpy') or 'none'}, accelerate "
                f"{found.version('accelerate') or 'none'}, safetensors {found.version('safetensors') or 'none'}; "
                f"{serve}; default user {found.user}", required=False)]
    jobs = [(name, recipes.needs_for(name)) for name in recipes.NAMES]
    jobs += [(f"--format {fmt}", recipes.needs_for("default", fmt)) for fmt in recipes.FORMAT_PRESETS]
    jobs += [("ModelOpt YAML recipes", recipes.MODELOPT_RECIPE_NEEDS)]
    as_is, derived = [], {}
    for name, needs in jobs:
        missing = recipes.shortfalls(needs, found.packages, cuda=cuda)
        if missing:
            derived.setdefault("; ".join(map(str, missing)), []).append(name)
        elif needs.gpu and not cuda:
            derived.setdefault("needs a GPU", []).append(name)
        else:
            as_is.append(name)
    rows.append(Row("runs as is", OK if as_is else WARN, ", ".join(as_is) or "nothing", required=False))
    for why, names in derived.items():
        advice = ("runs on a machine with a GPU" if why == "needs a GPU" else
                  "quantize derives an image with the tested versions once (`launcher image prepare` ahead of time)")
        rows.append(Row("needs more", WARN, f"{', '.join(names)}: {why}", advice, required=False))
    return rows


# ---------------------------------------------------------------- all of it

def run_checks(req: DoctorRequest) -> Report:
    report = Report()
    spec = JobSpec(model=req.model or "embedded", output=req.output)
    output = Path(spec.output).expanduser().resolve()

    client, row = check_daemon()
    report.rows.append(row)
    nvidia = False
    if client is None:
        for name in ("NVIDIA runtime", "GPU", "image"):
            report.rows.append(Row(name, SKIP, "needs the Docker daemon", "fix the daemon row first",
                                   required=False))
    else:
        # The runtime row needs to know which image: the stand-in needs no GPU.
        image = choose_image(req.image, has_nvidia_runtime(client))
        nvidia, row = check_runtime(client, image)
        report.rows.append(row)
        present, image_row = check_image(client, image)
        if nvidia:
            report.rows.append(check_gpu(client, image, present))
        else:
            report.rows.append(Row("GPU", SKIP, "not asked: no NVIDIA runtime", required=False))
        report.rows.append(image_row)
        if present:
            report.rows += check_stack(client, image, cuda=nvidia)
    report.rows.append(check_token(spec))
    report.rows.append(check_output_row(spec))
    report.rows += check_model_and_disk(spec, output, on_gpu=nvidia)
    return report


def check_output_row(spec: JobSpec) -> Row:
    """quantize's own output check (destination.py): a path it would refuse fails here too."""
    try:
        path = check_output(spec.output, model_folder=Path(spec.model).expanduser() if spec.is_local else None)
    except ConfigError as e:
        return Row("output", FAIL, e.what, e.advice or "")
    return Row("output", OK, f"{path} can be written")


def table(report: Report):
    colors = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}
    t = Table(box=box.SIMPLE_HEAD)
    t.add_column("check", no_wrap=True)
    t.add_column("status", no_wrap=True)
    t.add_column("detail", overflow="fold")
    t.add_column("advice", overflow="fold")
    for r in report.rows:
        t.add_row(r.name, f"[{colors[r.status]}]{r.status}[/]", escape(r.detail), escape(r.advice))
    return t


def doctor(req: DoctorRequest, console: Console | None = None) -> Report:
    """Print the table; raise PreflightError (one line, non-zero exit) if a required check failed."""
    report = run_checks(req)
    output.stdout.print(table(report))
    if report.failed:
        names = ", ".join(r.name for r in report.failed)
        raise PreflightError(f"doctor: {len(report.failed)} required check(s) failed: {names}",
                             advice="follow the advice column above")
    (console or output.console).print("[green]ready[/]: all required checks passed")
    return report

