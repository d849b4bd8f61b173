"""A model that ships its own code (`auto_map` in config.json) runs only with --trust-remote-code,
in every command that loads it in a container (quantize, eval, serve): refused in one line on the
host before any container starts, and with the flag its code is imported in the container."""
from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from conftest import latest_record, one_line_error, our_containers, run_launcher, run_ref_tool

pytestmark = pytest.mark.docker

CALIB = ("--calib-samples", "4", "--calib-seq-len", "64")
EVAL = ("--tokens", "128", "--seq-len", "64", "--no-generations")


@pytest.fixture(scope="module")
def custom_model(ref_python, tmp_path_factory, embedded_model_dir):
    folder = tmp_path_factory.mktemp("remote") / "tiny-custom"
    run_ref_tool(ref_python, "tiny_remote_code.py", folder, embedded_model_dir, timeout=300)
    return folder


@pytest.fixture(scope="module")
def quantized(custom_model, tmp_path_factory, shared_assets, standin_image):
    """One quantization with the flag, its quick evaluation included (the same rule for it)."""
    home = tmp_path_factory.mktemp("remote-home")
    (home / "assets").symlink_to(shared_assets)
    out = tmp_path_factory.mktemp("remote-out") / "o"
    proc = run_launcher("quantize", "--model", str(custom_model), "--output", str(out), "--trust-remote-code",
                        *CALIB, env={"SPARK_NVFP4_HOME": str(home)}, timeout=900)
    return out, home, proc


def refused(proc, docker_client, before: set) -> None:
    assert proc.returncode == 5, proc.stderr[-2000:]
    line = one_line_error(proc.stderr)
    assert "ships its own Python code" in line and "--trust-remote-code" in line
    assert {c.id for c in our_containers(docker_client)} == before


def test_refused_without_the_flag_before_any_container(custom_model, launcher_home, tmp_path, docker_client):
    before = {c.id for c in our_containers(docker_client)}
    proc = run_launcher("quantize", "--model", str(custom_model), "--output", str(tmp_path / "o"),
                        *CALIB, "--no-eval", timeout=300)
    refused(proc, docker_client, before)
    assert not (tmp_path / "o").exists()


def test_eval_and_serve_refused_without_the_flag(custom_model, launcher_home, tmp_path, docker_client):
    """The model as checkpoint and as reference (eval loads both); serve loads the checkpoint."""
    before = {c.id for c in our_containers(docker_client)}
    refused(run_launcher("eval", str(custom_model), "--reference", str(custom_model), *EVAL,
                         "--json-out", str(tmp_path / "e.json"), timeout=300), docker_client, before)
    assert not (tmp_path / "e.json").exists()
    refused(run_launcher("serve", str(custom_model), "--port", str(free_port()), timeout=300), docker_client, before)


@pytest.mark.slow
def test_quantized_evaluated_and_verified_with_the_flag(quantized):
    out, _, proc = quantized
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verify: ok" in proc.stderr and "quality: KL" in proc.stderr, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "NVFP4"
    assert config.get("auto_map", {}).get("AutoModelForCausalLM") == "modeling_tiny.TinyForCausalLM"
    # the code travels with the checkpoint, so an engine given trust_remote_code can load it
    assert (out / "modeling_tiny.py").is_file() and (out / "configuration_tiny.py").is_file()
    assert "What quantization cost" in (out / "README.md").read_text()


@pytest.mark.slow
def test_eval_with_the_flag(quantized, custom_model, tmp_path):
    out, home, proc = quantized
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused_first = run_launcher("eval", str(out), "--reference", str(custom_model), *EVAL, timeout=300,
                                 env={"SPARK_NVFP4_HOME": str(home)})
    assert refused_first.returncode == 5  # the checkpoint carries the code too
    result = tmp_path / "e.json"
    proc = run_launcher("eval", str(out), "--reference", str(custom_model), *EVAL, "--json-out", str(result),
                        "--trust-remote-code", env={"SPARK_NVFP4_HOME": str(home)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(result.read_text())
    assert r["format"]["quantized"] and r["windows"] == 2 and 0 < r["kl_divergence"] < 5  # 128 tokens in 64s


@pytest.mark.slow
def test_serve_with_the_flag(quantized, docker_client, standin_image):
    out, home, _ = quantized
    env = {"SPARK_NVFP4_HOME": str(home)}
    port = free_port()
    proc = run_launcher("serve", str(out), "--port", str(port), "--image", standin_image, "--timeout", "240",
                        "--api-key", "k" * 32, "--trust-remote-code", env=env, timeout=420)
    assert proc.returncode == 0, proc.stdout + proc.stderr   # (a failed serve removes its container)
    rec = latest_record(home)
    try:
        assert rec["command"] == "serve" and rec["status"] == "complete" and "answer:" in proc.stdout
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer " + "k" * 32})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as r:
            assert json.loads(r.read())["data"][0]["emulation"]["algo"] == "NVFP4"
    finally:
        rb = run_launcher("rollback", rec["id"], "--yes", env=env, timeout=120)
    assert rb.returncode == 0, rb.stdout + rb.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
