"""The host's single helpers for what several modules need: atomic writes, owner liveness,
the safetensors header, the hub cache's folder names."""
from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys

import pytest

from launcher import owner, paths
from launcher.errors import ConfigError
from launcher.files import atomic_write_json, atomic_write_text, make_shareable
from launcher.verify import safetensors_header


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["record.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "README.md"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "half \udc80 written")  # a lone surrogate cannot be encoded
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["README.md"]


@pytest.mark.parametrize("planted", ["outside", "inside", "dangling"])
def test_atomic_write_never_writes_through_a_symlink(tmp_path, planted):
    """A name in a folder the launcher did not fill (eval.json in a cloned checkpoint) that is a
    symlink: refused in one line, and neither the link nor its target is touched."""
    folder, victim = tmp_path / "ckpt", tmp_path / "victim.txt"
    folder.mkdir()
    victim.write_text("precious")
    target = {"outside": victim, "inside": folder / "other.json", "dangling": tmp_path / "absent"}[planted]
    if planted == "inside":
        target.write_text("{}")
    (folder / "eval.json").symlink_to(target)
    with pytest.raises(ConfigError, match=r"eval\.json is a symlink \(to .*\): not written through it"):
        atomic_write_json(folder / "eval.json", {"kl": 0.01})
    assert victim.read_text() == "precious" and not (tmp_path / "absent").exists()
    assert (folder / "eval.json").is_symlink() and not [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_atomic_write_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "report.json")
    with pytest.raises(ConfigError, match="not a regular file"):
        atomic_write_text(tmp_path / "report.json", "{}")


def test_written_files_are_0644_minus_the_umask(tmp_path):
    """Outputs are shared artefacts: 0644 like the rest of a checkpoint, not tempfile's 0600;
    a stricter umask is respected."""
    old = os.umask(0o022)
    try:
        assert stat.S_IMODE(atomic_write_text(tmp_path / "README.md", "x").stat().st_mode) == 0o644
        os.umask(0o077)
        assert stat.S_IMODE(atomic_write_text(tmp_path / "eval.json", "x").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_make_shareable_fixes_modes_and_never_follows_links(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim"
    (out / "sub").mkdir(parents=True)
    victim.write_text("x")
    victim.chmod(0o600)
    for name in ("model.safetensors", "sub/tokenizer.json"):
        (out / name).write_text("x")
        (out / name).chmod(0o600)
    (out / "link").symlink_to(victim)
    old = os.umask(0o022)
    try:
        make_shareable(out)
    finally:
        os.umask(old)
    assert [stat.S_IMODE((out / n).stat().st_mode) for n in ("model.safetensors", "sub/tokenizer.json")] == [0o644] * 2
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_owner_alive_by_pid_and_start_time():
    me = owner.me()
    assert owner.alive(me["pid"], me["started"], me["host"])
    assert not owner.alive(me["pid"], me["started"] - 100, me["host"])  # the pid, reused by another process
    assert owner.alive(me["pid"], 0, "another-host")                      # not ours to judge: assumed alive
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not owner.alive(child.pid, me["started"], me["host"])
    assert not owner.alive("12", None, me["host"]) and not owner.alive(-1, 0.0, me["host"])  # edited files


def test_safetensors_header(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}
    text = json.dumps(header).encode()
    good = tmp_path / "good.safetensors"
    good.write_bytes(struct.pack("<Q", len(text)) + text + b"\x01\x02")
    assert safetensors_header(good) == (header, 8 + len(text))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 40) + text)
    with pytest.raises(ValueError, match="implausible"):
        safetensors_header(bad)


def test_hub_cache_folder_names(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert paths.hf_repo_folder("org/name") == tmp_path / "models--org--name"
    assert paths.hf_repo_folder("org/data", "dataset") == tmp_path / "datasets--org--data"


def test_slow_bf16_cpu_note(tmp_path, monkeypatch):
    """A CPU without bf16 instructions gets a warning before a long bf16 calibration; one with
    them, a GPU job or a short calibration gets none."""
    from launcher import preflight

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse2 avx2 fma\n")
    assert preflight.cpu_has_bf16(info) is False
    info.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    assert preflight.cpu_has_bf16(info) is True
    assert preflight.cpu_has_bf16(tmp_path / "missing") is None

    monkeypatch.setattr(preflight, "cpu_has_bf16", lambda: False)
    note = preflight.cpu_calibration_note(270_000_000, 128 * 512, on_gpu=False)
    assert "17.7 TFLOP" in note and "--calib-samples" in note
    assert preflight.cpu_calibration_note(270_000_000, 8 * 64, on_gpu=False) is None
    assert preflight.cpu_calibration_note(270_000_000, 128 * 512, on_gpu=True) is None
    monkeypatch.setattr(preflight, "cpu_has_bf16", lambda: True)
    assert preflight.cpu_calibration_note(270_000_000, 128 * 512, on_gpu=False) is None
