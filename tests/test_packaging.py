"""The launcher as a user installs it: `pip install .` (not editable) into a fresh venv, run from
outside the checkout. The payload it mounts must come from the installed package (package data
included), never from a checkout beside it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, our_containers

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh venv with the project installed from a wheel built out of the checkout."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(REPO)], capture_output=True, text=True,
                         timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import json, launcher, container_payload, importlib.resources as r; print(json.dumps("
                            "[launcher.__file__, container_payload.__file__, "
                            "r.files('container_payload').joinpath('requirements.lock').is_file()]))"],
                           capture_output=True, text=True, cwd=venv.parent, check=True)
    launcher_file, payload_file, lock = json.loads(where.stdout)
    return {"venv": venv, "launcher": launcher_file, "payload": payload_file, "lock": lock}


def test_the_wheel_holds_the_payload_and_its_lock(installed):
    for f in (installed["launcher"], installed["payload"]):
        assert "site-packages" in f and not f.startswith(str(REPO)), f
    assert installed["lock"], "requirements.lock is not in the installed package"
    # every module of the checkout, subpackages included (launcher/verify/ was once left out)
    site = Path(installed["launcher"]).parent.parent
    for package in ("launcher", "container_payload"):
        missing = [str(p.relative_to(REPO)) for p in (REPO / package).rglob("*.py")
                   if "__pycache__" not in p.parts and not (site / p.relative_to(REPO)).is_file()]
        assert not missing, f"not in the installed package: {missing}"


def test_installed_launcher_quantizes_the_embedded_model(installed, launcher_home, standin_image, docker_client,
                                                        tmp_path):
    out = tmp_path / "ckpt"
    exe = str(installed["venv"] / "bin" / "launcher")
    proc = subprocess.run([exe, "quantize", "--output", str(out), "--recipe", "default", "--calib-samples", "8",
                           "--calib-seq-len", "64", "--no-eval", "--keep-container", "--json"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)   # --json: exactly one object on stdout
    assert result["status"] == "complete" and result["exit_code"] == 0 and result["output"] == str(out)
    assert (out / "hf_quant_config.json").is_file() and result["sizes"]["checkpoint_bytes"] > 0
    # the kept container mounted the payload of the installed package
    run_id = result["run_id"]
    kept = [c for c in our_containers(docker_client) if c.labels.get("io.spark-nvfp4.run-id") == run_id]
    assert kept, "the run's container was not kept"
    sources = {m["Destination"]: m["Source"] for m in kept[0].attrs["Mounts"]}
    payload_src = next(src for dst, src in sources.items() if dst.startswith("/opt/spark-nvfp4"))
    assert "site-packages" in payload_src and not payload_src.startswith(str(REPO)), sources
    # and the installed launcher undoes it
    rb = subprocess.run([exe, "rollback", run_id, "--yes"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert rb.returncode == 0, rb.stderr
    assert not [c for c in our_containers(docker_client) if c.labels.get("io.spark-nvfp4.run-id") == run_id]
