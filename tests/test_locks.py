"""OutputLock: one writer per output folder; a lock whose owner died is cleared."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import psutil
import pytest

from launcher.common.errors import LockHeld
from launcher.records.locks import OutputLock, lock_path


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


def test_lock_of_another_host_names_the_host_the_file_and_how_to_clear_it(tmp_path):
    # "wait for it to finish" alone would be forever when that host's run died
    out = tmp_path / "ckpt"
    lock_path(out).write_text(json.dumps({"host": "elsewhere.example", "pid": 4242, "started": 0, "run_id": "far"}))
    with pytest.raises(LockHeld) as e:
        OutputLock(out, "run-g2").acquire()
    line = str(e.value)
    assert "run far (pid 4242) on host elsewhere.example" in line and "cannot be checked from this host" in line
    assert f"[{lock_path(out)}]" in line and f"remove {lock_path(out)} and retry" in line
    assert "\n" not in line and lock_path(out).exists()   # one line; the lock itself is left alone


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path):
    out = tmp_path / "ckpt"
    lock = OutputLock(out, "run-h").acquire()
    _write(lock.path, pid=os.getpid(), started=psutil.Process().create_time(), run_id="run-i")
    lock.release()
    assert json.loads(lock.path.read_text())["run_id"] == "run-i"


# ---------------------------------------------------------------- races (docs/decisions.md, issue 13)

def _contender(out, run_id, barrier, marks, results):
    """One process of the race: take the lock, and while holding it say so in `marks`
    and look for anyone else saying so."""
    import time as _time
    barrier.wait()
    try:
        lock = OutputLock(out, run_id).acquire()
    except LockHeld:
        results.put((run_id, "refused"))
        return
    mine = marks / run_id
    mine.touch()
    _time.sleep(0.02)  # long enough for a second holder to show up if the lock admitted one
    others = [p.name for p in marks.iterdir() if p.name != run_id]
    mine.unlink()
    lock.release()
    results.put((run_id, "both" if others else "alone"))


@pytest.mark.parametrize("leftover", ["none", "empty", "dead-owner"])
def test_two_processes_never_both_hold_the_lock(tmp_path, leftover):
    """The issue's race: 2 processes x 100 trials on one output, starting together. An
    empty lock file (a competitor caught between create and write, under the old O_EXCL
    scheme) and a dead owner's lock are the cases that used to admit two writers."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    trials, both, refused = 100, 0, 0
    dead_pid, dead_started = _dead_pid()
    for n in range(trials):
        out, marks = tmp_path / f"o{n}" / "ckpt", tmp_path / f"o{n}" / "marks"
        marks.mkdir(parents=True)
        if leftover == "empty":
            lock_path(out).write_text("")
        elif leftover == "dead-owner":
            _write(lock_path(out), pid=dead_pid, started=dead_started, run_id="dead")
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_contender, args=(out, f"run{i}", barrier, marks, results)) for i in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        got = [results.get(timeout=5)[1] for _ in procs]
        both += got.count("both")
        refused += got.count("refused")
        assert not lock_path(out).exists(), "the last holder left its lock behind"
    assert both == 0, f"two holders at once in {both} of {trials} trials"
    assert refused > 10, "the processes never contended: the race was not exercised"


def test_lock_survives_unlink_race(tmp_path):
    """B opened the file, A released (unlinking it): B's flock is on a dead inode and
    must not count; a third run then sees one lock only."""
    out = tmp_path / "ckpt"
    a = OutputLock(out, "a").acquire()
    fd = os.open(a.path, os.O_RDWR)  # B's open, before A's release
    a.release()
    import fcntl
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # B gets a flock on the unlinked inode...
    try:
        with OutputLock(out, "c"):  # ...which must not stop (or fool) a real acquire
            assert json.loads(lock_path(out).read_text())["run_id"] == "c"
    finally:
        os.close(fd)


def test_fifo_lock_path_is_refused_without_hanging(tmp_path):
    out = tmp_path / "ckpt"
    os.mkfifo(lock_path(out))
    with pytest.raises(LockHeld) as e:
        OutputLock(out, "run-x").acquire()
    assert "not a regular file" in str(e.value)


def test_symlinked_lock_path_is_not_followed(tmp_path):
    out = tmp_path / "ckpt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    lock_path(out).symlink_to(victim)
    with pytest.raises(LockHeld):
        OutputLock(out, "run-y").acquire()
    assert victim.read_text() == "keep me"


def test_remove_if_stale_rereads_under_the_lock(tmp_path):
    from launcher.records.locks import remove_if_stale

    out = tmp_path / "ckpt"
    holder = OutputLock(out, "live").acquire()
    assert remove_if_stale(lock_path(out), "live") == "held by a live process"
    holder.release()
    _write(lock_path(out), pid=1, started=0, run_id="someone-else")
    assert remove_if_stale(lock_path(out), "mine") == "taken over by another run"
    assert lock_path(out).exists()
    _write(lock_path(out), pid=1, started=0, run_id="mine")
    assert remove_if_stale(lock_path(out), "mine") is None and not lock_path(out).exists()
    assert remove_if_stale(lock_path(out), "mine") == "gone" and not lock_path(out).exists()
