"""Failure paths: each ends in one error line, a non-zero exit, no container left
behind and no output folder that looks complete. Real daemon, real image, real payload."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, latest_record, one_line_error, our_containers, run_launcher, wait_for

pytestmark = pytest.mark.docker


def _nothing_left(client, home: Path, output: Path):
    runs = [json.loads(p.read_text())["id"] for p in (home / "runs").glob("*/record.json")]
    left = [c for c in our_containers(client) if c.labels.get("io.spark-nvfp4.run-id") in runs]
    assert not left, f"containers left behind: {left}"
    assert not output.exists(), "an output folder appeared for a failed run"


def test_daemon_not_running(launcher_home, tmp_path):
    out = tmp_path / "o"
    proc = run_launcher("quantize", "--output", str(out), env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert proc.returncode == 3
    line = one_line_error(proc.stderr)
    assert "cannot reach the Docker daemon" in line and "start it" in line
    assert not out.exists()


def test_image_absent_and_registry_unreachable(launcher_home, tmp_path, docker_client):
    out = tmp_path / "o"
    # Port 9 (discard) on loopback: nothing listens, the pull is refused at once.
    proc = run_launcher("quantize", "--output", str(out),
                        "--image", "127.0.0.1:9/nvidia/tensorrt-llm/release:spark-single-gpu-dev")
    assert proc.returncode == 4
    line = one_line_error(proc.stderr)
    assert "registry unreachable" in line and "127.0.0.1:9" in line
    _nothing_left(docker_client, launcher_home, out)


def test_model_path_missing(launcher_home, tmp_path, docker_client):
    out = tmp_path / "o"
    proc = run_launcher("quantize", "--model", str(tmp_path / "nope"), "--output", str(out))
    assert proc.returncode == 5
    assert "model folder does not exist" in one_line_error(proc.stderr)
    _nothing_left(docker_client, launcher_home, out)


def test_invalid_value_names_the_field(launcher_home, tmp_path):
    proc = run_launcher("quantize", "--calib-seq-len", "3", "--output", str(tmp_path / "o"))
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert "calibration.seq_len" in line and "--calib-seq-len" in line


def test_payload_failure_is_one_line(launcher_home, tmp_path, docker_client, standin_image):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Far too little text to calibrate on.")
    out = tmp_path / "o"
    proc = run_launcher("quantize", "--output", str(out), "--calib", str(tiny), "--no-eval")
    assert proc.returncode == 7
    line = one_line_error(proc.stderr)
    assert "payload failed: calibration text has" in line and "log.txt" in line
    assert latest_record(launcher_home)["status"] == "failed"
    _nothing_left(docker_client, launcher_home, out)


def test_gpu_only_recipe_on_cpu_is_one_line(launcher_home, tmp_path, docker_client, standin_image):
    # The stand-in has no GPU: ModelOpt's AWQ search would die mid-calibration with an assertion.
    out = tmp_path / "o"
    proc = run_launcher("quantize", "--output", str(out), "--recipe", "awq-lite", "--calib-samples", "2",
                        "--calib-seq-len", "32", "--no-eval")
    assert proc.returncode == 7
    line = one_line_error(proc.stderr)
    assert "recipe 'awq-lite' needs a GPU" in line and "gptq-aa-mp" in line and "default" in line
    assert "amax must be a CUDA tensor" not in proc.stderr
    _nothing_left(docker_client, launcher_home, out)


@pytest.fixture
def long_calibration(tmp_path, texts) -> Path:
    """Enough windows that calibration takes a while, on a small file (fast to tokenize)."""
    path = tmp_path / "calib.txt"
    path.write_text(texts.heldout_brown.read_text()[:400_000])
    return path


def _start_and_wait_for_calibration(home: Path, out: Path, calib: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "quantize", "--output", str(out), "--calib", str(calib),
                             "--calib-samples", "400", "--calib-seq-len", "128", "--calib-batch-size", "1",
                             "--no-eval"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SPARK_NVFP4_HOME": str(home)},
                            # Ctrl-C as from a terminal: a suite started in the background by a
                            # script inherits SIGINT ignored, and Python then keeps ignoring it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def calibrating():
        logs = list((home / "runs").glob("*/log.txt"))
        return logs and '"stage": "calibrate", "done": 2' in logs[0].read_text()

    wait_for(calibrating, 600, "calibration to start")
    return proc


def test_container_killed_137(launcher_home, tmp_path, docker_client, standin_image, long_calibration):
    out = tmp_path / "o"
    proc = _start_and_wait_for_calibration(launcher_home, out, long_calibration)
    run_id = latest_record(launcher_home)["id"]
    (box,) = docker_client.containers.list(filters={"label": f"io.spark-nvfp4.run-id={run_id}"})
    box.kill()  # SIGKILL, as the kernel's OOM killer would
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 8
    line = one_line_error(stderr)
    assert "exit 137" in line and "memory" in line
    _nothing_left(docker_client, launcher_home, out)


def test_ctrl_c_during_calibration(launcher_home, tmp_path, docker_client, standin_image, long_calibration):
    out = tmp_path / "o"
    proc = _start_and_wait_for_calibration(launcher_home, out, long_calibration)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted" in one_line_error(stderr)
    assert latest_record(launcher_home)["status"] == "interrupted"
    _nothing_left(docker_client, launcher_home, out)
    assert not list(tmp_path.glob(".o.partial-*")) or latest_record(launcher_home)["created"]["partials"]


@pytest.mark.parametrize("name", ["x[/]y", "[bold]z", "a[red]b[/red]c"])
def test_output_with_rich_markup_is_printed_verbatim(launcher_home, tmp_path, standin_image, name):
    # `x[/]y` was a MarkupError traceback after the run record existed; `[bold]z` printed as `z`
    out = tmp_path / name
    proc = run_launcher("quantize", "--dry-run", "--output", str(out), timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"-> {out}\n" in proc.stderr and proc.stdout.strip() == str(out)
    assert not list((launcher_home / "runs").glob("*/record.json"))  # a dry run ends and leaves no record


def test_killed_during_the_first_conversion_leaves_no_staging(launcher_home, tmp_path, docker_client, standin_image):
    # models/ of its own (launcher_home links the shared one, which holds the conversion already): the
    # first run converts the embedded GGUF into a staging folder under models/. Killed there, the run
    # used to leave that folder (and its half-written temporary) behind, a new one each time.
    from launcher.sources.model_source import EMBEDDED_DIRNAME

    home = launcher_home
    (home / "models").unlink()
    (home / "models").mkdir()
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "quantize", "--output", str(out), "--no-eval"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def converting():
        logs = list((home / "runs").glob("*/log.txt"))
        return logs and "to bf16 safetensors (once)" in logs[0].read_text()

    wait_for(converting, 300, "the conversion to start")
    run_id = latest_record(home)["id"]
    (box,) = docker_client.containers.list(filters={"label": f"io.spark-nvfp4.run-id={run_id}"})
    box.kill()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 8 and "exit 137" in one_line_error(stderr), stderr
    assert sorted(p.name for p in (home / "models").iterdir()) == [], list((home / "models").iterdir())
    _nothing_left(docker_client, home, out)

    # A run that fails after a whole conversion (too little calibration text) keeps the conversion
    # (the payload renames it into place only when complete) and still leaves no staging folder.
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Far too little text to calibrate on.")
    proc = run_launcher("quantize", "--output", str(out), "--calib", str(tiny), "--no-eval")
    assert proc.returncode == 7, proc.stderr
    assert sorted(p.name for p in (home / "models").iterdir()) == [EMBEDDED_DIRNAME]
    assert (home / "models" / EMBEDDED_DIRNAME / "config.json").is_file()
    _nothing_left(docker_client, home, out)
