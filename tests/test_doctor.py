"""`launcher doctor` against the real daemon: each failing condition is made real
(a daemon address with nothing behind it, this machine's missing NVIDIA runtime, a
model bigger than the disk, an empty Hugging Face home) and its row is read from the
table the user sees.

The NVIDIA runtime itself cannot exist on these CPU machines, so the GPU row is never
reached here; its parser and the compute-capability -> FP4 mapping are unit-tested on
real nvidia-smi output lines instead.
"""
from __future__ import annotations

import json
import os

import pytest

from conftest import one_line_error, run_launcher
from launcher.doctor import Gpu, fp4_support, parse_gpus

WIDE = {"COLUMNS": "400"}  # one table row per line: no cell wraps


def rows(stdout: str) -> dict[str, str]:
    """check name -> the rest of its table line."""
    names = ("Docker daemon", "NVIDIA runtime", "GPU", "image", "Hugging Face token", "model", "output",
             "disk (output)", "disk (model download)", "memory", "disk / memory")
    out = {}
    for line in stdout.splitlines():
        s = line.strip()
        for n in sorted(names, key=len, reverse=True):
            if s.startswith(n + " "):
                out.setdefault(n, s[len(n):].strip())
                break
    return out


def status(row: str) -> str:
    return row.split()[0]


# ---------------------------------------------------------------- real daemon, real conditions

def test_daemon_down(launcher_home, tmp_path):
    proc = run_launcher("doctor", "--output", str(tmp_path / "o"),
                        env={**WIDE, "DOCKER_HOST": "unix:///nonexistent"}, timeout=120)
    assert proc.returncode == 6, proc.stderr
    assert "doctor:" in one_line_error(proc.stderr) and "Docker daemon" in one_line_error(proc.stderr)
    r = rows(proc.stdout)
    assert status(r["Docker daemon"]) == "FAIL"
    assert "cannot reach the Docker daemon" in r["Docker daemon"]
    assert "unix:///nonexistent" in r["Docker daemon"] and "start it" in r["Docker daemon"]
    # what needs the daemon says so instead of failing for its own reasons
    for name in ("NVIDIA runtime", "GPU", "image"):
        assert status(r[name]) == "skip" and "Docker daemon" in r[name]


def test_output_quantize_would_refuse_fails_its_row(launcher_home, tmp_path):
    # the same check as quantize's (destination.py): "disk ok" alone said nothing about /etc/hostname/x
    for out, needle in (("/etc/hostname/x", "which is a file, not a folder"), ("/proc/x", "kernel's proc")):
        proc = run_launcher("doctor", "--output", out, env={**WIDE, "DOCKER_HOST": "unix:///nonexistent"},
                            timeout=120)
        assert proc.returncode == 6 and "Traceback" not in proc.stderr, proc.stderr
        r = rows(proc.stdout)
        assert status(r["output"]) == "FAIL" and needle in r["output"], proc.stdout
    proc = run_launcher("doctor", "--output", str(tmp_path / "o"), env={**WIDE, "DOCKER_HOST": "unix:///nonexistent"},
                        timeout=120)
    assert status(rows(proc.stdout)["output"]) == "ok" and not list(tmp_path.glob(".spark-nvfp4-probe-*"))


@pytest.mark.docker
def test_no_nvidia_runtime_standin(launcher_home, tmp_path, docker_client, standin_image):
    assert "nvidia" not in (docker_client.info().get("Runtimes") or {}), "this test expects a CPU machine"
    proc = run_launcher("doctor", "--image", standin_image, "--output", str(tmp_path / "o"), env=WIDE,
                        timeout=120)
    r = rows(proc.stdout)
    row = r["NVIDIA runtime"]
    # with the CPU stand-in the flow works without a GPU: a warning, not a failure
    assert status(row) == "warn" and "no 'nvidia' runtime" in row
    assert "nvidia-container-toolkit" in row and "stand-in" in row
    assert status(r["GPU"]) == "skip"
    assert status(r["image"]) == "ok" and "CPU stand-in" in r["image"]
    assert status(r["Docker daemon"]) == "ok"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.docker
def test_no_nvidia_runtime_gpu_image_unreachable(launcher_home, tmp_path, docker_client):
    # A GPU image without the runtime is a failure; and an image that is not here and
    # whose registry does not answer (port 9 on loopback: refused at once) is another.
    ref = "127.0.0.1:9/nvidia/tensorrt-llm/release:spark-single-gpu-dev"
    proc = run_launcher("doctor", "--image", ref, "--output", str(tmp_path / "o"), env=WIDE, timeout=120)
    assert proc.returncode == 6
    line = one_line_error(proc.stderr)
    assert "NVIDIA runtime" in line and "image" in line
    r = rows(proc.stdout)
    assert status(r["NVIDIA runtime"]) == "FAIL" and "nvidia-container-toolkit" in r["NVIDIA runtime"]
    assert status(r["image"]) == "FAIL" and "unreachable" in r["image"] and "127.0.0.1:9" in r["image"]
    assert not any(ref in t for i in docker_client.images.list() for t in i.tags), "doctor must not pull"


def test_disk_too_small(launcher_home, tmp_path):
    model = tmp_path / "huge-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    weights = model / "model.safetensors"
    weights.touch()
    os.truncate(weights, 8 * 10**12)  # 8 TB apparent size, no blocks used: sparse
    assert weights.stat().st_blocks * 512 < 1 << 20
    proc = run_launcher("doctor", "--model", str(model), "--output", str(tmp_path / "out"), env=WIDE,
                        timeout=120)
    assert proc.returncode == 6
    assert "disk (output)" in one_line_error(proc.stderr)
    r = rows(proc.stdout)
    assert status(r["model"]) == "ok" and "8000.00 GB" in r["model"]
    disk = r["disk (output)"]
    assert status(disk) == "FAIL" and "need about" in disk and "free space there" in disk
    assert status(r["memory"]) == "FAIL"  # 8 TB of weights do not fit in memory either


def test_token_missing(launcher_home, tmp_path, monkeypatch):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    proc = run_launcher("doctor", "--output", str(tmp_path / "o"), timeout=120,
                        env={**WIDE, "HF_HOME": str(hf_home), "DOCKER_HOST": "unix:///nonexistent"})
    row = rows(proc.stdout)["Hugging Face token"]
    assert status(row) == "warn" and "missing" in row and "$HF_TOKEN is not set" in row
    assert str(hf_home / "token") in row
    assert "export HF_TOKEN=hf_" in row and "hf auth login" in row


def test_token_present_is_not_printed(launcher_home, tmp_path):
    secret = "hf_doctorTestNotARealToken123"
    proc = run_launcher("doctor", "--output", str(tmp_path / "o"), timeout=120,
                        env={**WIDE, "HF_TOKEN": secret, "HF_HOME": str(tmp_path),
                             "DOCKER_HOST": "unix:///nonexistent"})
    row = rows(proc.stdout)["Hugging Face token"]
    assert status(row) == "ok" and "$HF_TOKEN" in row
    assert secret not in proc.stdout + proc.stderr


def test_model_offline_not_cached(launcher_home, tmp_path):
    proc = run_launcher("doctor", "--model", "some-org/not-cached-model", "--output", str(tmp_path / "o"),
                        timeout=120, env={**WIDE, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path),
                                          "DOCKER_HOST": "unix:///nonexistent"})
    r = rows(proc.stdout)
    assert status(r["model"]) == "FAIL" and "offline" in r["model"] and "not in the Hugging Face cache" in r["model"]
    assert proc.returncode == 6


# ---------------------------------------------------------------- nvidia-smi parsing (unit)

# Real `nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader` lines.
# The H100 line was captured on an H100 80GB HBM3 for this test; the GB10 form (memory
# "[N/A]": the DGX Spark's memory is unified, nvidia-smi reports no framebuffer total)
# and the others are as those GPUs print them.
H100 = "NVIDIA H100 80GB HBM3, 9.0, 81559 MiB"
GB10 = "NVIDIA GB10, 12.1, [N/A]"
B200 = "NVIDIA B200, 10.0, 183359 MiB"
RTX5090 = "NVIDIA GeForce RTX 5090, 12.0, 32607 MiB"
L40S = "NVIDIA L40S, 8.9, 46068 MiB"
A100 = "NVIDIA A100-SXM4-80GB, 8.0, 81920 MiB"


def test_parse_real_lines():
    gpus = parse_gpus(f"{H100}\n{GB10}\n")
    assert gpus == [Gpu("NVIDIA H100 80GB HBM3", 9, 0, "81559 MiB"), Gpu("NVIDIA GB10", 12, 1, "[N/A]")]
    assert gpus[1].sm == "sm_121"
    assert parse_gpus("") == []
    with pytest.raises(ValueError):
        parse_gpus("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")
    with pytest.raises(ValueError):
        parse_gpus("NVIDIA H100, [N/A], 81559 MiB")


@pytest.mark.parametrize("line,native,words", [
    (GB10, True, "native NVFP4 (Blackwell sm_121)"),
    (B200, True, "Blackwell sm_100"),
    (RTX5090, True, "Blackwell sm_120"),
    (H100, False, "Hopper sm_90"),
    (L40S, False, "Ada sm_89"),
    (A100, False, "no FP4 or FP8"),
])
def test_fp4_mapping(line, native, words):
    (gpu,) = parse_gpus(line)
    ok, note = fp4_support(gpu)
    assert ok is native and words in note
    if not native:
        assert "emulat" in note and "weight-only" in note
