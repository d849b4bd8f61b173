"""Issue 13, the launcher side: order of checks, secrets, hub errors, reuse, eval's output.

Inputs are judged before Docker: those tests point DOCKER_HOST at a socket that does not
exist, so reaching Docker would fail with exit 3 instead of the input's exit 2. The
Hugging Face hub cannot be reached from these machines: "no network" is a real refused
connection (HF_ENDPOINT on a closed loopback port), and where a test needs the hub to
answer (sizes, a download that breaks half-way) model_source's HfApi / snapshot_download are
replaced in-process, which the test says.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from conftest import one_line_error, run_launcher
from launcher.common.errors import ConfigError
from synthetic_ckpt import make_checkpoint

NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
SECRET = "hf_SENTINELsecretNeverEchoed0123456789"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("SPARK_NVFP4_HOME", str(h))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # subprocesses
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read once at import
    return h


def quantize(*args: str, env: dict | None = None):
    return run_launcher("quantize", "--no-eval", *args, env={**NO_DOCKER, **(env or {})}, timeout=120)


# ---------------------------------------------------------------- 1. inputs before Docker

@pytest.mark.parametrize("model", ["org/bad name", "org/na\x1bme", "a/b/c", "-org/x"])
def test_bad_model_id_before_docker(home, tmp_path, model):
    proc = quantize("--model", model, "--output", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    assert "is not a model folder or a Hugging Face id" in one_line_error(proc.stderr)
    assert "\x1b" not in proc.stderr
    assert not (home / "runs").exists()  # nothing recorded: nothing ran


def test_output_that_is_a_file(home, tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("mine")
    proc = quantize("--output", str(f))
    assert proc.returncode == 2 and "output is an existing file" in one_line_error(proc.stderr)
    assert f.read_text() == "mine"


def test_output_inside_the_model_or_the_caches(home, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out, what in ((model / "nvfp4", "the model folder"), (tmp_path / "hub" / "x", "the Hugging Face cache"),
                      (home / "runs" / "x", "the launcher's home")):
        proc = quantize("--model", str(model), "--output", str(out))
        assert proc.returncode == 2, proc.stderr
        assert f"is inside {what}" in one_line_error(proc.stderr)
        assert not out.exists()


def test_missing_calibration_file_before_docker(home, tmp_path):
    proc = quantize("--calib", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o"))
    assert proc.returncode == 2 and "calibration file not found" in one_line_error(proc.stderr)
    assert not list(tmp_path.glob(".o.*"))  # no partial folder, no lock


def test_bad_hub_dataset_id_before_docker(home, tmp_path):
    proc = quantize("--calib", "hf:bad dataset", "--output", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--calib" in one_line_error(proc.stderr)


# ---------------------------------------------------------------- 4. secrets in config errors

def test_rejected_secret_is_never_echoed(home, tmp_path):
    # A token put where a field is expected: in a config file (an unknown field is refused;
    # SPARK_NVFP4_* variables that name no field are not read at all), or as a variable name.
    config = tmp_path / "job.yaml"
    config.write_text(f"hf_token: {SECRET}\n")
    for args, env in ((["--config", str(config)], {}), ([], {"SPARK_NVFP4_HF_TOKEN_ENV": SECRET}),
                      ([], {"SPARK_NVFP4_NGC_KEY_ENV": "nvapi-" + SECRET})):
        proc = quantize("--output", str(tmp_path / "o"), *args, env=env)
        assert proc.returncode == 2, proc.stderr
        line = one_line_error(proc.stderr)
        assert SECRET not in proc.stderr + proc.stdout, line
        assert "invalid" in line


def test_token_env_must_be_a_variable_name():
    from launcher.common.config import JobSpec

    assert JobSpec(hf_token_env="MY_HF_TOKEN").hf_token_env == "MY_HF_TOKEN"
    for bad in (SECRET, "hf token", "", "lower_case", "$HF_TOKEN"):
        with pytest.raises(ValueError, match="name of an environment variable"):
            JobSpec(hf_token_env=bad)


# ---------------------------------------------------------------- 7. hub errors, one line

def test_hub_unreachable_is_one_line_for_eval_and_doctor(home, tmp_path):
    """No network, no --offline: the hub's transport error (httpx2.ConnectError in
    huggingface_hub 2.x) used to escape as a traceback."""
    ckpt = make_checkpoint(tmp_path / "ckpt")
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}
    ev = run_launcher("eval", str(ckpt), "--reference", "org/some-model", "--text", str(ckpt / "config.json"),
                      env={**NO_DOCKER, **env}, timeout=120)
    assert ev.returncode == 5, ev.stderr
    assert "cannot reach the Hugging Face hub for org/some-model" in one_line_error(ev.stderr)
    doc = run_launcher("doctor", "--model", "org/some-model", env={**NO_DOCKER, **env}, timeout=120)
    assert "Traceback" not in doc.stderr + doc.stdout, doc.stderr
    assert doc.returncode != 0 and "Hugging Face hub" in doc.stderr + doc.stdout


def test_transport_errors_cover_the_installed_client():
    import httpx2

    from launcher.sources.model_source import transport_errors

    assert httpx2.HTTPError in transport_errors() and OSError in transport_errors()


# ---------------------------------------------------------------- 5. preflight and records around the download
# The hub is replaced in-process here (it cannot be reached from this machine); Docker is real.

class FakeSibling:
    def __init__(self, name: str, size: int):
        self.rfilename, self.size = name, size


class FakeHub:
    """HfApi as far as check_access uses it, reporting `size` bytes of safetensors."""
    def __init__(self, size: int):
        self.size = size

    def __call__(self, token=None):
        return self

    def auth_check(self, repo_id, token=None):
        return None

    def model_info(self, repo_id, revision=None, files_metadata=False):
        return type("Info", (), {"siblings": [FakeSibling("model.safetensors", self.size)]})()


@pytest.mark.docker
def test_preflight_counts_the_download_before_downloading(home, tmp_path, monkeypatch, docker_client):
    from launcher.common.config import JobSpec
    from launcher.common.errors import PreflightError
    from launcher.quantize.job import QuantizeRun
    from launcher.sources import model_source

    import shutil
    # bigger than the free disk (the download does not fit), small enough that its NVFP4
    # output (about 0.64x with the partial) still does: only the download check can fail
    monkeypatch.setattr(model_source, "HfApi", FakeHub(int(shutil.disk_usage(tmp_path).free * 1.2)))
    downloads = []
    monkeypatch.setattr(model_source, "snapshot_download", lambda *a, **k: downloads.append(a))
    spec = JobSpec(model="org/huge", output=tmp_path / "o", evaluate=False)
    with pytest.raises(PreflightError, match=r"disk \(model download\)"):
        QuantizeRun(spec).run()
    assert downloads == []
    rec = json.loads(next((home / "runs").glob("*/record.json")).read_text())
    assert rec["status"] == "failed" and rec["created"]["cache"] == []


@pytest.mark.docker
def test_download_is_recorded_as_it_starts(home, tmp_path, monkeypatch, docker_client):
    """A download that dies half-way leaves its cache folder in the record, so rollback
    --cache can remove it (before, it was recorded only after a complete download)."""
    from launcher.common.config import JobSpec
    from launcher.common.errors import ModelError
    from launcher.quantize.job import QuantizeRun
    from launcher.records import runs
    from launcher.sources import model_source

    monkeypatch.setattr(model_source, "HfApi", FakeHub(1000))
    repo = tmp_path / "hub" / "models--org--small"

    def broken_download(repo_id, **kw):
        (repo / "blobs").mkdir(parents=True)
        (repo / "blobs" / "abc.incomplete").write_bytes(b"x" * 100)
        raise OSError("connection reset by peer")
    monkeypatch.setattr(model_source, "snapshot_download", broken_download)
    with pytest.raises(ModelError, match="download of org/small failed"):
        QuantizeRun(JobSpec(model="org/small", output=tmp_path / "o", evaluate=False)).run()
    (rec,) = runs.all_runs()
    assert rec.created.cache == [str(repo)] and rec.status == "failed"
    proc = run_launcher("rollback", rec.id, "--cache", "--yes", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.returncode == 0, proc.stderr
    assert not repo.exists() and (tmp_path / "hub").exists()


# ---------------------------------------------------------------- 2 and 6. the lock, then reuse verified

def _finished_output(out: Path, spec) -> Path:
    from launcher.quantize.job_inputs import job_inputs

    make_checkpoint(out)
    (out / "result.json").write_text(json.dumps({"status": "complete", "run_id": "20260101-000000-abcdef",
                                                 "job_inputs": job_inputs(spec)}))
    return out


@pytest.mark.docker
def test_reuse_verifies_the_existing_output(home, tmp_path, docker_client):
    from launcher.common.config import JobSpec

    model = tmp_path / "model"  # a local model: its fingerprint needs no assets or hub
    model.mkdir()
    (model / "config.json").write_text("{}")
    calib = tmp_path / "calib.txt"
    calib.write_text("some text")
    job = ("--model", str(model), "--calib", str(calib), "--output", str(tmp_path / "o"), "--no-eval")
    out = _finished_output(tmp_path / "o", JobSpec(model=str(model), calibration={"source": str(calib)},
                                                   output=tmp_path / "o"))
    ok = run_launcher("quantize", *job, timeout=120)
    assert ok.returncode == 0 and "reusing it" in ok.stderr, ok.stderr
    shard = out / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])  # damaged since it was written
    bad = run_launcher("quantize", *job, timeout=120)
    assert bad.returncode == 9, bad.stderr
    assert "fails verification" in one_line_error(bad.stderr) and "reusing" not in bad.stderr
    assert shard.exists()  # reported, never deleted: the launcher did not make it in this run


@pytest.mark.docker
def test_output_is_judged_under_the_lock(home, tmp_path, docker_client):
    from launcher.records.locks import OutputLock

    out = tmp_path / "o"
    with OutputLock(out, "20261130-000000-aaaaaa"):
        proc = run_launcher("quantize", "--output", str(out), "--no-eval", timeout=120)
    assert proc.returncode == 10 and "is writing this output" in one_line_error(proc.stderr)
    assert not out.exists() and not list(tmp_path.glob(".o.partial-*"))


# ---------------------------------------------------------------- eval's --json-out

def test_eval_json_must_be_a_file_in_an_existing_folder(home, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    for target, needle in ((tmp_path, "--json-out names a folder"), (tmp_path / "no" / "e.json", "does not exist")):
        proc = run_launcher("eval", str(ckpt), "--reference", str(ckpt), "--text", str(ckpt / "config.json"),
                            "--json-out", str(target), env=NO_DOCKER, timeout=60)
        assert proc.returncode == 2 and needle in one_line_error(proc.stderr), proc.stderr


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_eval_never_writes_through_a_planted_eval_json(home, tmp_path, target):
    """A checkpoint from a tarball or a clone with eval.json a symlink (once: eval overwrote the
    link's target). Refused before Docker in one line naming the file; the target is untouched."""
    ckpt = make_checkpoint(tmp_path / "ckpt")
    victim = tmp_path / "victim.txt" if target == "outside" else ckpt / "notes.txt"
    victim.write_text("precious")
    (ckpt / "eval.json").symlink_to(victim)
    proc = run_launcher("eval", str(ckpt), "--reference", str(ckpt), "--text", str(ckpt / "config.json"),
                        env=NO_DOCKER, timeout=60)
    line = one_line_error(proc.stderr)
    assert proc.returncode == 2 and "eval.json" in line and "symlink" in line, proc.stderr
    assert victim.read_text() == "precious"


def test_eval_publishes_beside_a_link_planted_after_the_check(tmp_path):
    """The link may appear while the container runs: the copy to --json-out still refuses it."""
    from launcher.quality.evaluation import _publish, check_json_out

    made, victim = tmp_path / "made.json", tmp_path / "victim.txt"
    made.write_text('{"kl_divergence": 0.01}')
    victim.write_text("precious")
    json_out = check_json_out(tmp_path / "eval.json")
    json_out.symlink_to(victim)
    with pytest.raises(ConfigError, match="symlink"):
        _publish(made, json_out)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("command", ["eval", "serve"])
@pytest.mark.parametrize("victim", ["config.json", "result.json"])
def test_eval_and_serve_read_nothing_through_a_link_out_of_the_checkpoint(home, tmp_path, victim, command):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    elsewhere = tmp_path / victim
    if (ckpt / victim).exists():
        (ckpt / victim).rename(elsewhere)
    else:
        elsewhere.write_text(json.dumps({"source": {"model": "org/secret-model"}}))
    (ckpt / victim).symlink_to(elsewhere)
    extra = ("--text", str(tmp_path / "x.txt")) if command == "eval" else ()
    proc = run_launcher(command, str(ckpt), *extra, env=NO_DOCKER, timeout=60)
    line = one_line_error(proc.stderr)
    assert proc.returncode == 2 and f"{victim} in the checkpoint is a symlink to {elsewhere}" in line, proc.stderr


def test_hub_dataset_is_fetched_on_the_host_and_mounted_read_only(home, tmp_path):
    """--calib hf:... from a pre-filled cache (--offline): the payload gets a read-only
    folder and a local path, never a token or the network."""
    from launcher.common.config import JobSpec
    from launcher.quantize.job import calibration_bind

    snap = tmp_path / "hub" / "datasets--org--texts" / "snapshots" / ("a" * 40)
    (snap / "data").mkdir(parents=True)
    (snap / "data" / "train-0000.jsonl").write_text('{"text": "hello"}\n')
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("a" * 40)
    spec = JobSpec(calibration={"source": "hf:org/texts:train:text"}, offline=True, output=tmp_path / "o")
    os.environ["HF_TOKEN"] = SECRET
    try:
        source, binds = calibration_bind(spec)
    finally:
        del os.environ["HF_TOKEN"]
    assert source == f"hf:/calib-hf/snapshots/{'a' * 40}:train:text"
    (bind,) = binds
    assert bind.read_only and bind.target == "/calib-hf" and bind.host == snap.parent.parent
    assert SECRET not in json.dumps([source, str(bind.host)])
