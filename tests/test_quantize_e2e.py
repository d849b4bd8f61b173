"""The main job for real: `launcher quantize` on the embedded model, in a container of
the stand-in image, compared with ModelOpt run directly on the same bf16 model."""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from launcher.sources.model_source import EMBEDDED_DIRNAME

from conftest import E2E_SAMPLES, E2E_SEQ_LEN, REAL_HOME, assert_matches_reference, our_containers, run_launcher
from float64_reference import Float64Llama, float64_metrics

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SAMPLES, SEQ_LEN = E2E_SAMPLES, E2E_SEQ_LEN
TOKEN = "hf_SENTINELtokenNeverLogged0123456789"
NGC = "ngcSENTINELkeyNeverLogged9876543210"


@pytest.fixture(scope="session")
def e2e(tmp_path_factory, standin_image, shared_assets, docker_client):
    """One real run, shared by the tests below. The token and NGC key are set in the
    environment, as a user would have them, to prove they go nowhere."""
    home = tmp_path_factory.mktemp("home")
    (home / "assets").symlink_to(shared_assets)
    (REAL_HOME / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(REAL_HOME / "models")
    out = tmp_path_factory.mktemp("out") / "smollm2-nvfp4"
    env = {"SPARK_NVFP4_HOME": str(home), "HF_TOKEN": TOKEN, "NGC_API_KEY": NGC}
    # ModelOpt's own default recipe, to compare with ModelOpt run directly; with the
    # quick evaluation and model card that `launcher quantize` ends with by default.
    proc = run_launcher("quantize", "--output", str(out), "--recipe", "default", "--calib-samples", str(SAMPLES),
                        "--calib-seq-len", str(SEQ_LEN), "--keep-container", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = next(r for r in (json.loads(p.read_text()) for p in (home / "runs").glob("*/record.json"))
                  if r["command"] == "quantize")
    # every container the launcher started: the quantize payload and the quick evaluation
    started = [c for r in (json.loads(p.read_text()) for p in (home / "runs").glob("*/record.json"))
               for c in r["created"]["containers"]]
    kept = [docker_client.containers.get(c) for c in started]
    inspected = [json.dumps(c.attrs) for c in kept]
    for c in kept:
        c.remove(force=True)
    return {"home": home, "out": out, "proc": proc, "record": record, "container_inspect": inspected}


def test_checkpoint_is_complete_and_standard(e2e):
    out = e2e["out"]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "complete" and result["format"] == "nvfp4"
    assert result["calibration"]["samples"] == SAMPLES and result["calibration"]["seq_len"] == SEQ_LEN
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "NVFP4" and hf["quantization"]["group_size"] == 16
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "partial folder left behind"
    assert e2e["record"]["status"] == "complete"
    assert "calibrate" in e2e["proc"].stderr  # the progress bars were rendered


def test_matches_modelopt_run_directly(e2e, modelopt_reference):
    """Every tensor, input_scale included, byte-identical to ModelOpt outside any container,
    calibrated on the same windows in the same batch shapes (asserted from both sides)."""
    assert_matches_reference(e2e["out"], modelopt_reference)


def test_secrets_go_nowhere(e2e, docker_client, standin_image):
    home, out = e2e["home"], e2e["out"]
    places = {p: p.read_bytes() for base in (home / "runs", out) for p in base.rglob("*") if p.is_file()}
    places["stderr"] = e2e["proc"].stderr.encode()
    places["stdout"] = e2e["proc"].stdout.encode()
    places["image inspect"] = json.dumps(docker_client.images.get(standin_image).attrs).encode()
    for i, c in enumerate(e2e["container_inspect"]):
        places[f"container inspect {i}"] = c.encode()
    for secret in (TOKEN, NGC):
        leaks = [str(where) for where, data in places.items() if secret.encode() in data]
        assert not leaks, f"secret found in {leaks}"
    assert any(name.name == "log.txt" for name in places if isinstance(name, Path))


def test_containers_are_hardened(e2e):
    """docker inspect of every container the run started (docs/decisions.md, issue 13): no capabilities, no
    privilege gain, a pids limit, a read-only root with a tmpfs /tmp, a memory limit, no
    network, and every mount read-only except the one folder the payload writes."""
    attrs = [json.loads(c) for c in e2e["container_inspect"]]
    roles = sorted(a["Config"]["Labels"]["io.spark-nvfp4.role"] for a in attrs)
    assert roles == ["evaluate", "quantize"], roles
    for a in attrs:
        host = a["HostConfig"]
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"], host["CapDrop"]
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert 0 < host["PidsLimit"] <= 4096
        assert host["ReadonlyRootfs"] is True and "/tmp" in host["Tmpfs"]
        assert host["Memory"] > 0
        assert host["NetworkMode"] == "none"
        assert not host["Privileged"]
        writable = {m["Destination"]: m["Source"] for m in a["Mounts"] if m["RW"]}
        if a["Config"]["Labels"]["io.spark-nvfp4.role"] == "quantize":
            # /models only on the embedded model's first conversion, into a fresh staging folder
            assert set(writable) <= {"/out", "/models"} and "/out" in writable, a["Mounts"]
            assert ".convert-" in writable.get("/models", ".convert-"), writable
        else:
            assert list(writable) == ["/evalout"], a["Mounts"]
        if "/evalout" in writable:  # eval writes into its run's folder, never the --json folder
            src = next(m["Source"] for m in a["Mounts"] if m["Destination"] == "/evalout")
            assert src.startswith(str(e2e["home"] / "runs")), src
        env = "\n".join(a["Config"]["Env"])
        assert "HF_TOKEN" not in env and "NGC" not in env and TOKEN not in env


def test_no_container_left_and_rerun_reuses(e2e, docker_client):
    assert not [c for c in our_containers(docker_client)
                if c.labels.get("io.spark-nvfp4.run-id") == e2e["record"]["id"]]
    env = {"SPARK_NVFP4_HOME": str(e2e["home"])}
    before = (e2e["out"] / "model.safetensors").stat().st_mtime_ns
    proc = run_launcher("quantize", "--output", str(e2e["out"]), "--recipe", "default", "--calib-samples",
                        str(SAMPLES), "--calib-seq-len", str(SEQ_LEN), "--no-eval", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "already a complete checkpoint" in proc.stderr
    assert (e2e["out"] / "model.safetensors").stat().st_mtime_ns == before


def test_model_card_carries_quality_numbers(e2e):
    card = (e2e["out"] / "README.md").read_text()
    ev = json.loads((e2e["out"] / "eval.json").read_text())
    assert ev["tokens"] > 2000 and 0 < ev["kl_divergence"] < 5 and 0 < ev["top1_agreement"] < 1
    assert "What quantization cost" in card and f"{ev['kl_divergence']:.4f}" in card
    assert "trtllm-serve" in card and "vllm serve" in card
    assert "quality: KL" in e2e["proc"].stderr


def test_every_output_file_is_0644(e2e):
    """model.safetensors (safetensors 0.8 writes 0600) and README.md (once tempfile's 0600)
    are shared like the rest: 0644 minus the umask (022 here), and nothing in the output
    is a link."""
    umask = os.umask(0o022)
    os.umask(umask)
    files = sorted(p for p in e2e["out"].rglob("*") if not p.is_dir())
    assert {"model.safetensors", "README.md", "eval.json", "config.json", "result.json"} <= {p.name for p in files}
    modes = {str(p.relative_to(e2e["out"])): oct(stat.S_IMODE(p.lstat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o644 & ~umask)}, modes


def _token_ids(ref_python: str, model_dir: Path, text: Path, n: int) -> list[int]:
    code = ("import sys, json; from transformers import AutoTokenizer; "
            "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "print(json.dumps(t(open(sys.argv[2]).read(), add_special_tokens=False)['input_ids'][:int(sys.argv[3])]))")
    out = subprocess.run([ref_python, "-c", code, str(model_dir), str(text), str(n)], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out)


def test_eval_agrees_with_independent_float64_emulation(e2e, ref_python, texts, tmp_path):
    """`launcher eval` (container, torch float32 emulation) on the embedded model against
    tests/float64_reference.py (numpy float64, nothing shared).

    W4A4 on a 30-layer model is numerically chaotic: activations that land within float
    rounding of an E2M1 decision boundary flip, and the flips compound. Measured here: a
    1e-7 relative change of the weights moves the quantized perplexity on 254 tokens by ~3%.
    So the float64 side is computed twice (as is, and so perturbed), and the payload must
    agree within 1% or within twice that measured sensitivity, whichever is larger. The
    smooth parts (the original model) must agree to 1e-4."""
    tokens, seq_len = 256, 128
    out = tmp_path / "eval.json"
    proc = run_launcher("eval", str(e2e["out"]), "--reference", "embedded", "--text", str(texts.heldout_brown),
                        "--tokens", str(tokens), "--seq-len", str(seq_len), "--json-out", str(out), "--no-generations",
                        env={"SPARK_NVFP4_HOME": str(e2e["home"])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())
    model_dir = REAL_HOME / "models" / EMBEDDED_DIRNAME
    ids = _token_ids(ref_python, model_dir, texts.heldout_brown, tokens)
    windows = [ids[i:i + seq_len] for i in range(0, tokens, seq_len)]
    ref, quant = Float64Llama(model_dir, None), Float64Llama(e2e["out"], "nvfp4")
    want = float64_metrics(ref, quant, windows)
    for name in quant.w:
        quant.w[name] = quant.w[name] * (1 + 1e-7)
    nudged = float64_metrics(ref, quant, windows)

    assert got["tokens"] == want["tokens"] == 2 * (seq_len - 1)
    assert abs(got["reference_perplexity"] - want["reference_perplexity"]) <= 1e-4 * want["reference_perplexity"]
    for key in ("kl_divergence", "perplexity"):
        sensitivity = abs(nudged[key] - want[key])
        assert abs(got[key] - want[key]) <= max(0.01 * want[key], 2 * sensitivity), \
            (key, got[key], want[key], nudged[key])
    assert abs(got["top1_agreement"] - want["top1_agreement"]) <= 0.03


def test_eval_of_the_original_against_itself_is_exact(e2e, tmp_path):
    out = tmp_path / "self.json"
    model_dir = REAL_HOME / "models" / EMBEDDED_DIRNAME
    proc = run_launcher("eval", str(model_dir), "--reference", "embedded", "--text", "heldout-wiki", "--tokens", "256",
                        "--seq-len", "128", "--json-out", str(out), "--no-generations",
                        env={"SPARK_NVFP4_HOME": str(e2e["home"])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["kl_divergence"] == 0.0 and got["top1_agreement"] == 1.0
    assert got["perplexity"] == got["reference_perplexity"]
