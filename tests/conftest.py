"""Shared fixtures. Everything here is real: the Docker daemon, the stand-in image,
a loopback registry started by pytest-docker, ModelOpt in its own venv.

What cannot exist on these machines (an NVIDIA GPU runtime, NGC) is mocked only in
the tests that say so.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fork_server import ForkServer
from launcher.sources.model_source import EMBEDDED_DIRNAME

REPO = Path(__file__).resolve().parent.parent
REAL_HOME = Path(os.environ.get("SPARK_NVFP4_HOME") or Path.home() / ".cache" / "spark-nvfp4")
STANDIN = "spark-nvfp4/trtllm-standin:cpu"
OLD_STANDIN = "spark-nvfp4/trtllm-standin:2025"
REGISTRY = "127.0.0.1:5055"


def need(condition: bool, reason: str):
    """In CI a missing prerequisite is a failure (CI installs everything); locally a skip."""
    if not condition:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def docker_client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:  # noqa: BLE001
        need(False, f"Docker daemon not reachable: {e}")
    return client


def built_image(client, ref: str, make_target: str) -> str:
    from docker.errors import ImageNotFound

    try:
        client.images.get(ref)
    except ImageNotFound:
        need(False, f"{ref} is not built: run `make {make_target}`")
    return ref


@pytest.fixture(scope="session")
def standin_image(docker_client) -> str:
    return built_image(docker_client, STANDIN, "image")


@pytest.fixture(scope="session")
def old_image(docker_client) -> str:
    """The 2025 stack of NVIDIA's images (ModelOpt 0.37, transformers 4.57): tests/test_real_image.py."""
    return built_image(docker_client, OLD_STANDIN, "image-2025")


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    """The embedded model's GGUF and the texts, fetched once into the real home."""
    os.environ.setdefault("SPARK_NVFP4_HOME", str(REAL_HOME))
    from launcher.sources import assets

    assets.fetch_all()
    return REAL_HOME / "assets"


@pytest.fixture(scope="session")
def texts(shared_assets):
    from launcher.sources import assets

    return assets.texts()


@pytest.fixture
def launcher_home(tmp_path, shared_assets, monkeypatch) -> Path:
    """A fresh launcher home per test; the fetched assets and the converted embedded
    model are linked in so that tests don't refetch or reconvert them."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "assets").symlink_to(shared_assets)
    models = REAL_HOME / "models"
    models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(models)
    monkeypatch.setenv("SPARK_NVFP4_HOME", str(home))
    return home


def run_launcher(*args: str, env: dict | None = None, timeout: int = 900, check: bool = False,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"launcher {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def launcher():
    return run_launcher


def our_containers(client) -> list:
    return client.containers.list(all=True, filters={"label": "io.spark-nvfp4.run-id"})


def one_line_error(stderr: str) -> str:
    """The last error line, after checking the failure was reported the way users see it."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture(scope="session")
def ref_python() -> str:
    """ModelOpt run directly, outside any container: its own venv (same pins as the image)."""
    path = os.environ.get("SPARK_NVFP4_REF_PYTHON") or str(REPO / ".venv-mo" / "bin" / "python")
    need(Path(path).exists(), f"ModelOpt reference venv missing at {path}: run `make venvs`")
    return path


# --- pytest-docker: the loopback registry ------------------------------------------

_REF_TOOLS: dict = {}


def run_ref_tool(ref_python: str, script: str, *args, timeout: int = 600) -> None:
    """`REF_PY tests/tools/SCRIPT ARGS` (the tiny models' builders), forked from one process of the
    ModelOpt venv that imported torch and transformers once (tests/fork_server.py): ~5 s each."""
    if ref_python not in _REF_TOOLS:
        _REF_TOOLS[ref_python] = ForkServer(ref_python, "import torch, transformers, transformers.modeling_utils")
    rc, out, err, _, _ = _REF_TOOLS[ref_python].run("path", REPO / "tests" / "tools" / script, *args, timeout=timeout)
    if rc != 0:
        raise AssertionError(f"tests/tools/{script} failed ({rc}):\n{out[-2000:]}\n{err[-3000:]}")


def make_tiny_llama(ref_python: str, folder: Path, embedded_model_dir: Path, *dims: int) -> Path:
    """A small random Llama with the embedded model's tokenizer (tests/tools/make_tiny_llama.py;
    dims: layers and hidden size, else the tool's defaults)."""
    run_ref_tool(ref_python, "make_tiny_llama.py", folder, embedded_model_dir, *dims, timeout=300)
    return folder


@pytest.fixture(scope="session")
def tiny_model(ref_python, embedded_model_dir, tmp_path_factory):
    """tests/tools/tiny_moe.py's random model of a family (seed 0: the same weights every time),
    built once per session: tiny_model(kind) -> its folder. Read-only (quantize, eval and the
    tests only read it); several files quantize the same families."""
    made: dict[str, Path] = {}

    def build(kind: str) -> Path:
        if kind not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{kind}") / kind
            run_ref_tool(ref_python, "tiny_moe.py", kind, embedded_model_dir, folder)
            made[kind] = folder
        return made[kind]

    return build


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return "docker-compose" if shutil.which("docker-compose") else "docker compose"


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(REPO / "tests" / "docker-compose.yml")


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return "spark-nvfp4-tests"


@pytest.fixture(scope="session")
def docker_setup():
    """pytest-docker's default `up --build --wait` is unknown to docker-compose v1 (Debian's),
    which then prints its usage, exits 0 and starts nothing; `-d` works with both."""
    return ["up --build -d"]


@pytest.fixture(scope="session")
def registry(docker_client, docker_services) -> str:
    import urllib.request

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    docker_services.wait_until_responsive(check=up, timeout=60, pause=0.5)
    return REGISTRY


def wait_for(predicate, timeout: float, what: str, pause: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def latest_record(home: Path) -> dict:
    records = sorted((home / "runs").glob("*/record.json"))
    assert records, f"no run record under {home}"
    return json.loads(records[-1].read_text())


@pytest.fixture(scope="session")
def embedded_model_dir(shared_assets, standin_image, tmp_path_factory) -> Path:
    """The embedded model converted to bf16 safetensors (the payload does that on its
    first run; a tiny quantization triggers it when no test has yet)."""
    folder = REAL_HOME / "models" / EMBEDDED_DIRNAME
    if not (folder / "config.json").exists():
        out = tmp_path_factory.mktemp("convert") / "o"
        run_launcher("quantize", "--output", str(out), "--calib-samples", "2", "--calib-seq-len", "32",
                     "--no-eval", check=True, env={"SPARK_NVFP4_HOME": str(REAL_HOME)})
    return folder


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory, shared_assets, embedded_model_dir, standin_image) -> Path:
    """The embedded model quantized the cheapest way (ModelOpt's default recipe, 2 windows of 32
    tokens, no evaluation), once for the session, in its own home. Read-only: a test that writes
    into a checkpoint (eval writes its card and results) works on a copy."""
    base = tmp_path_factory.mktemp("small-ckpt")
    home = base / "home"
    home.mkdir()
    (home / "assets").symlink_to(shared_assets)
    (home / "models").symlink_to(REAL_HOME / "models")
    out = base / "smollm2-nvfp4"
    run_launcher("quantize", "--output", str(out), "--recipe", "default", "--calib-samples", "2",
                 "--calib-seq-len", "32", "--no-eval", env={"SPARK_NVFP4_HOME": str(home)}, check=True, timeout=600)
    return out


# --- ModelOpt run directly: the byte-for-byte reference of the e2e tests -----------------

E2E_SAMPLES, E2E_SEQ_LEN = 16, 256  # calibration of the e2e runs (the reference uses the same)


def raw_tensors(folder: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """Every tensor as (dtype, shape, raw bytes), straight from the safetensors layout:
    exact, and indifferent to dtypes numpy lacks (bfloat16, float8)."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        blob = shard.read_bytes()
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + n])
        for k, v in header.items():
            if k != "__metadata__":
                a, b = v["data_offsets"]
                out[k] = (v["dtype"], tuple(v["shape"]), blob[8 + n + a:8 + n + b])
    return out


@pytest.fixture(scope="session")
def modelopt_reference(embedded_model_dir, ref_python, texts, tmp_path_factory):
    """ModelOpt 0.47's default recipe on the embedded bf16 model, outside any container, as a
    function of the calibration batch: reference(batch_size) -> its folder (one run per batch
    size for the session). The batch is part of the calibration contract (docs/decisions.md)."""
    made: dict[int, Path] = {}

    def reference(batch_size: int) -> Path:
        if batch_size not in made:
            ref = tmp_path_factory.mktemp(f"modelopt-ref-b{batch_size}") / "ref"
            subprocess.run([ref_python, str(REPO / "tests" / "tools" / "modelopt_direct.py"),
                            str(embedded_model_dir), str(texts.calibration), str(E2E_SAMPLES), str(E2E_SEQ_LEN),
                            str(batch_size), str(ref)], check=True, capture_output=True, timeout=900)
            made[batch_size] = ref
        return made[batch_size]

    return reference


def assert_matches_reference(ours: Path, modelopt_reference) -> None:
    """The checkpoint equals ModelOpt run directly, calibrated with the batch the run used:
    first the proof that both fed the same windows in the same batch shapes and order, then
    every tensor byte for byte, input_scale included (same kernels on the same shapes give the
    same roundings, whatever the CPU)."""
    calib = json.loads((ours / "result.json").read_text())["calibration"]
    reference = modelopt_reference(calib["batch_size"])
    fed = json.loads((reference / "calibration.json").read_text())
    assert calib["batch_shapes"] == fed["batch_shapes"], (calib["batch_shapes"], fed["batch_shapes"])
    assert calib["windows_sha256"] == fed["windows_sha256"]
    got, want = raw_tensors(ours), raw_tensors(reference)
    assert set(got) == set(want) and len(got) > 800
    differ = [k for k, (dtype, shape, data) in got.items() if (dtype, shape, data) != want[k]]
    assert not differ, f"{len(differ)} tensors differ from ModelOpt run directly, e.g. {differ[:5]}"
    assert sum(k.endswith(".input_scale") for k in got) == 210  # 30 layers x 7 Linears, all compared
