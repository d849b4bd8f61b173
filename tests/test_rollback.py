"""`launcher rollback`, `list`, `status`, `logs`, and resume after a kill -9.

The first tests use hand-written run records (fast: no quantization); the last two
run the real payload in the real stand-in image: one pulled from the loopback
registry (so the run records a pull), one killed with SIGKILL mid-calibration.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, STANDIN, our_containers, wait_for

SAMPLES, SEQ_LEN = "8", "128"


def cli(*args: str, home: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The launcher as a user runs it, with no terminal on stdin (so it never prompts)."""
    full = {**os.environ, "COLUMNS": "200", "SPARK_NVFP4_HOME": str(home), **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True,
                          env=full, timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)


def record(home: Path, run_id: str) -> dict:
    return json.loads((home / "runs" / run_id / "record.json").read_text())


def fake_run(home: Path, status: str = "failed", image: str | None = None, **created) -> str:
    """A finished run's record, as job.py writes it, naming the things given."""
    from launcher.records import runs

    rec = runs.new_run("quantize", {"model": "embedded"})
    rec.status, rec.image = status, image
    for kind, items in created.items():
        setattr(rec.created, kind, [str(i) for i in items])
    rec.save()
    return rec.id


def a_run_output(parent: Path, run_id: str, name: str = "ckpt") -> tuple[Path, Path, Path]:
    """The folders and lock a quantize run leaves beside its output."""
    out = parent / name
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"x" * 1000)
    (out / "result.json").write_text(json.dumps({"status": "complete", "run_id": run_id}))
    partial = parent / f".{name}.partial-{run_id}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"y" * 500)
    lock = parent / f".{name}.spark-nvfp4.lock"
    lock.write_text(json.dumps({"pid": 1, "started": 0.0, "host": "x", "run_id": run_id}))
    return out, partial, lock


def with_outputs(home: Path, tmp: Path) -> tuple[str, Path, Path, Path]:
    from launcher.records import runs

    run_id = fake_run(home)
    out, partial, lock = a_run_output(tmp / "outs", run_id)
    rec = runs.load(run_id)
    rec.output = str(out)  # as job.py records it: the partial and lock are derived from it
    rec.created.outputs, rec.created.partials, rec.created.locks = [str(out)], [str(partial)], [str(lock)]
    rec.save()
    return run_id, out, partial, lock


# ------------------------------------------------------------- records only, fast

def test_default_removes_debris_keeps_results_and_is_idempotent(launcher_home, tmp_path):
    run_id, out, partial, lock = with_outputs(launcher_home, tmp_path)
    hub = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    cache = tmp_path / "hub" / "models--org--name"   # a download of this run
    cache.mkdir(parents=True)
    from launcher.records import runs
    rec = runs.load(run_id)
    rec.created.cache = [str(cache)]
    rec.save()

    dry = cli("rollback", run_id, "--dry-run", home=launcher_home, env=hub)
    assert dry.returncode == 0, dry.stderr
    assert "partial" in dry.stderr and "500 bytes" in dry.stderr and partial.exists() and lock.exists()

    proc = cli("rollback", run_id, "--yes", home=launcher_home, env=hub)
    assert proc.returncode == 0, proc.stderr
    assert not partial.exists() and not lock.exists()
    assert out.exists() and cache.exists()  # results stay unless asked for
    assert "--outputs" in proc.stderr and "--cache" in proc.stderr
    assert record(launcher_home, run_id)["status"] == "rolled-back"

    proc = cli("rollback", run_id, "--outputs", "--cache", "--yes", home=launcher_home, env=hub)
    assert proc.returncode == 0, proc.stderr
    assert not out.exists() and not cache.exists() and out.parent.exists()
    assert record(launcher_home, run_id)["created"] == {k: [] for k in record(launcher_home, run_id)["created"]}

    again = cli("rollback", "--all", "--outputs", "--images", "--cache", "--yes", home=launcher_home)
    assert again.returncode == 0 and "nothing to roll back" in again.stderr


def test_cache_removes_the_lm_eval_wheels_a_run_fetched_and_nothing_above(launcher_home, tmp_path):
    """`eval --tasks` records the lm-eval folder it fetched for an image; `rollback --cache` removes
    that folder (its installed site inside), never lm-eval/ itself or a folder it did not record."""
    from launcher.records import runs

    run_id = fake_run(launcher_home)
    fetched = launcher_home / "lm-eval" / "0.4.13-0123456789ab"
    (fetched / "site").mkdir(parents=True)
    (fetched / "lm_eval-0.4.13-py3-none-any.whl").write_bytes(b"w" * 100)
    other = launcher_home / "lm-eval" / "0.4.13-ba9876543210"   # another image's, not this run's
    other.mkdir()
    rec = runs.load(run_id)
    rec.created.cache = [str(fetched), str(launcher_home / "lm-eval")]
    rec.save()

    proc = cli("rollback", run_id, "--cache", "--yes", home=launcher_home)
    assert proc.returncode == 0, proc.stderr
    assert not fetched.exists(), proc.stderr
    assert other.exists() and (launcher_home / "lm-eval").is_dir()
    assert "not a cache entry the launcher makes" in proc.stderr   # lm-eval/ itself is refused


def test_refuses_without_yes_when_not_a_terminal(launcher_home, tmp_path):
    run_id, out, partial, lock = with_outputs(launcher_home, tmp_path)
    proc = cli("rollback", run_id, "--outputs", home=launcher_home)
    assert proc.returncode == 2 and "--yes" in proc.stderr and "Traceback" not in proc.stderr
    assert out.exists() and partial.exists() and lock.exists()


def test_replaced_or_foreign_paths_are_kept(launcher_home, tmp_path):
    """What a record names but that is no longer what the run made is never deleted."""
    from launcher.records import runs

    run_id, out, partial, lock = with_outputs(launcher_home, tmp_path)
    (out / "result.json").write_text(json.dumps({"status": "complete", "run_id": "someone-else"}))
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "precious").write_text("keep me")
    shutil.rmtree(partial)
    partial.symlink_to(decoy)                      # the partial replaced by a link elsewhere
    lock.write_text(json.dumps({"run_id": "another-run", "pid": 1, "started": 0, "host": "x"}))
    outside = tmp_path / "not-a-cache"             # a cache entry outside the home and hub cache
    outside.mkdir()
    rec = runs.load(run_id)
    rec.created.cache = [str(outside)]
    rec.save()

    proc = cli("rollback", run_id, "--outputs", "--cache", "--yes", home=launcher_home)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").exists() and "names run someone-else" in proc.stderr
    assert (decoy / "precious").read_text() == "keep me" and partial.is_symlink()
    assert lock.exists()  # another run's lock
    assert outside.exists() and "outside the launcher home" in proc.stderr


def test_without_docker_files_go_and_containers_are_reported(launcher_home, tmp_path):
    from launcher.records import runs

    run_id, out, partial, lock = with_outputs(launcher_home, tmp_path)
    rec = runs.load(run_id)
    rec.created.containers = ["0123456789ab" * 5 + "0123"]
    rec.save()
    proc = cli("rollback", run_id, "--yes", home=launcher_home,
               env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    assert proc.returncode == 3, proc.stderr  # incomplete: the container is still to go
    assert not partial.exists() and not lock.exists()
    assert "Docker daemon is unreachable" in proc.stderr
    assert "not checked" in proc.stderr and "Traceback" not in proc.stderr
    left = record(launcher_home, run_id)
    assert left["created"]["containers"] and left["status"] == "failed"  # to retry with Docker up


def test_running_run_is_left_alone(launcher_home, tmp_path):
    from launcher.records import runs

    run_id = fake_run(launcher_home, status="running")   # owned by this live pytest process
    rec = runs.load(run_id)
    partial = tmp_path / f".x.partial-{run_id}"
    partial.mkdir()
    rec.created.partials = [str(partial)]
    rec.save()
    one = cli("rollback", run_id, "--yes", home=launcher_home)
    assert one.returncode == 1 and "still running" in one.stderr
    every = cli("rollback", "--all", "--yes", home=launcher_home)
    assert every.returncode == 0 and "left alone" in every.stderr
    assert partial.exists() and record(launcher_home, run_id)["status"] == "running"


def test_list_marks_dead_runs_interrupted_even_without_docker(launcher_home, tmp_path):
    from launcher.records import runs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    rec = runs.new_run("quantize", {"model": "embedded", "output": "/tmp/somewhere"})
    rec.pid = gone.pid
    rec.save()
    proc = cli("list", home=launcher_home, env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    assert proc.returncode == 0, proc.stderr
    assert rec.id in proc.stdout and "interrupted" in proc.stdout
    assert record(launcher_home, rec.id)["status"] == "interrupted"
    shown = cli("status", rec.id, home=launcher_home, env={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"})
    assert shown.returncode == 0 and "the launcher process ended" in shown.stdout


def test_logs_follow_until_the_owner_dies(launcher_home):
    import psutil

    from launcher.records import runs

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = runs.new_run("quantize", {"model": "embedded"})
        rec.pid, rec.pid_started = owner.pid, psutil.Process(owner.pid).create_time()
        rec.save()
        rec.log_path.write_text("first line\n")
        env = {**os.environ, "SPARK_NVFP4_HOME": str(launcher_home)}
        follow = subprocess.Popen([sys.executable, "-m", "launcher", "logs", rec.id, "--follow"], env=env,
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert follow.poll() is None  # still following: the run is going
        with open(rec.log_path, "a") as f:
            f.write("second line\n")
        time.sleep(1)
        owner.kill()
        owner.wait()
        out, err = follow.communicate(timeout=30)
        assert follow.returncode == 0, err
        assert out == "first line\nsecond line\n"
        once = cli("logs", rec.id, home=launcher_home)
        assert once.stdout == out
    finally:
        owner.kill()


@pytest.mark.docker
def test_image_kept_while_another_run_uses_it(launcher_home, docker_client, standin_image):
    ref = f"spark-nvfp4/rollback-test:{secrets.token_hex(4)}"
    docker_client.images.get(standin_image).tag(ref)
    try:
        puller = fake_run(launcher_home, image=ref, images=[ref])
        user = fake_run(launcher_home, status="complete", image=ref)
        proc = cli("rollback", puller, "--images", "--yes", home=launcher_home)
        assert proc.returncode == 0, proc.stderr
        assert f"run {user} also uses it" in proc.stderr
        assert docker_client.images.get(ref)
        proc = cli("rollback", "--all", "--images", "--yes", home=launcher_home)
        assert proc.returncode == 0, proc.stderr
        assert ref not in [t for i in docker_client.images.list() for t in i.tags]
        assert docker_client.images.get(standin_image)  # only the tag went
    finally:
        try:
            docker_client.images.remove(ref)
        except Exception:  # noqa: BLE001
            pass


# ------------------------------------------------------------- real runs

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory, registry, docker_client, standin_image, shared_assets):
    """Decoys made before anything runs, then one real run whose image it pulls itself."""
    from conftest import REAL_HOME

    home = tmp_path_factory.mktemp("home")
    (home / "assets").symlink_to(shared_assets)
    (home / "models").symlink_to(REAL_HOME / "models")
    outs = tmp_path_factory.mktemp("outs")

    # the stand-in under a registry name, pushed, then removed here: the run must pull it
    repo, tag = f"{registry}/spark-nvfp4/rollback-standin", secrets.token_hex(4)
    pulled_ref = f"{repo}:{tag}"
    docker_client.images.get(standin_image).tag(repo, tag)
    for ev in docker_client.images.push(repo, tag=tag, stream=True, decode=True):
        assert "error" not in ev, ev
    docker_client.images.remove(pulled_ref)

    decoys = {"image": f"spark-nvfp4/decoy:{tag}", "folder": outs / "mine", "lookalike": outs / ".smol.partial-mine"}
    docker_client.images.get("spark-nvfp4/debian-base:bookworm").tag(decoys["image"])
    decoys["container"] = docker_client.containers.create(standin_image, command=["true"]).id
    for f in (decoys["folder"], decoys["lookalike"]):
        f.mkdir()
        (f / "notes.txt").write_text("not the launcher's")

    t = time.time()
    out = outs / "smol"
    proc = cli("quantize", "--output", str(out), "--image", pulled_ref, "--calib-samples", SAMPLES,
               "--calib-seq-len", SEQ_LEN, "--no-eval", home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = next(p.name for p in (home / "runs").iterdir())
    yield {"home": home, "outs": outs, "out": out, "run_id": run_id, "pulled_ref": pulled_ref,
           "decoys": decoys, "sha": sha256(out / "model.safetensors"), "seconds": time.time() - t}

    for what in (lambda: docker_client.containers.get(decoys["container"]).remove(force=True),
                 lambda: docker_client.images.remove(decoys["image"]),
                 lambda: docker_client.images.remove(pulled_ref)):
        try:
            what()
        except Exception:  # noqa: BLE001
            pass


@pytest.mark.docker
@pytest.mark.slow
def test_rollback_all_removes_what_the_run_made_and_nothing_else(world, docker_client):
    from docker.errors import ImageNotFound

    home, run_id, out = world["home"], world["run_id"], world["out"]
    made = record(home, run_id)
    assert made["created"]["images"] == [world["pulled_ref"]] and made["created"]["outputs"] == [str(out)]

    listing = cli("list", home=home)
    assert listing.returncode == 0 and run_id in listing.stdout and "complete" in listing.stdout
    status = cli("status", run_id, home=home)
    assert status.returncode == 0 and str(out) in status.stdout and "log.txt" in status.stdout
    logs = cli("logs", run_id, home=home)
    assert logs.returncode == 0 and '"stage": "calibrate"' in logs.stdout.replace('":"', '": "')

    proc = cli("rollback", "--all", "--images", "--outputs", "--cache", "--yes", home=home)
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()
    assert not [p for p in world["outs"].iterdir() if p.name.startswith(".smol.") and p.name.endswith(run_id)]
    assert not (world["outs"] / ".smol.spark-nvfp4.lock").exists()
    with pytest.raises(ImageNotFound):
        docker_client.images.get(world["pulled_ref"])
    assert not [c for c in our_containers(docker_client) if c.labels.get("io.spark-nvfp4.run-id") == run_id]
    assert record(home, run_id)["status"] == "rolled-back"

    decoys = world["decoys"]
    assert docker_client.images.get(decoys["image"]) and docker_client.images.get(STANDIN)
    assert docker_client.containers.get(decoys["container"]).status == "created"
    for f in (decoys["folder"], decoys["lookalike"]):
        assert (f / "notes.txt").read_text() == "not the launcher's"
    assert (home / "models").is_symlink() and (home / "assets").is_symlink()

    again = cli("rollback", "--all", "--images", "--outputs", "--cache", "--yes", home=home)
    assert again.returncode == 0 and "nothing to roll back" in again.stderr


@pytest.mark.docker
@pytest.mark.slow
def test_kill9_mid_run_then_rollback_and_rerun_gives_the_same_bytes(world, docker_client):
    home, outs = world["home"], world["outs"]
    out = outs / "again"
    before = set(p.name for p in (home / "runs").iterdir())
    args = [sys.executable, "-m", "launcher", "quantize", "--output", str(out), "--image", STANDIN,
            "--calib-samples", SAMPLES, "--calib-seq-len", SEQ_LEN, "--no-eval"]
    env = {**os.environ, "SPARK_NVFP4_HOME": str(home)}
    with open(outs / "killed.log", "w") as log:
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        run_id = wait_for(lambda: next(iter(set(p.name for p in (home / "runs").iterdir()) - before), None),
                          60, "the run record")
        log_txt = home / "runs" / run_id / "log.txt"
        wait_for(lambda: log_txt.exists() and '"calibrate"' in log_txt.read_text().replace('": "', '":"'),
                 300, "the calibrate stage")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()

    def ours_running():
        return [c for c in docker_client.containers.list(filters={"label": f"io.spark-nvfp4.run-id={run_id}"})]

    # the watcher reaps at once; failing that, the next command (`list`) must
    t = time.time()
    wait_for(lambda: not ours_running(), 60, "the orphan container to go")
    reaped_after = time.time() - t
    listing = cli("list", home=home)
    assert listing.returncode == 0 and run_id in listing.stdout
    assert not ours_running()
    rec = record(home, run_id)
    assert rec["status"] == "interrupted", rec
    partial = outs / f".again.partial-{run_id}"
    assert rec["created"]["partials"] == [str(partial)] and partial.exists() and not out.exists()

    proc = cli("rollback", run_id, "--yes", home=home)
    assert proc.returncode == 0, proc.stderr
    assert not partial.exists() and not (outs / ".again.spark-nvfp4.lock").exists()
    assert not [c for c in our_containers(docker_client) if c.labels.get("io.spark-nvfp4.run-id") == run_id]
    assert record(home, run_id)["status"] == "rolled-back"

    rerun = cli("quantize", "--output", str(out), "--image", STANDIN, "--calib-samples", SAMPLES,
                "--calib-seq-len", SEQ_LEN, "--no-eval", home=home)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sha256(out / "model.safetensors") == world["sha"]
    print(f"baseline run {world['seconds']:.0f}s; orphan gone {reaped_after:.1f}s after the kill")
