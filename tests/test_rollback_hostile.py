"""Run records are input, not truth (docs/decisions.md, issue 13): rollback and status given damaged or
crafted records delete nothing the run did not create, print one line per damaged
record and never a traceback, and --dry-run writes nothing at all.

No Docker needed: DOCKER_HOST points at a socket that does not exist, so these run
fast and only the file side is exercised (containers are covered in test_rollback.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

NO_DOCKER = "unix:///nonexistent/docker.sock"


def cli(*args: str, home: Path, env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    full = {**os.environ, "COLUMNS": "200", "SPARK_NVFP4_HOME": str(home), "DOCKER_HOST": NO_DOCKER, **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, env=full,
                          timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)


def write_record(home: Path, folder: str, data: dict | str) -> Path:
    path = home / "runs" / folder / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def record(run_id: str, **fields) -> dict:
    base = {"id": run_id, "command": "quantize", "created_at": "2026-11-30T06:00:00+00:00", "status": "failed",
            "pid": 1, "pid_started": 0.0, "host": "elsewhere", "spec": {}, "created": {}}
    return {**base, **fields}


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under the roots with its type, size, mtime and (for files) content."""
    seen = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root, followlinks=False):
            for name in dirs + files:
                p = Path(dirpath) / name
                st = p.lstat()
                content = p.read_bytes() if p.is_file() and not p.is_symlink() else None
                seen[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return seen


@pytest.fixture
def world(tmp_path):
    """A launcher home, a fake user home, and precious folders a hostile record points at."""
    home, user = tmp_path / "launcher-home", tmp_path / "user-home"
    (home / "runs").mkdir(parents=True)
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    env = {"HOME": str(user), "HF_HUB_CACHE": str(tmp_path / "hub")}
    return {"home": home, "user": user, "elsewhere": elsewhere, "tmp": tmp_path, "env": env}


def test_crafted_records_delete_nothing_they_did_not_create(world):
    home, user, elsewhere, tmp = world["home"], world["user"], world["elsewhere"], world["tmp"]
    good = "20261130-060000-aaaaaa"
    # empty id: once it matched every partial ("name ends with ''")
    write_record(home, "empty", record("", created={"partials": [str(elsewhere)], "outputs": [str(elsewhere)],
                                                    "cache": [str(elsewhere)]}))
    # a valid id naming what it never made: the launcher's own records, the home, `/`, elsewhere
    (user / "result.json").write_text(json.dumps({"run_id": good}))
    write_record(home, good, record(good, output=str(user), created={
        "outputs": [str(user), "/", str(home / "runs")],
        "partials": [str(elsewhere), str(tmp / f".elsewhere.partial-{good}")],
        "cache": [str(home), str(home / "runs"), str(user), str(tmp / "hub"), str(elsewhere)],
        "locks": [str(elsewhere / "precious.txt")]}))
    (tmp / f".elsewhere.partial-{good}").mkdir()  # named like a partial, but not beside this run's output
    # a path with `..` that normalizes into the home
    dotted = "20261130-060000-bbbbbb"
    write_record(home, dotted, record(dotted, output=str(tmp / "x" / ".." / "user-home"),
                                      created={"outputs": [str(tmp / "x" / ".." / "user-home")]}))
    # broken JSON, a record that says it is another run, a record with the wrong types
    write_record(home, "20261130-060000-cccccc", '{"id": "20261130-060000-cccccc", "created": ')
    write_record(home, "20261130-060000-dddddd", record(good))
    write_record(home, "20261130-060000-eeeeee", record("20261130-060000-eeeeee", created={"outputs": "/"}))
    before = snapshot(user, elsewhere, home / "runs")

    proc = cli("rollback", "--all", "--outputs", "--cache", "--yes", home=home, env=world["env"])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert (user / "thesis.txt").read_text() == "years of work"
    assert (elsewhere / "precious.txt").read_text() == "keep me"
    assert (tmp / f".elsewhere.partial-{good}").is_dir()
    assert (home / "runs").is_dir()
    for folder in ("empty", "20261130-060000-cccccc", "20261130-060000-dddddd", "20261130-060000-eeeeee"):
        lines = [ln for ln in proc.stderr.splitlines() if f"run {folder}:" in ln]
        assert len(lines) == 1 and "left alone" in lines[0], (folder, proc.stderr)
    assert "not a path this run could have created" in proc.stderr
    assert "not a cache entry the launcher makes" in proc.stderr
    after = snapshot(user, elsewhere)
    assert after == {k: v for k, v in before.items() if not k.startswith(str(home))}


@pytest.mark.parametrize("bad_id", ["", "..", "../../etc", "x" * 300, "20261130-060000-aaaaaa/../.."])
def test_bad_ids_are_one_line_errors(world, bad_id):
    for cmd in (("rollback", bad_id, "--yes"), ("status", bad_id), ("logs", bad_id)):
        proc = cli(*cmd, home=world["home"], env=world["env"])
        assert "Traceback" not in proc.stderr, proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode in (2, 11) and len(errors) == 1, (cmd, proc.returncode, proc.stderr)


def test_broken_record_is_one_line_for_status_and_rollback(world):
    run_id = "20261130-060000-ffffff"
    write_record(world["home"], run_id, '{"id": "20261130-060000-ffffff", "status": [}')
    for cmd in (("status", run_id), ("rollback", run_id, "--yes"), ("rollback", run_id, "--dry-run")):
        proc = cli(*cmd, home=world["home"], env=world["env"])
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert "Traceback" not in proc.stderr and proc.returncode == 11, (cmd, proc.stderr)
        assert len(errors) == 1 and "damaged run record" in errors[0], proc.stderr
    assert (world["home"] / "runs" / run_id / "record.json").exists()  # not ours to delete either


def test_fifo_lock_does_not_hang_and_dry_run_writes_nothing(world):
    """A FIFO where the run's lock was: planning once hung reading it. A dead 'running'
    record: marking it interrupted is a write, which a dry run must not do."""
    home, tmp = world["home"], world["tmp"]
    out = tmp / "outs" / "ckpt"
    out.parent.mkdir()
    run_id = "20261130-060000-abcdef"
    os.mkfifo(out.parent / ".ckpt.spark-nvfp4.lock")
    partial = out.parent / f".ckpt.partial-{run_id}"
    partial.mkdir()
    (partial / "w.safetensors").write_bytes(b"x" * 100)
    import socket
    write_record(home, run_id, record(run_id, status="running", host=socket.gethostname(), pid=2**22 + 7,
                                      output=str(out), created={"partials": [str(partial)],
                                                                "locks": [str(out.parent / ".ckpt.spark-nvfp4.lock")]}))
    before = snapshot(home, tmp / "outs")
    dry = cli("rollback", "--all", "--dry-run", home=home, env=world["env"], timeout=30)
    assert "Traceback" not in dry.stderr, dry.stderr
    assert "would remove" in dry.stderr and "partial" in dry.stderr
    assert snapshot(home, tmp / "outs") == before, "--dry-run changed files"
    assert json.loads((home / "runs" / run_id / "record.json").read_text())["status"] == "running"

    real = cli("rollback", run_id, "--yes", home=home, env=world["env"], timeout=30)
    assert "Traceback" not in real.stderr and real.returncode == 0, real.stderr
    assert not partial.exists()
    assert (out.parent / ".ckpt.spark-nvfp4.lock").exists()  # a FIFO is not a lock we wrote


def test_status_of_a_crafted_record_does_not_walk_the_disk(world):
    """`status` sizes what a record names; a record naming `/` must not make it walk the disk."""
    run_id = "20261130-060000-121212"
    write_record(world["home"], run_id, record(run_id, created={"outputs": ["/"], "cache": ["/usr"]}))
    proc = cli("status", run_id, home=world["home"], env=world["env"], timeout=20)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "not ours" in proc.stdout


def test_list_survives_crafted_records(world):
    home = world["home"]
    write_record(home, "20261130-060000-343434", record("20261130-060000-343434", created_at="yesterday-ish",
                                                        spec={"model": "[red]x\x1b[2J"}))
    write_record(home, "20261130-060000-565656", "{broken")
    proc = cli("list", home=home, env=world["env"])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "20261130-060000-343434" in proc.stdout and "\x1b" not in proc.stdout
    assert len([ln for ln in proc.stderr.splitlines() if "20261130-060000-565656" in ln]) == 1
