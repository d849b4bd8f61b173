"""`--json` for CI jobs: exactly one JSON object on stdout, success or failure, with the exit code
the README's table gives. No Docker needed here (the quantize and eval successes are checked with
the real stand-in in test_packaging.py and test_real_image.py)."""
from __future__ import annotations

import json
import shutil

from conftest import run_launcher
from synthetic_ckpt import make_checkpoint

NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def _one_object(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def test_a_config_error_is_one_object_with_its_kind_and_exit_code(launcher_home, tmp_path):
    proc = run_launcher("quantize", "--recipe", "smooth", "--recipe-param", "gptq.ridge=3", "--json",
                        "--output", str(tmp_path / "o"), env=NO_DOCKER, timeout=60)
    out = _one_object(proc.stdout)
    assert proc.returncode == 2 == out["exit_code"]
    assert out["status"] == "failed" and out["error"]["kind"] == "ConfigError"
    assert "has no step 'gptq'" in out["error"]["message"] and out["error"]["where"] == "--recipe-param"


def test_docker_unreachable_is_one_object_with_exit_3(launcher_home, tmp_path):
    proc = run_launcher("quantize", "--json", "--output", str(tmp_path / "o"), env=NO_DOCKER, timeout=60)
    out = _one_object(proc.stdout)
    assert proc.returncode == 3 == out["exit_code"] and out["error"]["kind"] == "DockerUnavailable"


def test_verify_json_valid_and_invalid(tmp_path):
    good = make_checkpoint(tmp_path / "good")
    proc = run_launcher("verify", str(good), "--json", env=NO_DOCKER, timeout=60)
    out = _one_object(proc.stdout)
    assert proc.returncode == 0 == out["exit_code"] and out["status"] == "valid" and not out["problems"]

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "hf_quant_config.json").write_text("{not json")
    proc = run_launcher("verify", str(bad), "--json", env=NO_DOCKER, timeout=60)
    out = _one_object(proc.stdout)
    assert proc.returncode == 9 == out["exit_code"] and out["status"] == "invalid" and out["problems"]
