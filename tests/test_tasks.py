"""`launcher eval --tasks` (issue 21 part 3): lm-evaluation-harness in the container, recovery in the
model card, and the same numbers as lm-eval run directly on the host.

Real: the Docker daemon, the stand-in image, lm-eval 0.4.13 from PyPI (fetched on the host, as
on a Spark), ModelOpt for the checkpoint. The task is tests/tasks/facts.yaml (32 multiple-choice
items, a local JSON Lines dataset): the hub is unreachable here.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REAL_HOME, REPO, one_line_error, our_containers, run_launcher

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TASK = REPO / "tests" / "tasks" / "facts.yaml"
LIMIT, BATCH = 4, 4   # 4 documents x 4 choices per model


@pytest.fixture
def tasks_home(launcher_home) -> Path:
    """A fresh home that shares lm-eval's wheels and installed site with the real home (fetched once,
    about 155 MB; installed once per image), as it shares the assets and models."""
    (REAL_HOME / "lm-eval").mkdir(parents=True, exist_ok=True)
    (launcher_home / "lm-eval").symlink_to(REAL_HOME / "lm-eval")
    return launcher_home


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_checkpoint):
    """The embedded model quantized with the cheapest recipe (conftest's small_checkpoint), copied:
    eval --tasks writes its results and card into it."""
    out = tmp_path_factory.mktemp("tasks") / small_checkpoint.name
    shutil.copytree(small_checkpoint, out, symlinks=True)
    return out


@pytest.mark.timeout(1800)   # two models through lm-eval twice (container, host) on a shared 2-core machine
def test_eval_tasks_gives_recovery_in_the_card_equal_to_lm_eval_run_directly(checkpoint, embedded_model_dir,
                                                                              ref_python, tasks_home,
                                                                              docker_client, tmp_path):
    proc = run_launcher("eval", str(checkpoint), "--tasks", str(TASK), "--limit", str(LIMIT),
                        "--batch-size", str(BATCH), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    ours = json.loads((checkpoint / "tasks.json").read_text())
    assert printed["tasks"] == ours["tasks"]
    facts = ours["tasks"]["spark_facts"]
    assert set(facts) == {"acc", "acc_norm"}

    # the model card: the recovery table, with the numbers of tasks.json
    card = (checkpoint / "README.md").read_text()
    acc = facts["acc"]
    assert "| task | metric | original | quantized | recovery |" in card
    assert f"| spark_facts | acc | {acc['reference']:.4f}" in card
    assert f"{100 * acc['recovery']:.1f}" in card

    # lm-eval run directly on the host, same models (float32 reference, the payload's emulation)
    wheels = next((tasks_home / "lm-eval").glob("0.4.13-*"))
    direct_json = tmp_path / "direct.json"
    subprocess.run([ref_python, str(REPO / "tests" / "tools" / "lm_eval_direct.py"), str(wheels), str(tmp_path / "site"),
                    str(checkpoint), str(embedded_model_dir), str(TASK), str(LIMIT), str(BATCH), str(direct_json)],
                   check=True, capture_output=True, timeout=900)
    direct_all = json.loads(direct_json.read_text())
    direct = direct_all["results"]
    # per document, the loglikelihood of every choice: the same float32 models on the same inputs
    # give the same numbers, bit for bit (JSON floats round-trip exactly)
    for side in ("reference", "quantized"):
        assert ours["samples"][side]["spark_facts"] == direct_all["samples"][side]["spark_facts"], side
    assert ours["samples"]["reference"] != ours["samples"]["quantized"]   # quantization changed them
    for side in ("reference", "quantized"):
        want = direct[side]["spark_facts"]
        for metric in ("acc", "acc_norm"):
            # loglikelihoods of the same float32 models on the same inputs: the choices are identical,
            # so the scores and their stderrs are equal (tolerance: float formatting only)
            assert facts[metric][side] == pytest.approx(want[f"{metric},none"], abs=1e-12), (side, metric)
            assert facts[metric][f"{side}_stderr"] == pytest.approx(want[f"{metric}_stderr,none"], abs=1e-12)
    assert facts["acc"]["recovery"] == pytest.approx(direct["quantized"]["spark_facts"]["acc,none"]
                                                     / direct["reference"]["spark_facts"]["acc,none"])
    assert not [c for c in our_containers(docker_client) if c.labels.get("io.spark-nvfp4.run-id") in proc.stderr]


def test_unknown_task_is_one_line_and_leaves_no_container(checkpoint, tasks_home, docker_client, tmp_path):
    """An unknown name reaches lm-eval's own task index in the container: one line, exit non-zero."""
    task = tmp_path / "t"
    task.mkdir()
    (task / "x.yaml").write_text(TASK.read_text().replace("spark_facts", "spark_other"))
    proc = run_launcher("eval", str(checkpoint), "--tasks", f"{task / 'x.yaml'},no_such_task_anywhere",
                        "--limit", "1")
    assert proc.returncode != 0
    assert "no_such_task_anywhere" in one_line_error(proc.stderr)
    runs = [json.loads(p.read_text()) for p in (tasks_home / "runs").glob("*/record.json")]
    assert runs and all(not docker_client.containers.list(all=True, filters={"label": f"io.spark-nvfp4.run-id={r['id']}"})
                        for r in runs)
    assert not list((tasks_home / "lm-eval").glob("*/.site-*")), "a half-installed lm-eval left behind"


@pytest.mark.parametrize("tasks, message", [
    ("/dev/null", "not a regular .yaml file"),
    ("missing.yaml", "task file not found"),
    ("a b", "not a task name"),
    (",", "no task given"),
])
def test_bad_tasks_argument_is_one_line_before_docker(tasks, message, launcher_home, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    proc = run_launcher("eval", str(ckpt), "--tasks", tasks, "--reference", "embedded")
    assert proc.returncode == 2
    assert message in one_line_error(proc.stderr)
    assert not (launcher_home / "runs").exists() or not list((launcher_home / "runs").iterdir())


def test_wheels_unreachable_is_one_line_fast(checkpoint, launcher_home, tmp_path):
    """No index reachable (PIP settings point at a closed local port): pip fails in seconds, one line."""
    env = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": "/dev/null"}
    proc = run_launcher("eval", str(checkpoint), "--tasks", str(TASK), "--limit", "1", env=env, timeout=180)
    assert proc.returncode != 0
    assert "lm-eval" in one_line_error(proc.stderr)
    assert not list((launcher_home / "lm-eval").glob("*/COMPLETE")) if (launcher_home / "lm-eval").exists() else True


def test_named_task_whose_dataset_is_not_fetched_is_one_line(checkpoint, tasks_home, docker_client):
    """gsm8k is one of lm-eval's own tasks; its dataset was never fetched on this host and the container
    has no network (HF offline): one line that says to fetch it on the host, not a hang."""
    proc = run_launcher("eval", str(checkpoint), "--tasks", "gsm8k", "--limit", "1", timeout=900)
    assert proc.returncode != 0
    line = one_line_error(proc.stderr)
    assert "offline" in line and "host" in line, line
    assert not [c for c in our_containers(docker_client)
                if any(r.name in c.labels.get("io.spark-nvfp4.run-id", "") for r in (tasks_home / "runs").iterdir())]


def test_dry_run_says_what_it_would_fetch_and_changes_nothing(launcher_home, standin_image, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    proc = run_launcher("eval", str(ckpt), "--tasks", f"{TASK},gsm8k", "--reference", "embedded", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    said = json.loads(proc.stdout)
    assert said["status"] == "dry-run" and said["tasks"] == [str(TASK), "gsm8k"]
    assert "fetch lm-eval 0.4.13" in said["lm_eval_wheels"]   # a fresh home has no wheels yet
    assert not (launcher_home / "lm-eval").exists() and not list((launcher_home / "runs").glob("*"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json"]
