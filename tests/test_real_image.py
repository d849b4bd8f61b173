"""The image users really have is older than our stand-in. These tests run the launcher on the
2025 stand-in (`make image-2025`: transformers 4.57, ModelOpt 0.37, numpy below 2, root), whose
ModelOpt cannot export NVFP4 without CUDA, as NVIDIA's spark-single-gpu-dev image would on a CPU.

Everything is real: the daemon, both stand-in images, pip against PyPI for the derived image,
ModelOpt 0.47 run directly as the reference. The tests run in file order and share one
launcher home, as a user's runs would.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import (E2E_SAMPLES, E2E_SEQ_LEN, STANDIN, assert_matches_reference, one_line_error, our_containers,
                      run_launcher)
from conftest import OLD_STANDIN as OLD

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CALIB = ["--recipe", "default", "--calib-samples", str(E2E_SAMPLES), "--calib-seq-len", str(E2E_SEQ_LEN)]


@pytest.fixture(scope="module")
def home(tmp_path_factory, shared_assets, embedded_model_dir):
    """One launcher home for the module. The embedded model is converted already (conftest)."""
    from conftest import REAL_HOME

    h = tmp_path_factory.mktemp("home-2025")
    (h / "assets").symlink_to(shared_assets)
    (h / "models").symlink_to(REAL_HOME / "models")
    return h


@pytest.fixture(scope="module")
def derived_tag(docker_client, old_image) -> str:
    from launcher.containers import derived_image

    return derived_image.tag_for(docker_client.images.get(old_image).id)


def _out(home, name: str):
    """An output folder beside the launcher's home (never inside it: the launcher refuses that)."""
    return home.parent / f"{home.name}-outputs" / name


def _launch(home, *args, env=None, timeout=1500):
    return run_launcher(*args, env={"SPARK_NVFP4_HOME": str(home), **(env or {})}, timeout=timeout)


def _ours(docker_client, home) -> list:
    """Containers of this module's runs (other suites may run beside it)."""
    return [c for c in our_containers(docker_client)
            if (home / "runs" / c.labels["io.spark-nvfp4.run-id"]).exists()]


def _probe(ref: str) -> dict:
    proc = subprocess.run(["docker", "run", "--rm", "--network", "none", ref, "python3", "-c",
                           "import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: d.version "
                           "for d in m.distributions()}))"], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_doctor_prints_the_probe_of_both_stand_ins(home, old_image, standin_image):
    wide = {"COLUMNS": "500"}  # one table row a line
    old = _launch(home, "doctor", "--image", old_image, env=wide)
    new = _launch(home, "doctor", "--image", standin_image, env=wide)
    assert old.returncode == 0 and new.returncode == 0, old.stderr + new.stderr
    assert "transformers 4.57.1, ModelOpt 0.37.0" in old.stdout and "default user root" in old.stdout
    assert "transformers 5.14.1, ModelOpt 0.47.0" in new.stdout
    # the requirement set, next to the probe: 0.37 cannot export NVFP4 without CUDA
    assert "nvidia-modelopt 0.37.0 < 0.47 to export without CUDA" in old.stdout
    assert "runs as is" in new.stdout and "smooth-gptq-seq-mp" in new.stdout.split("runs as is")[1].split("\n")[0]


def test_no_image_upgrade_fails_before_loading_weights(home, old_image, docker_client):
    proc = _launch(home, "quantize", "--image", old_image, "--no-image-upgrade", "--no-eval",
                   "--output", str(_out(home, "out-refused")), *CALIB)
    assert proc.returncode == 4
    line = one_line_error(proc.stderr)
    assert "nvidia-modelopt 0.37.0 < 0.47 to export without CUDA" in line and "--no-image-upgrade" in line
    assert "calibrate" not in proc.stderr and "load" not in proc.stderr.replace("download", "")
    assert not (_out(home, "out-refused")).exists()
    assert not _ours(docker_client, home)


def test_without_network_and_without_the_derived_image_one_line_and_nothing_left(home, old_image, derived_tag,
                                                                                docker_client):
    """No route to the package index (pip is pointed at a closed loopback port; nothing else
    on the machine is touched): the derived image cannot be built."""
    from docker.errors import ImageNotFound

    try:
        docker_client.images.remove(derived_tag)  # an earlier session's build: this test needs none
    except ImageNotFound:
        pass
    images_before = {i.id for i in docker_client.images.list(all=True)}
    out = _out(home, "out-offline")
    proc = _launch(home, "quantize", "--image", old_image, "--no-eval", "--output", str(out), *CALIB,
                   env={"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0"})
    assert proc.returncode == 4
    line = one_line_error(proc.stderr)
    assert "could not build the derived image" in line and "launcher image prepare" in line
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))
    assert not _ours(docker_client, home)
    assert {i.id for i in docker_client.images.list(all=True)} == images_before  # not even a dangling layer
    offline = _launch(home, "quantize", "--image", old_image, "--offline", "--no-eval", "--output", str(out), *CALIB)
    assert offline.returncode == 4 and "--offline forbids building" in one_line_error(offline.stderr)


@pytest.fixture(scope="module")
def old_run(home, old_image, derived_tag, docker_client):
    """`launcher quantize --image <2025 stand-in>`: derives the image, then quantizes in it."""
    base_id = docker_client.images.get(old_image).id
    base_probe = _probe(old_image)
    out = _out(home, "out-2025")
    proc = _launch(home, "quantize", "--image", old_image, "--no-eval", "--output", str(out), *CALIB)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "proc": proc, "base_id": base_id, "base_probe": base_probe}


def test_derives_the_image_with_progress_and_labels(old_run, derived_tag, docker_client, home):
    assert f"deriving {derived_tag}" in old_run["proc"].stderr
    img = docker_client.images.get(derived_tag)
    assert img.labels["io.spark-nvfp4.role"] == "derived-image"
    assert img.labels["io.spark-nvfp4.base-image-id"] == old_run["base_id"]
    records = [json.loads(p.read_text()) for p in (home / "runs").glob("*/record.json")]
    built = [r for r in records if derived_tag in r["created"]["images"]]
    assert len(built) == 1 and built[0]["image"] == derived_tag
    # the history names the build script, never a pip setting or certificate
    history = json.dumps(img.history())
    assert "build.sh" in history and "PIP_CERT" not in history and "BEGIN CERTIFICATE" not in history


def test_checkpoint_matches_modelopt_047_run_directly_and_verifies(old_run, modelopt_reference, home):
    result = json.loads((old_run["out"] / "result.json").read_text())
    assert result["versions"]["transformers"] == "4.57.1" and result["versions"]["modelopt"] == "0.47.0"
    assert_matches_reference(old_run["out"], modelopt_reference)
    proc = _launch(home, "verify", str(old_run["out"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_derived_image_keeps_the_base_stack(old_run, derived_tag, docker_client, home):
    after = _probe(derived_tag)
    before = old_run["base_probe"]
    for dist in ("torch", "numpy", "transformers", "safetensors"):
        assert after[dist] == before[dist], dist
    assert before["nvidia-modelopt"] == "0.37.0" and after["nvidia-modelopt"] == "0.47.0"
    # and the user's image itself is untouched
    assert docker_client.images.get(OLD).id == old_run["base_id"]
    assert _probe(OLD)["nvidia-modelopt"] == "0.37.0"


def test_second_run_reuses_the_derived_image(old_run, derived_tag, docker_client, home):
    image_id = docker_client.images.get(derived_tag).id
    proc = _launch(home, "quantize", "--image", OLD, "--no-eval", "--output", str(_out(home, "out-2025-b")),
                   "--recipe", "default", "--calib-samples", "2", "--calib-seq-len", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"using {derived_tag}" in proc.stderr and "deriving" not in proc.stderr
    assert docker_client.images.get(derived_tag).id == image_id


@pytest.fixture(scope="module")
def new_run(home, standin_image):
    """The new stand-in with --no-image-upgrade: it has what every recipe needs, so it runs."""
    out = _out(home, "out-new")
    proc = _launch(home, "quantize", "--image", standin_image, "--no-image-upgrade", "--no-eval",
                   "--output", str(out), "--recipe", "default", "--calib-samples", "2", "--calib-seq-len", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deriving" not in proc.stderr
    return out


def test_old_transformers_loads_the_outputs_tokenizer_and_config(old_run, new_run, embedded_model_dir):
    """transformers 4.57 (the serving image's) reads what transformers 4.57 and 5.14 wrote,
    and the embedded model's converted folder, with the model's own rotary base (100000)."""
    code = ("import sys; from transformers import AutoConfig, AutoTokenizer\n"
            "for d in sys.argv[1:]:\n"
            "    t = AutoTokenizer.from_pretrained(d); c = AutoConfig.from_pretrained(d)\n"
            "    assert t('Hello world')['input_ids'] and c.model_type == 'llama', d\n"
            # 4.57 reads no rope_parameters (5.x's): a config with only those would run at its default base
            "    want = (getattr(c, 'rope_parameters', None) or {}).get('rope_theta', c.rope_theta)\n"
            "    assert c.rope_theta == want == 100000, (d, c.rope_theta, want)\n"
            "    print('ok', d, type(t).__name__)\n")
    folders = {"/a": old_run["out"], "/b": new_run, "/c": embedded_model_dir}
    mounts = [x for target, src in folders.items() for x in ("-v", f"{src}:{target}:ro")]
    proc = subprocess.run(["docker", "run", "--rm", "--network", "none", *mounts, OLD, "python3", "-c", code,
                           *folders], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("ok ") == 3
    for d in (old_run["out"], new_run):
        assert json.loads((d / "tokenizer_config.json").read_text())["tokenizer_class"] != "TokenizersBackend"


@pytest.mark.timeout(1800)  # a quantization and an evaluation (and, run alone, the module's first run too)
def test_modelopt_library_recipe_runs_in_the_derived_image(old_run, derived_tag, home):
    """One of ModelOpt's own YAML recipes (0.45+: the 2025 image has none, its derived image
    has 0.47's library), through the same export, verify and an evaluation in the same image
    (a short one: `launcher eval` with few tokens, instead of quantize's 2048-token check)."""
    out = _out(home, "out-yaml")
    proc = _launch(home, "quantize", "--image", OLD, "--output", str(out), "--recipe",
                   "general/ptq/nvfp4_default-kv_fp8_cast", "--calib-samples", "4", "--calib-seq-len", "64",
                   "--no-eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"using {derived_tag}" in proc.stderr and "verify: ok" in proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["recipe"] == "general/ptq/nvfp4_default-kv_fp8_cast" and result["modelopt_preset"] == "modelopt-recipe"
    hf = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4" and hf["kv_cache_quant_algo"] == "FP8"
    ev_proc = _launch(home, "eval", str(out), "--image", derived_tag, "--tokens", "512", "--seq-len", "128",
                      "--no-generations", "--json")
    assert ev_proc.returncode == 0, ev_proc.stderr[-3000:]
    ev = json.loads(ev_proc.stdout)   # --json: the run's result object
    assert ev["status"] == "complete" and 0 < ev["quality"]["kl_divergence"] < 5
    assert json.loads((out / "eval.json").read_text())["kl_divergence"] == ev["quality"]["kl_divergence"]


def test_rollback_removes_the_derived_image_and_keeps_the_users(old_run, new_run, derived_tag, docker_client,
                                                               home):
    base_id = docker_client.images.get(OLD).id
    dry = _launch(home, "rollback", "--all", "--images", "--dry-run")
    assert dry.returncode == 0 and derived_tag in dry.stdout + dry.stderr
    proc = _launch(home, "rollback", "--all", "--images", "--yes")
    assert proc.returncode == 0, proc.stderr
    from docker.errors import ImageNotFound

    with pytest.raises(ImageNotFound):
        docker_client.images.get(derived_tag)
    assert docker_client.images.get(OLD).id == base_id
    assert docker_client.images.get(STANDIN).id  # the images the runs did not create stay
