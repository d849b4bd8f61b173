"""OutputLock: one writer per output folder; a lock whose owner died is cleared."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import psutil
import pytest

from launcher.errors import LockHeld
from launcher.locks import OutputLock, lock_path


def _dead_pid() -> tuple[int, float]:
    """The pid and start time of a process that has exited (a real one, not a guess)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    started = psutil.Process(p.pid).create_time()
    p.wait()
    return p.pid, started


def _write(path, **info):
    path.write_text(json.dumps({"host": socket.gethostname(), **info}))


def test_acquire_writes_owner_and_release_removes(tmp_path):
    out = tmp_path / "ckpt"
    with OutputLock(out, "run-a") as lock:
        info = json.loads(lock.path.read_text())
        assert lock.path == lock_path(out) and lock.path.parent == tmp_path
        assert info["run_id"] == "run-a" and info["pid"] == os.getpid()
    assert not lock.path.exists()
    assert not out.exists()  # the lock never creates the output itself


def test_stale_lock_of_dead_process_is_cleared(tmp_path):
    out = tmp_path / "ckpt"
    pid, started = _dead_pid()
    _write(lock_path(out), pid=pid, started=started, run_id="dead-run")
    with OutputLock(out, "run-b") as lock:
        assert json.loads(lock.path.read_text())["run_id"] == "run-b"


def test_reused_pid_is_not_the_owner(tmp_path):
    """Same pid, different start time: the pid was reused, the owner is gone."""
    out = tmp_path / "ckpt"
    me = psutil.Process()
    _write(lock_path(out), pid=me.pid, started=me.create_time() - 3600, run_id="old-run")
    with OutputLock(out, "run-c"):
        pass


def test_damaged_lock_is_cleared(tmp_path):
    out = tmp_path / "ckpt"
    lock_path(out).write_text("{not json")
    with OutputLock(out, "run-d"):
        pass


def test_live_lock_is_refused(tmp_path):
    out = tmp_path / "ckpt"
    holder = OutputLock(out, "run-live").acquire()
    try:
        with pytest.raises(LockHeld) as e:
            OutputLock(out, "run-e").acquire()
        assert "run-live" in str(e.value) and e.value.exit_code == 10
        assert json.loads(holder.path.read_text())["run_id"] == "run-live"  # untouched
    finally:
        holder.release()


def test_live_lock_of_another_process_is_refused(tmp_path):
    out = tmp_path / "ckpt"
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write(lock_path(out), pid=p.pid, started=psutil.Process(p.pid).create_time(), run_id="other")
        with pytest.raises(LockHeld):
            OutputLock(out, "run-f").acquire()
    finally:
        p.kill()
        p.wait()
    with OutputLock(out, "run-f"):  # once it is gone, the lock is stale
        pass


def test_lock_of_another_host_is_never_cleared(tmp_path):
    out = tmp_path / "ckpt"
    lock_path(out).write_text(json.dumps({"host": "elsewhere.example", "pid": 1, "started": 0, "run_id": "far"}))
    with pytest.raises(LockHeld):
        OutputLock(out, "run-g").acquire()


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path):
    out = tmp_path / "ckpt"
    lock = OutputLock(out, "run-h").acquire()
    _write(lock.path, pid=os.getpid(), started=psutil.Process().create_time(), run_id="run-i")
    lock.release()
    assert json.loads(lock.path.read_text())["run_id"] == "run-i"
