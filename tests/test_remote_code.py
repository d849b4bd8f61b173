"""A model that ships its own code (`auto_map` in config.json) runs only with --trust-remote-code:
refused in one line on the host before any container starts, quantized and verified with it."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO, one_line_error, our_containers, run_launcher

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def custom_model(ref_python, tmp_path_factory, embedded_model_dir):
    folder = tmp_path_factory.mktemp("remote") / "tiny-custom"
    subprocess.run([ref_python, str(REPO / "tests" / "tools" / "tiny_remote_code.py"), str(folder),
                    str(embedded_model_dir)], check=True, capture_output=True, timeout=300)
    return folder


def test_refused_without_the_flag_before_any_container(custom_model, launcher_home, tmp_path, docker_client):
    before = {c.id for c in our_containers(docker_client)}
    proc = run_launcher("quantize", "--model", str(custom_model), "--output", str(tmp_path / "o"),
                        "--calib-samples", "4", "--calib-seq-len", "64", "--no-eval", timeout=300)
    assert proc.returncode == 5, proc.stderr[-2000:]
    line = one_line_error(proc.stderr)
    assert "ships its own Python code" in line and "--trust-remote-code" in line
    assert {c.id for c in our_containers(docker_client)} == before and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_quantized_and_verified_with_the_flag(custom_model, launcher_home, tmp_path, standin_image):
    out = tmp_path / "o"
    proc = run_launcher("quantize", "--model", str(custom_model), "--output", str(out), "--trust-remote-code",
                        "--calib-samples", "4", "--calib-seq-len", "64", "--no-eval", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verify: ok" in proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "NVFP4"
    assert config.get("auto_map", {}).get("AutoModelForCausalLM") == "modeling_tiny.TinyForCausalLM"
    # the code travels with the checkpoint, so an engine given trust_remote_code can load it
    assert (out / "modeling_tiny.py").is_file() and (out / "configuration_tiny.py").is_file()
