"""launcher.verify against real checkpoints written by the real tools.

The checkpoints come from ModelOpt (export_hf_checkpoint) and llm-compressor
(oneshot + save_pretrained), each run in its own venv on a tiny random Llama by the
scripts in tests/tools. Each corruption test copies a real checkpoint, breaks one
thing with the helpers below, and runs the verifier's CLI in a subprocess (forked from one
that imported it once: tests/fork_server.py): it must exit non-zero, name the tensor
or file, and print no traceback.

Interpreters: $SPARK_NVFP4_REF_PYTHON (default .venv-mo/bin/python) and
$SPARK_NVFP4_LLMC_PYTHON (default .venv-llmc/bin/python); missing ones skip the
tests, or fail them under CI.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from fork_server import forked_launcher
from launcher.common.errors import VerifyFailed
from launcher.verify import safetensors_header, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tests" / "tools"
LINEARS = 14          # tiny Llama: 2 layers x (q, k, v, o, gate, up, down)
# [out, in] of those: hidden 64, intermediate 128, 4 heads and 2 KV heads of 16.
PARAMS = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128)
L0 = "model.layers.0"
L1 = "model.layers.1"
# Offline and quiet: the tools need nothing from the network.
TOOL_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


# ---------------------------------------------------------------- real checkpoints

def _interpreter(env: str, default: str, how: str) -> Path:
    py = Path(os.environ.get(env) or REPO / default)
    if not py.exists():
        reason = f"{py} not found (set ${env} or create it: {how})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return py


def _make(py: Path, script: str, out: Path) -> None:
    env = {**os.environ, **TOOL_ENV}
    r = subprocess.run([str(py), str(TOOLS / script), str(out)], capture_output=True, text=True,
                       env=env, cwd=out.parent, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"{script} failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")


@pytest.fixture(scope="session")
def modelopt(tmp_path_factory) -> Path:
    """OUT/{w4a4, w4a16, w4a4-kvfp8, w4a4-sharded}, exported by ModelOpt."""
    py = _interpreter("SPARK_NVFP4_REF_PYTHON", ".venv-mo/bin/python",
                      "python3 -m venv .venv-mo && .venv-mo/bin/pip install torch==2.13.0 nvidia-modelopt "
                      "accelerate safetensors requests 'transformers>=4.57,<5.15'")
    out = tmp_path_factory.mktemp("modelopt") / "ckpts"
    _make(py, "make_modelopt_ckpt.py", out)
    return out


@pytest.fixture(scope="session")
def llmc(tmp_path_factory) -> Path:
    """OUT/{NVFP4, NVFP4A16}, written by llm-compressor in compressed-tensors format."""
    py = _interpreter("SPARK_NVFP4_LLMC_PYTHON", ".venv-llmc/bin/python",
                      "python3 -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 llmcompressor")
    out = tmp_path_factory.mktemp("llmc") / "ckpts"
    _make(py, "make_llmc_ckpt.py", out)
    return out


def run_cli(ckpt: Path, *extra: str) -> tuple[int, str]:
    """`launcher verify` forked from a process that imported it once (tests/fork_server.py;
    test_verify_hostile.py runs it as a new `python -m launcher` too)."""
    rc, out, _, _ = forked_launcher("verify", ckpt, *extra, timeout=120)
    assert "Traceback" not in out, out
    return rc, out


def problem_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("problem ")]


def assert_rejected(ckpt: Path, where: str, fragment: str) -> str:
    rc, out = run_cli(ckpt)
    assert rc == VerifyFailed.exit_code, out
    lines = [ln for ln in problem_lines(out) if ln.startswith(f"problem {where}: ")]
    assert any(fragment in ln for ln in lines), f"no problem line for {where!r} with {fragment!r}:\n{out}"
    return out


# ---------------------------------------------------------------- corruption helpers

def read_st(path: Path) -> tuple[dict, dict]:
    """Raw safetensors: metadata, {name: [dtype, shape, bytes]} in file order.

    Raw bytes rather than safetensors.numpy: numpy has no float8, so the library's
    numpy API cannot load a file holding F8_E4M3 block scales.
    """
    header, start = safetensors_header(path)
    meta = header.pop("__metadata__", None)
    data = path.read_bytes()[start:]
    tensors = {k: [v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]]
               for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])}
    return meta, tensors


def write_st(path: Path, meta: dict | None, tensors: dict, validate: bool = True) -> None:
    header, offset, chunks = {}, 0, []
    if meta is not None:
        header["__metadata__"] = meta
    for k, (dtype, shape, raw) in tensors.items():
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(chunks))
    if validate:
        # The library must accept what we wrote, so each test breaks only what it means to.
        with safe_open(str(path), framework="numpy") as f:
            assert set(f.keys()) == set(tensors)


def shard_of(ckpt: Path, name: str) -> Path:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        return ckpt / json.loads(index.read_text())["weight_map"][name]
    return ckpt / "model.safetensors"


def edit_tensors(ckpt: Path, name: str, fn, validate: bool = True) -> None:
    """fn(tensors) edits the {name: [dtype, shape, bytes]} of the shard holding `name`."""
    shard = shard_of(ckpt, name)
    meta, tensors = read_st(shard)
    fn(tensors)
    write_st(shard, meta, tensors, validate)


def scale_f32(ckpt: Path, name: str, factor: float) -> None:
    def fn(t):
        v = np.frombuffer(t[name][2], dtype=np.float32) * np.float32(factor)
        t[name][2] = v.astype(np.float32).tobytes()
    edit_tensors(ckpt, name, fn)


def set_byte(ckpt: Path, name: str, index: int, value: int) -> None:
    def fn(t):
        raw = bytearray(t[name][2])
        raw[index] = value
        t[name][2] = bytes(raw)
    edit_tensors(ckpt, name, fn)


def drop_tensor(ckpt: Path, name: str) -> None:
    edit_tensors(ckpt, name, lambda t: t.pop(name))


def retype(ckpt: Path, name: str, dtype: str | None = None, shape: list | None = None,
           validate: bool = True) -> None:
    def fn(t):
        if dtype:
            t[name][0] = dtype
        if shape:
            t[name][1] = shape
    edit_tensors(ckpt, name, fn, validate)


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def truncate(path: Path, keep: int) -> None:
    with path.open("r+b") as f:
        f.truncate(keep)


@pytest.fixture
def copy_of(tmp_path):
    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst
    return copy


# ---------------------------------------------------------------- real checkpoints pass

@pytest.mark.parametrize("variant, weight_only, kv", [
    ("w4a4", False, None), ("w4a16", True, None), ("w4a4-kvfp8", False, "FP8"), ("w4a4-sharded", False, None)])
def test_modelopt_checkpoints_pass(modelopt, variant, weight_only, kv):
    ckpt = modelopt / variant
    rc, out = run_cli(ckpt)
    assert rc == 0, out
    assert "problem" not in out
    r = verify_checkpoint(ckpt)
    assert r.ok and r.format == "modelopt" and r.quantized_linears == LINEARS
    assert (r.weight_only, r.kv_cache) == (weight_only, kv)
    assert r.shards == (3 if variant.endswith("sharded") else 1)
    # 4 bits + one FP8 scale per 16 weights = 4.5 bits, plus 1 or 2 fp32 scales per Linear.
    assert r.quantized_params == PARAMS
    assert r.quantized_bytes == PARAMS * 9 // 16 + LINEARS * 4 * (1 if weight_only else 2)
    assert "torch" not in sys.modules  # the host side never imports it


@pytest.mark.parametrize("scheme, weight_only", [("NVFP4", False), ("NVFP4A16", True)])
def test_llmc_checkpoints_pass(llmc, scheme, weight_only):
    ckpt = llmc / scheme
    rc, out = run_cli(ckpt)
    assert rc == 0, out
    r = verify_checkpoint(ckpt)
    assert r.ok and r.format == "compressed-tensors" and r.quantized_linears == LINEARS
    assert r.weight_only is weight_only


def test_llmc_keys_are_what_the_verifier_expects(llmc):
    """Pin the exact names llm-compressor writes, so a rename upstream shows up here."""
    with safe_open(str(llmc / "NVFP4" / "model.safetensors"), framework="numpy") as f:
        keys = {k for k in f.keys() if k.startswith(f"{L0}.self_attn.q_proj.")}
    assert keys == {f"{L0}.self_attn.q_proj.{s}" for s in
                    ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")}
    qc = json.loads((llmc / "NVFP4" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == \
        ("compressed-tensors", "nvfp4-pack-quantized", "compressed")
    assert qc["ignore"] == ["lm_head"]


def test_json_report(modelopt, tmp_path):
    out = tmp_path / "report.json"
    rc, _ = run_cli(modelopt / "w4a4", "--json-out", str(out))
    data = json.loads(out.read_text())
    assert rc == 0 and data["ok"] and data["problems"] == [] and data["quantized_linears"] == LINEARS


# ---------------------------------------------------------------- corrupted variants fail

def test_fused_weight_scale_mismatch(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4")
    scale_f32(ckpt, f"{L0}.self_attn.k_proj.weight_scale_2", 2.0)
    assert_rejected(ckpt, f"{L0}.self_attn.k_proj.weight_scale_2", "but q_proj, v_proj have")


def test_fused_input_scale_mismatch(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4-sharded")
    scale_f32(ckpt, f"{L1}.mlp.up_proj.input_scale", 1.5)
    assert_rejected(ckpt, f"{L1}.mlp.up_proj.input_scale", "but gate_proj has")


def test_fused_global_scale_mismatch_compressed_tensors(llmc, copy_of):
    ckpt = copy_of(llmc / "NVFP4")
    scale_f32(ckpt, f"{L0}.self_attn.k_proj.weight_global_scale", 0.5)
    assert_rejected(ckpt, f"{L0}.self_attn.k_proj.weight_global_scale", "but q_proj, v_proj have")


def test_nan_block_scale(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4")
    set_byte(ckpt, f"{L0}.mlp.down_proj.weight_scale", 5, 0x7F)
    assert_rejected(ckpt, f"{L0}.mlp.down_proj.weight_scale", "1 of 512 FP8 block scales are NaN")


def test_nan_block_scale_compressed_tensors(llmc, copy_of):
    ckpt = copy_of(llmc / "NVFP4A16")
    set_byte(ckpt, f"{L1}.self_attn.v_proj.weight_scale", 0, 0xFF)
    assert_rejected(ckpt, f"{L1}.self_attn.v_proj.weight_scale", "FP8 block scales are NaN")


def test_negative_block_scale(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a16")
    set_byte(ckpt, f"{L0}.self_attn.q_proj.weight_scale", 3, 0xB8)   # -1.0 in E4M3
    assert_rejected(ckpt, f"{L0}.self_attn.q_proj.weight_scale", "1 of 256 FP8 block scales are negative")


def test_bad_global_scale(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4")
    scale_f32(ckpt, f"{L0}.self_attn.o_proj.weight_scale_2", -1.0)
    assert_rejected(ckpt, f"{L0}.self_attn.o_proj.weight_scale_2", "must be finite and > 0")


def test_wrong_shape(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4")
    retype(ckpt, f"{L0}.self_attn.q_proj.weight_scale", shape=[32, 8])   # same bytes, wrong layout
    assert_rejected(ckpt, f"{L0}.self_attn.q_proj.weight_scale", "shape [32, 8], expected [64, 4]")


def test_wrong_dtype(llmc, copy_of):
    ckpt = copy_of(llmc / "NVFP4")
    retype(ckpt, f"{L1}.mlp.gate_proj.weight_scale", dtype="U8")
    assert_rejected(ckpt, f"{L1}.mlp.gate_proj.weight_scale", "dtype U8, expected F8_E4M3")


def test_size_does_not_match_shape(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a16")
    # Header shape halved, data left as is: safetensors itself would refuse this file.
    retype(ckpt, f"{L1}.mlp.up_proj.weight", shape=[128, 16], validate=False)
    assert_rejected(ckpt, f"{L1}.mlp.up_proj.weight", "data_offsets span 4096 bytes but U8 [128, 16] needs 2048")


def test_missing_tensor(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4")
    drop_tensor(ckpt, f"{L1}.self_attn.o_proj.input_scale")
    assert_rejected(ckpt, f"{L1}.self_attn.o_proj.input_scale", "missing (activation scale, W4A4)")


def test_missing_tensor_compressed_tensors(llmc, copy_of):
    ckpt = copy_of(llmc / "NVFP4")
    drop_tensor(ckpt, f"{L0}.mlp.down_proj.weight_global_scale")
    assert_rejected(ckpt, f"{L0}.mlp.down_proj.weight_global_scale", "missing (per-tensor global scale)")


def test_truncated_shard(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4")
    shard = ckpt / "model.safetensors"
    truncate(shard, shard.stat().st_size - 1000)
    out = assert_rejected(ckpt, "model.safetensors", "truncated: tensor data should end at byte")
    assert len(problem_lines(out)) == 1, out


def test_truncated_header(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4-sharded")
    truncate(ckpt / "model-00002-of-00003.safetensors", 100)
    out = assert_rejected(ckpt, "model-00002-of-00003.safetensors", "truncated: header says")
    assert len(problem_lines(out)) == 1, out   # its tensors are not each reported missing


def test_missing_config_field(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4")
    edit_json(ckpt / "hf_quant_config.json", lambda d: d["quantization"].pop("group_size"))
    assert_rejected(ckpt, "hf_quant_config.json", "missing field quantization.group_size")


def test_missing_quantization_config(llmc, copy_of):
    ckpt = copy_of(llmc / "NVFP4")
    edit_json(ckpt / "config.json", lambda d: d.pop("quantization_config"))
    assert_rejected(ckpt, "config.json", "has no quantization_config")


def test_contradictory_group_size(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4")
    edit_json(ckpt / "hf_quant_config.json", lambda d: d["quantization"].update(group_size=32))
    assert_rejected(ckpt, "hf_quant_config.json", "group_size is 32, NVFP4 needs 16")


def test_contradictory_group_size_compressed_tensors(llmc, copy_of):
    ckpt = copy_of(llmc / "NVFP4")
    edit_json(ckpt / "config.json",
              lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(group_size=32))
    assert_rejected(ckpt, "config.json quantization_config.config_groups.group_0.weights.group_size",
                    "is 32, NVFP4 needs 16")


def test_contradictory_quant_algo(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4")
    edit_json(ckpt / "hf_quant_config.json", lambda d: d["quantization"].update(quant_algo="FP8"))
    out = assert_rejected(ckpt, "hf_quant_config.json", "quant_algo is 'FP8', not NVFP4")
    assert "problem config.json: quantization_config.quant_algo 'NVFP4' contradicts" in out


def test_kv_cache_scale_missing_in_one_layer(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4-kvfp8")
    drop_tensor(ckpt, f"{L0}.self_attn.k_proj.k_scale")
    assert_rejected(ckpt, f"{L0}.self_attn.k_proj.k_scale", "missing (the config quantizes the KV cache")


def test_fp8_kv_cast_mode_without_any_scale_passes(modelopt, copy_of):
    """ModelOpt's *-kv_fp8_cast recipes write FP8 KV with no k/v scales: engines use 1.0."""
    ckpt = copy_of(modelopt / "w4a4")
    edit_json(ckpt / "hf_quant_config.json", lambda d: d["quantization"].update(kv_cache_quant_algo="FP8"))
    # as ModelOpt 0.47 writes it for general/ptq/nvfp4_default-kv_fp8_cast
    edit_json(ckpt / "config.json", lambda d: d["quantization_config"].update(
        kv_cache_scheme={"dynamic": False, "num_bits": 8, "type": "float"}))
    code, out = run_cli(ckpt)
    assert code == 0, out


def test_kv_scales_without_kv_config(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4-kvfp8")
    edit_json(ckpt / "hf_quant_config.json", lambda d: d["quantization"].update(kv_cache_quant_algo=None))
    edit_json(ckpt / "config.json", lambda d: d["quantization_config"].pop("kv_cache_scheme"))
    assert_rejected(ckpt, f"{L1}.self_attn.v_proj.v_scale", "KV cache scale present")


def test_excluded_module_is_quantized(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4")
    extra = f"{L0}.mlp.down_proj"
    edit_json(ckpt / "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].append(extra))
    edit_json(ckpt / "config.json", lambda d: d["quantization_config"]["ignore"].append(extra))
    assert_rejected(ckpt, extra, "is in the exclude/ignore list but is quantized")


def test_excluded_module_not_float(llmc, copy_of):
    ckpt = copy_of(llmc / "NVFP4")
    retype(ckpt, "lm_head.weight", dtype="U8", shape=[256, 128])
    assert_rejected(ckpt, "lm_head.weight", "excluded from quantization but the weight is U8")


def test_index_points_at_missing_key(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4-sharded")
    ghost = "model.layers.7.mlp.up_proj.weight_scale"
    edit_json(ckpt / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({ghost: "model-00001-of-00003.safetensors"}))
    assert_rejected(ckpt, ghost, "maps it to model-00001-of-00003.safetensors but that shard has no such tensor")


def test_index_misses_a_tensor(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4-sharded")
    name = f"{L1}.input_layernorm.weight"
    edit_json(ckpt / "model.safetensors.index.json", lambda d: d["weight_map"].pop(name))
    assert_rejected(ckpt, name, "not in model.safetensors.index.json")


def test_index_lists_missing_shard(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a4-sharded")
    (ckpt / "model-00003-of-00003.safetensors").unlink()
    out = assert_rejected(ckpt, "model-00003-of-00003.safetensors", "listed in model.safetensors.index.json but missing")
    assert len(problem_lines(out)) == 1, out


def test_not_a_checkpoint(tmp_path):
    rc, out = run_cli(tmp_path / "nowhere")
    assert rc == VerifyFailed.exit_code and f"problem {tmp_path / 'nowhere'}: no such folder" in out
    (tmp_path / "empty").mkdir()
    assert_rejected(tmp_path / "empty", "config.json", "missing")


def test_garbage_shard(modelopt, copy_of):
    ckpt = copy_of(modelopt / "w4a16")
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 4096)
    assert_rejected(ckpt, "model.safetensors", "not a safetensors file")
