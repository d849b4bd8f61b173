"""Issue 22, item 1: a rerun reuses only a checkpoint of provably the same job.

The fingerprint is by content (launcher/quantize/job_inputs.py); what a rerun does with what lies at the
output is launcher/quantize/reuse.py. The host-side tests build real model folders, texts and records;
the end-to-end test quantizes a tiny Llama through Docker three times.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_tiny_llama, run_launcher
from synthetic_ckpt import make_checkpoint, write_safetensors


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("SPARK_NVFP4_HOME", str(h))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read once at import
    return h


def model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    write_safetensors(folder / "model.safetensors", {"w": ("F32", [4, 4], bytes(range(64)))})
    (folder / "notes.md").write_text("not loaded by the payload")  # not part of the model
    return folder


def spec_for(model: Path, calib: Path, output: Path, **kw):
    from launcher.common.config import JobSpec

    return JobSpec(model=str(model), calibration={"source": str(calib)}, output=output, **kw)


@pytest.fixture
def job(home, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    return spec_for(model_folder(tmp_path / "model"), calib, tmp_path / "out"), tmp_path


def inputs_of(spec):
    from launcher.quantize.job_inputs import job_inputs

    return job_inputs(spec)


# ---------------------------------------------------------------- the fingerprint, by content

def test_one_byte_of_the_weights_changes_the_model_part(job):
    from launcher.quantize.job_inputs import differences, fingerprint

    spec, tmp = job
    before = inputs_of(spec)
    shard = Path(spec.model) / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1   # one byte of tensor data, not of the header; same size
    shard.write_bytes(bytes(data))
    after = inputs_of(spec)
    assert after["model"] != before["model"] and fingerprint(after) != fingerprint(before)
    assert after["calibration"] == before["calibration"] and after["options"] == before["options"]
    assert differences(before, after) == "the model's files changed (model.safetensors differs)"
    (Path(spec.model) / "notes.md").write_text("edited")  # a file the payload never loads
    assert inputs_of(spec) == after


def test_the_calibration_text_is_fingerprinted_by_its_bytes(job):
    from launcher.quantize.job_inputs import differences

    spec, tmp = job
    before = inputs_of(spec)
    calib = Path(spec.calibration.source)
    calib.write_text(calib.read_text().replace("fox", "cat"))
    after = inputs_of(spec)
    assert after["calibration"] != before["calibration"] and after["model"] == before["model"]
    assert differences(before, after) == "the calibration text changed"
    # the same bytes as JSONL are read as records, not as text: another job
    as_jsonl = tmp / "calib.jsonl"
    shutil.copyfile(calib, as_jsonl)
    other = spec.model_copy(update={"calibration": spec.calibration.model_copy(update={"source": str(as_jsonl)})})
    assert inputs_of(other)["calibration"] != after["calibration"]


def test_the_builtin_text_is_fingerprinted_by_its_bytes(job, shared_assets, monkeypatch):
    from launcher.sources import assets

    monkeypatch.setenv("SPARK_NVFP4_HOME", str(shared_assets.parent))
    spec, tmp = job
    builtin = spec.model_copy(update={"calibration": spec.calibration.model_copy(update={"source": "builtin"})})
    copy = tmp / "brown.txt"
    shutil.copyfile(assets.texts().calibration, copy)
    same = spec.model_copy(update={"calibration": spec.calibration.model_copy(update={"source": str(copy)})})
    assert inputs_of(builtin)["calibration"] == inputs_of(same)["calibration"]  # what it says, not its name


def test_the_same_files_in_another_folder_are_the_same_job(job):
    """Decided: where the model lies is not part of the job (a moved or copied folder reuses)."""
    spec, tmp = job
    shutil.copytree(spec.model, tmp / "elsewhere")
    shutil.copyfile(spec.calibration.source, tmp / "other-name.txt")
    moved = spec_for(tmp / "elsewhere", tmp / "other-name.txt", tmp / "out")
    assert inputs_of(moved) == inputs_of(spec)


def test_a_changed_option_is_named(job):
    from launcher.quantize.job_inputs import differences

    spec, tmp = job
    other = spec.model_copy(update={"recipe": "smooth",
                                    "calibration": spec.calibration.model_copy(update={"samples": 64})})
    why = differences(inputs_of(spec), inputs_of(other))
    want = f"the options changed (calibration.samples: {spec.calibration.samples} -> 64, recipe: default -> smooth)"
    assert why == want, why
    yaml_recipe = tmp / "r.yaml"
    yaml_recipe.write_text("quantize: {}\n")
    a = inputs_of(spec.model_copy(update={"recipe": str(yaml_recipe)}))
    yaml_recipe.write_text("quantize: {algorithm: max}\n")
    b = inputs_of(spec.model_copy(update={"recipe": str(yaml_recipe)}))
    assert a["options"]["recipe"] != b["options"]["recipe"] and "recipe: sha256:" in differences(a, b)


def test_a_hub_model_reads_the_same_online_and_offline(home, tmp_path, monkeypatch):
    """Offline from a hub cache laid out as huggingface_hub lays it out; online from the hub's
    model_info, which cannot be reached from these machines: HfApi is replaced in-process
    with the answer the hub gives for that cache's files (lfs sha256, git blob ids)."""
    from launcher.common.config import JobSpec
    from launcher.sources import model_source

    commit, lfs, blob = "a" * 40, "b" * 64, "c" * 40
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, b in (("model.safetensors", lfs), ("config.json", blob)):
        (repo / "blobs" / b).write_text(name)
        (snap / name).symlink_to(f"../../blobs/{b}")

    class Sibling:
        def __init__(self, name, blob_id, sha256=None):
            self.rfilename, self.blob_id, self.size = name, blob_id, 1
            self.lfs = type("Lfs", (), {"sha256": sha256})() if sha256 else None

    class Hub:
        def __init__(self, token=None):
            pass

        def auth_check(self, repo_id, token=None):
            return None

        def model_info(self, repo_id, revision=None, files_metadata=False):
            return type("Info", (), {"sha": commit, "siblings": [
                Sibling("model.safetensors", "d" * 40, lfs), Sibling("config.json", blob),
                Sibling("modeling_x.py", "e" * 40), Sibling("original/consolidated.pth", "f" * 40, "9" * 64)]})()

    monkeypatch.setattr(model_source, "HfApi", Hub)
    from launcher.quantize.job_inputs import model_identity

    online = model_identity(JobSpec(model="org/tiny", output=tmp_path / "o"))
    offline = model_identity(JobSpec(model="org/tiny", output=tmp_path / "o", offline=True))
    assert online == offline == {"repo": "org/tiny", "commit": commit,
                                 "files": {"config.json": blob, "model.safetensors": lfs}}
    assert model_identity(JobSpec(model="org/absent", output=tmp_path / "o", offline=True)) is None


# ---------------------------------------------------------------- what a rerun does with the output

def finished(spec, inputs, run_id="20260101-000000-abcdef", **extra) -> Path:
    out = make_checkpoint(Path(spec.output))
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    (out / "result.json").write_text(json.dumps({"status": "complete", "run_id": run_id, "files": files,
                                                 "job_inputs": inputs, "checkpoint_bytes": 123,
                                                 "recipe": "default", "format": "nvfp4",
                                                 "timings": {"total_s": 4.5}, **extra}))
    return out


def made_by_a_run(out: Path):
    """A record of this home that made `out`, as a finished quantize run leaves it."""
    from launcher.records import runs

    rec = runs.new_run("quantize", {"output": str(out)})
    rec.output = str(out)
    rec.created.outputs.append(str(out))
    rec.finish("complete")
    result = json.loads((out / "result.json").read_text())
    result["run_id"] = rec.id
    (out / "result.json").write_text(json.dumps(result))
    return rec


def test_same_inputs_reuse_with_the_makers_numbers(job):
    from launcher.quantize import reuse
    from launcher.common.output import run_result

    spec, tmp = job
    inputs = inputs_of(spec)
    out = finished(spec, inputs)
    rec = made_by_a_run(out)
    quality = {"kl_divergence": 0.031, "top1_agreement": 0.9, "perplexity": 12.0, "reference_perplexity": 11.5,
               "tokens": 2046, "text": "heldout-wiki"}
    rec.write_result({"run_id": rec.id, "status": "complete", "quality": quality})
    (out / "eval.json").write_text(json.dumps({"kl_divergence": 9.9}))  # a later `launcher eval` rewrote it
    prev = reuse.judge(out, inputs)
    assert prev.action == "reuse" and prev.why is None and prev.maker.id == rec.id
    checkpoint, measured = reuse.carried(prev)
    assert measured == quality
    body = run_result(type("R", (), {"result": checkpoint, "command": "quantize", "status": "complete",
                                     "id": "x", "output": str(out)})(), evaluation=measured, reused=True)
    assert body["sizes"] == {"checkpoint_bytes": 123} and body["recipe"] == "default"
    assert body["format"] == "nvfp4" and body["timings"] == {"total_s": 4.5} and body["quality"] == quality


def test_a_reused_output_of_another_home_takes_its_numbers_from_eval_json_checked(job):
    from launcher.quantize import reuse

    spec, tmp = job
    inputs = inputs_of(spec)
    out = finished(spec, inputs, checkpoint_bytes=True,
                   timings={"total_s": "NaN", "load_s": 1.0, "timeline": {"a": 2.0, "b": [1]}, "c": {"d": {}}})
    (out / "eval.json").write_text('{"kl_divergence": NaN, "top1_agreement": "0.9", "perplexity": 12.5, "tokens": 2.5}')
    prev = reuse.judge(out, inputs)
    assert prev.action == "reuse" and prev.maker is None
    checkpoint, measured = reuse.carried(prev)
    assert "checkpoint_bytes" not in checkpoint and checkpoint["timings"] == {"load_s": 1.0, "timeline": {"a": 2.0}}
    assert measured["kl_divergence"] is None and measured["top1_agreement"] is None
    assert measured["perplexity"] == 12.5 and measured["tokens"] is None


def test_another_jobs_checkpoint_of_ours_is_replaced_and_says_why(job):
    from launcher.quantize import reuse

    spec, tmp = job
    old = inputs_of(spec)
    out = finished(spec, old)
    made_by_a_run(out)
    calib = Path(spec.calibration.source)
    calib.write_text("Another text entirely. " * 50)
    prev = reuse.judge(out, inputs_of(spec))
    assert prev.action == "replace" and prev.why == "the calibration text changed"
    (out / "my-notes.txt").write_text("mine")  # the user's file: never deleted with it
    from launcher.common.errors import ConfigError
    with pytest.raises(ConfigError, match="'my-notes.txt', which the launcher did not write"):
        reuse.judge(out, inputs_of(spec))


def test_another_jobs_checkpoint_no_run_of_ours_made_is_refused(job):
    from launcher.quantize import reuse
    from launcher.common.errors import ConfigError

    spec, tmp = job
    old = inputs_of(spec)
    out = finished(spec, old)   # no record: copied in from elsewhere, or another home's
    shard = Path(spec.model) / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x7f")
    with pytest.raises(ConfigError, match=r"another job \(the model's files changed \(model.safetensors differs\)\) "
                                          "that no run of this launcher home made"):
        reuse.judge(out, inputs_of(spec))


def test_an_output_of_the_path_fingerprint_era_is_not_reused(job):
    from launcher.quantize import reuse

    spec, tmp = job
    out = finished(spec, None, job_fingerprint="0123456789abcdef")
    made_by_a_run(out)
    prev = reuse.judge(out, inputs_of(spec))
    assert prev.action == "replace" and "fingerprinted the inputs' paths" in prev.why


# ---------------------------------------------------------------- end to end, through Docker

@pytest.fixture(scope="module")
def tiny_model(ref_python, tmp_path_factory, embedded_model_dir) -> Path:
    return make_tiny_llama(ref_python, tmp_path_factory.mktemp("tiny") / "llama", embedded_model_dir, 2, 64)


CI_GATE = "(.quality.kl_divergence // 1e9) < 0.05"   # README: the CI job's gate


def ci_gate(result: dict, threshold: float = 0.05) -> bool:
    """The README's jq gate, run by jq (installed by scripts/bootstrap-host.sh)."""
    jq = shutil.which("jq")
    assert jq, "jq is not installed: scripts/bootstrap-host.sh installs it"
    proc = subprocess.run([jq, "-e", CI_GATE.replace("0.05", str(threshold))], input=json.dumps(result),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def test_the_ci_gate_fails_on_a_missing_number():
    assert not ci_gate({"quality": None}) and not ci_gate({"quality": {"kl_divergence": None}})
    assert ci_gate({"quality": {"kl_divergence": 0.01}}) and not ci_gate({"quality": {"kl_divergence": 0.5}})


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(2400)  # three quantizations of a tiny model: ~2.5 min each on a loaded 2-core host
def test_rerun_reuses_only_the_same_job(launcher_home, tiny_model, texts, tmp_path, standin_image):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    calib = tmp_path / "calib.txt"
    calib.write_text(texts.calibration.read_text(encoding="utf-8")[:40000], encoding="utf-8")
    out = tmp_path / "out"
    args = ("quantize", "--model", str(model), "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len",
            "64", "--recipe", "default", "--output", str(out), "--json")

    def quantize(*extra) -> dict:
        proc = run_launcher(*args, *extra, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    first = quantize()
    assert first["reused"] is False and first["why_not_reused"] is None
    assert first["quality"]["kl_divergence"] > 0 and first["sizes"]["checkpoint_bytes"] > 0

    again = quantize()
    assert again["reused"] is True and again["run_id"] != first["run_id"]
    for key in ("quality", "sizes", "recipe", "format", "timings"):
        assert again[key] == first[key] and again[key] is not None, key
    # the README's gate judges the reused run by the first run's number
    assert ci_gate(again, threshold=first["quality"]["kl_divergence"] * 2)
    assert not ci_gate(again, threshold=first["quality"]["kl_divergence"] / 2)

    calib.write_text(calib.read_text(encoding="utf-8")[::-1], encoding="utf-8")  # same size, other text
    changed = quantize("--no-eval")  # (the quick evaluation is not what this part is about)
    assert changed["reused"] is False and changed["why_not_reused"] == "the calibration text changed"
    assert json.loads((out / "result.json").read_text())["run_id"] == changed["run_id"]
    assert not list(tmp_path.glob(".out.partial-*")), "the old checkpoint was left aside"

    shard = next(model.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01   # one byte of one weight
    shard.write_bytes(bytes(data))
    proc = run_launcher(*args, "--no-eval", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = json.loads(proc.stdout)
    assert weights["reused"] is False and weights["why_not_reused"] == f"the model's files changed ({shard.name} differs)"
    assert f"not reusing {out}: the model's files changed" in proc.stderr
    assert json.loads((out / "result.json").read_text())["run_id"] == weights["run_id"]
