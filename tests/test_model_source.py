"""The hub code path without a hub: a model id served from a pre-filled Hugging Face
cache with --offline, exactly as on an air-gapped Spark."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import one_line_error, run_launcher

pytestmark = pytest.mark.docker

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, embedded_model_dir):
    """A real huggingface_hub cache layout (refs/main -> snapshots/<sha>) for local/smollm2."""
    repo = tmp_path / "hub" / "models--local--smollm2"
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True)
    for f in embedded_model_dir.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return tmp_path / "hub"


def test_offline_cached_hub_model(launcher_home, hub_cache, tmp_path):
    out = tmp_path / "out"
    proc = run_launcher("quantize", "--model", "local/smollm2", "--offline", "--output", str(out),
                        "--calib-samples", "4", "--calib-seq-len", "64", "--no-eval",
                        env={"HF_HUB_CACHE": str(hub_cache), "HF_TOKEN": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["source"]["model"] == "local/smollm2"
    record = json.loads(next((launcher_home / "runs").glob("*/record.json")).read_text())
    assert record["created"]["cache"] == []  # it was already cached: not ours to remove
    # the job is the commit the cache resolves main to, and the files' content
    assert result["job_inputs"]["model"]["commit"] == REVISION
    again = run_launcher("quantize", "--model", "local/smollm2", "--offline", "--output", str(out),
                         "--calib-samples", "4", "--calib-seq-len", "64", "--no-eval", "--json",
                         env={"HF_HUB_CACHE": str(hub_cache), "HF_TOKEN": ""})
    assert again.returncode == 0 and json.loads(again.stdout)["reused"] is True, again.stderr[-2000:]


def test_offline_model_not_cached(launcher_home, hub_cache, tmp_path):
    proc = run_launcher("quantize", "--model", "local/absent", "--offline", "--output", str(tmp_path / "o"),
                        env={"HF_HUB_CACHE": str(hub_cache)})
    assert proc.returncode == 5
    assert "not in the local Hugging Face cache and we are offline" in one_line_error(proc.stderr)
