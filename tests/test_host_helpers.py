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

from conftest import REPO
from launcher.records import owner
from launcher.common import paths
from launcher.common.errors import ConfigError
from launcher.common.files import atomic_write_json, atomic_write_text, make_shareable
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


@pytest.mark.parametrize("var, value", [("HF_HUB_OFFLINE", "1"), ("HF_HUB_OFFLINE", "true"),
                                        ("TRANSFORMERS_OFFLINE", "YES")])
def test_one_offline_rule_the_one_huggingface_hub_obeys(tmp_path, var, value):
    """Offline is what huggingface_hub reads as offline: the hub is not asked for sizes. Before,
    quantize read only HF_HUB_OFFLINE=1 (doctor also 'true'/'yes'), so HF_HUB_OFFLINE=true asked
    the hub (here an unreachable endpoint) and failed."""
    code = ("from launcher.sources import model_source; from launcher.common.config import JobSpec; "
            "print(model_source.download_bytes(JobSpec(model='org/absent', output='o')))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update({var: value, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "",
                "HF_ENDPOINT": "http://127.0.0.1:9", "SPARK_NVFP4_HOME": str(tmp_path / "home")})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(0, 0)"   # nothing cached, nothing asked


def test_slow_bf16_cpu_note(tmp_path, monkeypatch):
    """A CPU without bf16 instructions gets a warning before a long bf16 calibration; one with
    them, a GPU job or a short calibration gets none."""
    from launcher.quantize import preflight

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


# ---------------------------------------------------------------- --output: refused before anything runs

def _quantize_refused(tmp_path, output: str, env: dict | None = None) -> str:
    """`launcher quantize --output OUTPUT` with Docker unreachable: the output must be refused
    first (exit 2, one line), with no run record and nothing created."""
    from conftest import one_line_error, run_launcher

    home = tmp_path / "home"
    proc = run_launcher("quantize", "--dry-run", "--output", output, timeout=120,
                        env={"SPARK_NVFP4_HOME": str(home), "DOCKER_HOST": f"unix://{tmp_path}/no.sock", **(env or {})})
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc.stderr)
    assert "[--output]" in line
    assert not (home / "runs").exists() or not any((home / "runs").iterdir()), "a run record was left"
    return line


@pytest.mark.parametrize("output,needle", [
    ("/etc/hostname/ckpt", "which is a file, not a folder"),
    ("/proc/ckpt", "kernel's proc filesystem"),
    ("/sys/ckpt", "kernel's sysfs filesystem"),
    ("/", "is the filesystem root"),
    ("/usr", "is a system folder"),
])
def test_impossible_output_is_one_line_before_docker(tmp_path, output, needle):
    assert needle in _quantize_refused(tmp_path, output)


def test_output_names_too_long_for_the_filesystem(tmp_path):
    # 240 bytes fit NAME_MAX (255), the run's partial folder beside it (32 more) does not
    line = _quantize_refused(tmp_path, str(tmp_path / ("a" * 240)))
    assert "too long" in line and "partial folder" in line
    assert "too long" in _quantize_refused(tmp_path, str(tmp_path / ("b" * 300) / "ckpt"))
    assert "too long" in _quantize_refused(tmp_path, str(tmp_path / ("c/" * 2100)))
    assert not list(tmp_path.glob(".spark-nvfp4-probe-*")) and not (tmp_path / "c").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to user nobody with setpriv, which needs root")
def test_read_only_parent_is_refused_for_a_user_who_cannot_write_it(tmp_path):
    # root writes anywhere, so the user is dropped to nobody: the folder is theirs to read only
    import shutil

    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    parent = tmp_path / "ro"
    parent.mkdir()
    tmp_path.chmod(0o755)
    parent.chmod(0o555)
    code = ("import sys; from launcher.records.destination import check_output; from launcher.common.errors import ConfigError\n"
            "try: check_output(sys.argv[1])\nexcept ConfigError as e: print(e); sys.exit(2)")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                           code, str(parent / "ckpt")], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HOME": str(tmp_path), "SPARK_NVFP4_HOME": str(tmp_path / "h")})
    assert proc.returncode == 2, proc.stderr
    assert "does not allow new folders (Permission denied)" in proc.stdout
    assert list(parent.iterdir()) == []


def test_output_check_leaves_nothing_behind(tmp_path, monkeypatch):
    from launcher.records.destination import check_output

    monkeypatch.setenv("SPARK_NVFP4_HOME", str(tmp_path / "home"))
    out = check_output(tmp_path / "a" / "b" / "ckpt")
    assert out == (tmp_path / "a" / "b" / "ckpt").resolve()
    assert list(tmp_path.iterdir()) == []   # the probe folder is gone; nothing made for a dry run


# ---------------------------------------------------------------- user values through rich

@pytest.mark.parametrize("value", ["out/x[/]y", "out/[bold]z", "a\\[b]", "[/tmp/x]", "tail\\"])
def test_markup_prints_user_values_verbatim(value):
    from rich.console import Console

    from launcher.common.errors import LauncherError
    from launcher.common.output import markup

    console = Console(record=True, width=500, color_system=None)
    console.print(markup("[bold]run[/] {} -> {:.1f} MB", value, 1.25))
    console.print(markup("[yellow]warning:[/] {}", LauncherError("failed", where=value)))
    console.print(markup("[green]{}[/] ok", value))   # a value right before our closing tag
    assert console.export_text().splitlines() == [f"run {value} -> 1.2 MB", f"warning: failed [{value}]",
                                                  f"{value} ok"]


def test_an_unevaluated_job_converts_only_the_calibration_text(tmp_path, monkeypatch, shared_assets):
    """The builtin calibration text is made without the held-out Wikipedia text (10 s of wikitext
    parsing that only evaluation needs); each held-out text is made when first asked for."""
    from launcher.sources import assets

    monkeypatch.setenv("SPARK_NVFP4_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "assets").mkdir(parents=True)
    (tmp_path / "home" / "assets" / "packages").symlink_to(shared_assets / "packages")  # fetched; not converted
    text = tmp_path / "home" / "assets" / "text"
    calib = assets.calibration_text()
    assert calib == text / "brown-calibration.txt" and calib.stat().st_size > 1 << 20
    assert sorted(p.name for p in text.iterdir()) == ["brown-calibration.txt", "brown-heldout.txt"]
    assert calib.read_bytes() == (shared_assets / "text" / "brown-calibration.txt").read_bytes()
    wiki = assets.heldout_text("heldout-wiki")
    assert wiki == text / "wiki-heldout.txt" and wiki.read_bytes() == (shared_assets / "text" / wiki.name).read_bytes()
    assert assets.heldout_text("heldout-brown") == text / "brown-heldout.txt"
