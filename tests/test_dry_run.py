"""Issue 22, item 9: a dry run decides as the real run would, and leaves no record behind;
`launcher list` stays quick with thousands of records."""
from __future__ import annotations

import json

import pytest

from conftest import one_line_error, run_launcher

NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def records(home):
    return sorted((home / "runs").glob("*/record.json")) if (home / "runs").exists() else []


@pytest.mark.docker
def test_a_dry_run_leaves_no_record(launcher_home, tmp_path, standin_image):
    proc = run_launcher("quantize", "--image", standin_image, "--output", str(tmp_path / "o"), "--dry-run", "--json",
                        timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["dry_run"] is True
    assert records(launcher_home) == [] and not (tmp_path / "o").exists()
    listed = run_launcher("list", timeout=60)
    assert listed.returncode == 0 and "no runs yet" in listed.stderr, listed.stderr


@pytest.mark.docker
def test_dry_run_offline_with_an_uncached_model_fails_as_the_real_run(launcher_home, tmp_path, standin_image):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    args = ("quantize", "--model", "org/absent", "--offline", "--image", standin_image, "--no-eval")
    real = run_launcher(*args, "--output", str(tmp_path / "real"), env=env, timeout=300)
    dry = run_launcher(*args, "--output", str(tmp_path / "dry"), "--dry-run", env=env, timeout=300)
    assert real.returncode == dry.returncode == 5, (real.stderr, dry.stderr)
    assert "not in the local Hugging Face cache and we are offline" in one_line_error(dry.stderr)
    assert one_line_error(dry.stderr) == one_line_error(real.stderr)
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").iterdir())
    assert len(records(launcher_home)) == 1  # the real run's; the dry run's is gone
    # and no folder of it either (its result.json was once written back after the discard)
    assert len(list((launcher_home / "runs").iterdir())) == 1


@pytest.mark.docker
def test_dry_run_gpus_without_the_nvidia_runtime_fails_as_the_real_run(launcher_home, tmp_path, docker_client,
                                                                      standin_image):
    from launcher.common.daemon import has_nvidia_runtime

    if has_nvidia_runtime(docker_client):
        pytest.skip("this Docker has the NVIDIA runtime")
    args = ("quantize", "--gpus", "all", "--image", standin_image, "--no-eval")
    real = run_launcher(*args, "--output", str(tmp_path / "real"), timeout=300)
    dry = run_launcher(*args, "--output", str(tmp_path / "dry"), "--dry-run", timeout=300)
    assert real.returncode == dry.returncode == 1, (real.stderr, dry.stderr)
    assert "NVIDIA container runtime is missing" in one_line_error(dry.stderr)
    assert one_line_error(dry.stderr) == one_line_error(real.stderr)
    assert not (tmp_path / "real").exists() and records(launcher_home) == []  # said before the run began


def test_list_shows_the_latest_runs_quickly(tmp_path, monkeypatch):
    """5,000 records took 6.5 s to list (rich lays a table out at ~1-3 ms a row): only the latest
    SHOWN_RUNS are laid out (and a line says how many are not), --all shows every one. What is
    checked is what is shown, not a time (times belong in benchmarks)."""
    from launcher.records import runs
    from launcher.records.run_views import SHOWN_RUNS

    home = tmp_path / "home"
    monkeypatch.setenv("SPARK_NVFP4_HOME", str(home))
    n = 2000
    ids = []
    for i in range(n):
        rec = runs.new_run("quantize", {"output": f"/tmp/out-{i}"})
        rec.finish("complete")
        ids.append(rec.id)
    env = {"SPARK_NVFP4_HOME": str(home), **NO_DOCKER}
    proc = run_launcher("list", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{n - SHOWN_RUNS} older runs not shown" in proc.stderr
    shown = sorted(i for i in ids if i in proc.stdout)
    assert len(shown) == SHOWN_RUNS and shown == sorted(ids)[-SHOWN_RUNS:]
    everything = run_launcher("list", "--all", env=env, timeout=300)
    assert everything.returncode == 0 and all(i in everything.stdout for i in ids)


def test_two_runs_drawing_one_id_in_one_second_keep_both_records(tmp_path, monkeypatch):
    """A run id is its second plus 24 random bits: the list test above once made two of its 2,000
    runs with one id, and the second overwrote the first's record (1899 older runs, not 1900). The
    folder is claimed exclusively now and another id drawn. Here both runs draw the same bits first."""
    import datetime as dt
    import types

    from launcher.records import runs

    monkeypatch.setenv("SPARK_NVFP4_HOME", str(tmp_path / "home"))
    fixed = dt.datetime(2026, 12, 7, 9, 30, 0)
    clock = types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda *tz: fixed), timezone=dt.timezone)
    monkeypatch.setattr(runs, "dt", clock)
    draws, real = iter(["aaaaaa", "aaaaaa", "bbbbbb"]), runs.secrets.token_hex
    # the run id's 3 bytes; other callers (temporary file names) keep theirs
    monkeypatch.setattr(runs.secrets, "token_hex", lambda n: next(draws) if n == 3 else real(n))
    first = runs.new_run("quantize", {"output": "/tmp/first"})
    second = runs.new_run("quantize", {"output": "/tmp/second"})
    assert (first.id, second.id) == ("20261207-093000-aaaaaa", "20261207-093000-bbbbbb")
    saved = {json.loads(p.read_text())["spec"]["output"] for p in records(tmp_path / "home")}
    assert saved == {"/tmp/first", "/tmp/second"}
