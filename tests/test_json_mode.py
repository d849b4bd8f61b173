"""`--json` for CI jobs: exactly one JSON object on stdout whatever the ending, with the exit code
the README's table gives, and the run's result.json once a record exists. The quantize and eval
successes are checked with the real stand-in in test_packaging.py and test_real_image.py; here the
failures, bugs and signals, most without Docker, the signals during a container with the stand-in."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, latest_record, run_launcher, wait_for
from synthetic_ckpt import make_checkpoint

from launcher.records.locks import lock_path

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


# ---------------------------------------------------------------- every ending is one object
# (issue 22, item 3): click's usage errors, a bug, Ctrl-C and SIGTERM at any moment.

@pytest.mark.parametrize("args, where", [
    (["quantize", "--calib-samples", "abc"], "--calib-samples"),   # a value of the wrong type
    (["quantize", "--no-such-flag"], "--no-such-flag"),            # an unknown option
    (["verify"], "CKPT"),                                          # a missing argument
    (["eval", "--tokens", "1"], "--tokens"),                       # out of click's range
])
def test_a_click_usage_error_is_one_object_with_exit_2(launcher_home, args, where):
    proc = run_launcher(*args, "--json", env=NO_DOCKER, timeout=60)
    out = _one_object(proc.stdout)
    assert proc.returncode == 2 == out["exit_code"] and out["status"] == "failed"
    assert out["error"]["kind"] == "ConfigError" and out["error"]["where"] == where
    assert out["command"] == args[0] and out["run_id"] is None
    assert "Usage:" in proc.stderr and "Traceback" not in proc.stderr  # people still get click's help


SHIM = '''\
# A test shim (tests/test_json_mode.py), loaded by Python at startup through PYTHONPATH; the
# launcher's own code is unchanged. It replaces one function of launcher.quantize.job to {what}.
import sys, time
import launcher.quantize.job

def _shimmed(*args, **kwargs):
    print("SHIM: reached {name}", file=sys.stderr, flush=True)
    {body}

launcher.quantize.job.{name} = _shimmed
'''
SIMULATED_BUG = 'raise RuntimeError("simulated bug\\nits second line")'
SLOW_STEP = "time.sleep(300)"


def _shim_env(tmp_path: Path, name: str, body: str) -> dict:
    """The environment that runs the launcher with launcher.quantize.job.NAME replaced by `body`: a bug
    (an exception nobody expected) or a slow step to interrupt at a known moment."""
    folder = tmp_path / "shim"
    folder.mkdir(exist_ok=True)
    what = "simulate a bug" if "raise" in body else "hold the run at a known moment"
    (folder / "sitecustomize.py").write_text(SHIM.format(what=what, name=name, body=body))
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


@pytest.fixture
def start(tmp_path):
    """Starts the launcher in the background (stdout and stderr to files); a launcher still
    running when the test ends (a failed wait) is killed, its containers then reaped."""
    started: list[subprocess.Popen] = []

    def _start(args: list[str], env: dict) -> tuple[subprocess.Popen, Path, Path]:
        out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        proc = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO,
                                stdout=out.open("w"), stderr=err.open("w"),
                                env={**os.environ, "COLUMNS": "200", **env},
                                # Ctrl-C as from a terminal: a suite started in the background by a
                                # script inherits SIGINT ignored, and Python then keeps ignoring it
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        started.append(proc)
        return proc, out, err

    yield _start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def _interrupt_at(marker: str, proc: subprocess.Popen, err: Path, sig: int, timeout: float = 300) -> None:
    wait_for(lambda: marker in err.read_text() or proc.poll() is not None, timeout, marker)
    assert proc.poll() is None, err.read_text()
    proc.send_signal(sig)
    proc.wait(timeout=120)


def _run_folder(home: Path) -> Path:
    (folder,) = (home / "runs").iterdir()
    return folder


def _no_container_of(docker_client, run_id: str) -> None:
    left = docker_client.containers.list(all=True, filters={"label": f"io.spark-nvfp4.run-id={run_id}"})
    assert not left, [c.name for c in left]


def test_a_bug_before_the_run_record_is_one_object_with_its_traceback_in_a_file(launcher_home, tmp_path):
    env = {**NO_DOCKER, **_shim_env(tmp_path, "check_calibration", SIMULATED_BUG)}
    proc = run_launcher("quantize", "--json", "--output", str(tmp_path / "o"), env=env, timeout=60)
    out = _one_object(proc.stdout)
    assert proc.returncode == 1 == out["exit_code"] and out["status"] == "failed" and out["run_id"] is None
    assert out["error"]["kind"] == "InternalError"
    assert out["error"]["message"] == "internal error: RuntimeError: simulated bug"  # one line, no traceback
    log = Path(out["error"]["where"])
    assert log.parent == launcher_home / "crashes"
    assert "Traceback" in log.read_text() and "its second line" in log.read_text()
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().splitlines()[-1].startswith("error: internal error")
    assert not (launcher_home / "runs").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_the_run_record_is_one_object_and_exit_130(launcher_home, tmp_path, start, sig):
    env = {**NO_DOCKER, **_shim_env(tmp_path, "check_calibration", SLOW_STEP)}
    proc, out, err = start(["quantize", "--json", "--output", str(tmp_path / "o")], env)
    _interrupt_at("SHIM: reached check_calibration", proc, err, sig)
    result = _one_object(out.read_text())
    assert proc.returncode == 130 == result["exit_code"] and result["status"] == "interrupted"
    assert result["error"]["kind"] == "Interrupted" and result["run_id"] is None
    assert result["error"]["message"] == f"interrupted ({'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'})"
    assert "Traceback" not in err.read_text() and not (launcher_home / "runs").exists()


def test_a_bug_after_the_run_record_ends_the_run_and_keeps_its_traceback_in_the_log(
        launcher_home, tmp_path, docker_client):
    output = tmp_path / "o"
    env = _shim_env(tmp_path, "job_inputs", SIMULATED_BUG)  # under the output lock
    proc = run_launcher("quantize", "--json", "--output", str(output), env=env, timeout=120)
    out = _one_object(proc.stdout)
    assert proc.returncode == 1 == out["exit_code"] and out["error"]["kind"] == "InternalError"
    folder = _run_folder(launcher_home)
    assert out["run_id"] == folder.name and out["error"]["where"] == str(folder / "log.txt")
    assert "Traceback" in (folder / "log.txt").read_text() and "Traceback" not in out["error"]["message"]
    assert json.loads((folder / "result.json").read_text()) == out
    assert latest_record(launcher_home)["status"] == "failed"
    assert not lock_path(output).exists() and not output.exists()
    _no_container_of(docker_client, folder.name)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_run_record_before_any_container_ends_the_run(launcher_home, tmp_path, start,
                                                                         docker_client, sig):
    output = tmp_path / "o"
    env = _shim_env(tmp_path, "job_inputs", SLOW_STEP)  # the record exists, the lock is held
    proc, out, err = start(["quantize", "--json", "--output", str(output)], env)
    _interrupt_at("SHIM: reached job_inputs", proc, err, sig, timeout=120)
    result = _one_object(out.read_text())
    assert proc.returncode == 130 == result["exit_code"] and result["status"] == "interrupted"
    folder = _run_folder(launcher_home)
    assert result["run_id"] == folder.name and json.loads((folder / "result.json").read_text()) == result
    assert latest_record(launcher_home)["status"] == "interrupted"
    assert not lock_path(output).exists() and not output.exists()
    assert "Traceback" not in err.read_text()
    _no_container_of(docker_client, folder.name)


@pytest.mark.timeout(1800)  # 1-2 min on an idle machine; far more under load
def test_sigterm_during_the_container_run_is_one_object_and_exit_130(launcher_home, tmp_path, start, docker_client,
                                                                     standin_image, embedded_model_dir, texts):
    calib = tmp_path / "calib.txt"  # enough windows that calibration takes a while
    calib.write_text(texts.heldout_brown.read_text()[:400_000])
    output = tmp_path / "o"
    proc, out, err = start(["quantize", "--json", "--output", str(output), "--calib", str(calib),
                            "--calib-samples", "400", "--calib-seq-len", "128", "--calib-batch-size", "1",
                            "--no-eval"], {})

    def calibrating():
        logs = list((launcher_home / "runs").glob("*/log.txt"))
        return proc.poll() is not None or (logs and '"stage": "calibrate", "done": 2' in logs[0].read_text())

    wait_for(calibrating, 1500, "calibration to start")
    assert proc.poll() is None, err.read_text()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    result = _one_object(out.read_text())
    assert proc.returncode == 130 == result["exit_code"] and result["status"] == "interrupted"
    folder = _run_folder(launcher_home)
    assert json.loads((folder / "result.json").read_text()) == result
    assert "container was stopped and removed" in result["error"]["message"]
    assert latest_record(launcher_home)["status"] == "interrupted" and not output.exists()
    _no_container_of(docker_client, folder.name)


@pytest.mark.timeout(1800)  # a quantization, then an evaluation: 2-3 min idle, 10 under load
def test_ctrl_c_during_the_quick_evaluation_is_an_interrupt_and_keeps_the_checkpoint(
        launcher_home, tmp_path, start, docker_client, standin_image, embedded_model_dir):
    """Issue 22, item 9: it was "evaluation failed, the checkpoint is fine" and exit 0."""
    output = tmp_path / "o"
    proc, out, err = start(["quantize", "--json", "--output", str(output), "--calib-samples", "2",
                            "--calib-seq-len", "32"], {})

    def evaluating():  # the eval run's container is running: its log has the payload's first lines
        if proc.poll() is not None:
            return True
        for rec in (launcher_home / "runs").glob("*/record.json"):
            data = json.loads(rec.read_text())
            log = rec.parent / "log.txt"
            if data["command"] == "eval" and data["created"]["containers"] and log.exists() and log.stat().st_size:
                return data["id"]
        return None

    eval_id = wait_for(evaluating, 1500, "the quick evaluation's container")
    assert proc.poll() is None, err.read_text()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    result = _one_object(out.read_text())
    assert proc.returncode == 130 == result["exit_code"] and result["status"] == "interrupted"
    assert result["error"]["kind"] == "Interrupted" and "checkpoint itself is complete" in result["error"]["message"]
    assert "evaluation failed" not in err.read_text() and "Traceback" not in err.read_text()
    quantize_run = result["run_id"]
    assert json.loads((launcher_home / "runs" / quantize_run / "result.json").read_text()) == result
    # the checkpoint was verified and promoted before the evaluation: it stays, complete
    assert result["output"] == str(output) and result["sizes"]["checkpoint_bytes"] > 0
    assert json.loads((output / "result.json").read_text())["status"] == "complete"
    assert run_launcher("verify", str(output), env=NO_DOCKER, timeout=120).returncode == 0
    assert json.loads((launcher_home / "runs" / eval_id / "record.json").read_text())["status"] == "interrupted"
    for run_id in (quantize_run, eval_id):
        _no_container_of(docker_client, run_id)
