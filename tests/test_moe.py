"""Mixture-of-Experts through the real chain: tiny random-weight Qwen3-MoE, Mixtral, Qwen3.5-MoE
(shared expert, Gated DeltaNet layer) and DeepSeek-V2 (MLA, shared experts, a dense first layer)
models (tests/tools/tiny_moe.py, built by the ModelOpt reference venv) go through `launcher
quantize` in the stand-in with the two MoE recipes, then `launcher verify` and `launcher eval`.

Every expert calibrated is proven from the outside: each routed and shared expert's
weight_scale_2 must equal its own max |W| / 2688 recomputed here from the source bf16 weights
(numpy), and each expert of a W4A4 layer must carry an input_scale, one per layer and
projection, that differs between projections and layers (no default)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import REPO, one_line_error, raw_tensors, run_launcher
from synthetic_ckpt import write_safetensors

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CALIB = ("--calib-samples", "8", "--calib-seq-len", "64")
# (model, recipe): each recipe once, each architecture once
RUNS = {"qwen3_moe-w4a16": ("qwen3_moe", "moe-w4a16-experts"), "mixtral-w4a4": ("mixtral", "moe-w4a4-experts"),
        "qwen3_5_moe-w4a16": ("qwen3_5_moe", "moe-w4a16-experts"),
        "deepseek_v2-w4a16": ("deepseek_v2", "moe-w4a16-experts")}
GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")
EXPERT_PROJS = {"qwen3_moe": GATE_UP_DOWN, "mixtral": ("w1", "w3", "w2"), "qwen3_5_moe": GATE_UP_DOWN,
                "deepseek_v2": GATE_UP_DOWN}
EXPERTS_AT = {"qwen3_moe": "mlp.experts", "mixtral": "block_sparse_moe.experts", "qwen3_5_moe": "mlp.experts",
              "deepseek_v2": "mlp.experts"}
SHARED_AT = {"qwen3_5_moe": "mlp.shared_expert", "deepseek_v2": "mlp.shared_experts"}
LAYERS, EXPERTS = 2, 4
MOE_LAYERS = {"deepseek_v2": (1,)}  # first_k_dense_replace=1: layer 0 is a dense MLP; others: every layer


def moe_layers(kind: str) -> tuple[int, ...]:
    return MOE_LAYERS.get(kind, tuple(range(LAYERS)))


@pytest.fixture(scope="session")
def tiny_models(tiny_model) -> dict[str, Path]:
    return {kind: tiny_model(kind) for kind in sorted({kind for kind, _ in RUNS.values()})}


@pytest.fixture(scope="session")
def moe_runs(tiny_models, standin_image, shared_assets, tmp_path_factory) -> dict[str, dict]:
    home = tmp_path_factory.mktemp("moe-home")
    (home / "assets").symlink_to(shared_assets)
    env = {"SPARK_NVFP4_HOME": str(home)}
    runs = {}
    for name, (kind, recipe) in RUNS.items():
        out = tmp_path_factory.mktemp("moe-out") / name
        proc = run_launcher("quantize", "--model", str(tiny_models[kind]), "--output", str(out), "--recipe", recipe,
                            *CALIB, "--no-eval", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = {"kind": kind, "recipe": recipe, "out": out, "source": tiny_models[kind], "env": env}
    return runs


def f32(raw: bytes) -> float:
    return float(np.frombuffer(raw, np.float32)[0])


def source_amax(source: Path, name: str) -> float:
    dtype, shape, data = raw_tensors(source)[name]
    assert dtype == "BF16"
    return float(np.abs(np.frombuffer(data, ml_dtypes.bfloat16).astype(np.float32)).max())


def assert_own_global_scales(tensors: dict, source: Path, prefix: str, projs: tuple[str, str, str]) -> tuple:
    """`prefix`.{gate, up, down}'s NVFP4 global scales are their own source weights' max |W| / 2688:
    gate and up are one fused GEMM, so both carry the larger amax of the two."""
    gate, up, down = projs
    src = {p: source_amax(source, f"{prefix}.{p}.weight") for p in projs}
    want = {gate: max(src[gate], src[up]) / 2688, up: max(src[gate], src[up]) / 2688, down: src[down] / 2688}
    for proj, value in want.items():
        got = f32(tensors[f"{prefix}.{proj}.weight_scale_2"][2])
        assert np.isclose(got, np.float32(value), rtol=1e-6), (prefix, proj, got, value)
    return projs


def test_w4a16_layout_is_the_published_mixed_precision(moe_runs):
    run = moe_runs["qwen3_moe-w4a16"]
    hq = json.loads((run["out"] / "hf_quant_config.json").read_text())["quantization"]
    qc = json.loads((run["out"] / "config.json").read_text())["quantization_config"]
    assert hq["quant_algo"] == qc["quant_algo"] == "MIXED_PRECISION"
    assert hq["kv_cache_quant_algo"] == "FP8" and qc["kv_cache_scheme"]["num_bits"] == 8
    assert hq["quantized_layers"] == qc["quantized_layers"]
    algos = {}
    for name, cfg in hq["quantized_layers"].items():
        algos.setdefault(cfg["quant_algo"], []).append(name)
    assert sorted(algos) == ["FP8", "W4A16_NVFP4"]
    assert all(".self_attn." in n for n in algos["FP8"]) and len(algos["FP8"]) == 4 * LAYERS
    assert all(n.endswith(".experts") for n in algos["W4A16_NVFP4"]) and len(algos["W4A16_NVFP4"]) == LAYERS
    tensors = raw_tensors(run["out"])
    for layer in range(LAYERS):
        assert tensors[f"model.layers.{layer}.mlp.gate.weight"][0] == "BF16"  # the router
        q = f"model.layers.{layer}.self_attn.q_proj"
        assert tensors[f"{q}.weight"][0] == "F8_E4M3" and tensors[f"{q}.weight_scale"][1] == ()
        assert f"{q}.input_scale" in tensors
        assert f"model.layers.{layer}.self_attn.k_proj.k_scale" in tensors
        assert not any(k.startswith(f"model.layers.{layer}.mlp.experts.") and k.endswith(".input_scale")
                       for k in tensors)  # weight-only experts


def test_w4a4_experts_only_leaves_the_rest_bf16(moe_runs):
    run = moe_runs["mixtral-w4a4"]
    hq = json.loads((run["out"] / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "NVFP4" and hq["kv_cache_quant_algo"] is None
    tensors = raw_tensors(run["out"])
    quantized = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")}
    assert quantized and all(".block_sparse_moe.experts." in m for m in quantized)
    assert len(quantized) == LAYERS * EXPERTS * 3
    for layer in range(LAYERS):
        assert tensors[f"model.layers.{layer}.self_attn.q_proj.weight"][0] == "BF16"
        assert tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"][0] == "BF16"


@pytest.mark.parametrize("name", list(RUNS))
def test_every_expert_is_calibrated(moe_runs, name):
    run = moe_runs[name]
    kind, w4a4 = run["kind"], run["recipe"] == "moe-w4a4-experts"
    gate, up, down = EXPERT_PROJS[kind]
    tensors = raw_tensors(run["out"])
    inputs = {}
    for layer in moe_layers(kind):
        base = f"model.layers.{layer}.{EXPERTS_AT[kind]}"
        for e in range(EXPERTS):
            for proj in assert_own_global_scales(tensors, run["source"], f"{base}.{e}", (gate, up, down)):
                if w4a4:
                    inputs[(layer, proj, e)] = f32(tensors[f"{base}.{e}.{proj}.input_scale"][2])
    if w4a4:
        for layer in range(LAYERS):
            for proj in (gate, down):
                per_expert = {inputs[(layer, proj, e)] for e in range(EXPERTS)}
                assert len(per_expert) == 1 and per_expert.pop() > 0  # one shared, calibrated scale
            assert inputs[(layer, gate, 0)] == inputs[(layer, up, 0)]
            assert inputs[(layer, gate, 0)] != inputs[(layer, down, 0)]
        assert inputs[(0, down, 0)] != inputs[(1, down, 0)]


@pytest.mark.parametrize("name", [n for n, (kind, _) in RUNS.items() if kind in SHARED_AT])
def test_shared_experts_get_their_own_scales_and_the_gates_stay_bf16(moe_runs, name):
    """Shared experts W4A16_NVFP4, each with global scales from its own source weights; the
    router and Qwen's shared_expert_gate bf16 and bit-identical to the source."""
    run = moe_runs[name]
    kind = run["kind"]
    layers = json.loads((run["out"] / "hf_quant_config.json").read_text())["quantization"]["quantized_layers"]
    tensors, source = raw_tensors(run["out"]), raw_tensors(run["source"])
    for layer in moe_layers(kind):
        shared = f"model.layers.{layer}.{SHARED_AT[kind]}"
        assert_own_global_scales(tensors, run["source"], shared, GATE_UP_DOWN)
        for proj in GATE_UP_DOWN:
            assert layers[f"{shared}.{proj}"] == {"quant_algo": "W4A16_NVFP4", "group_size": 16}
            assert tensors[f"{shared}.{proj}.weight"][0] == "U8" and f"{shared}.{proj}.input_scale" not in tensors
        gates = [f"model.layers.{layer}.mlp.gate"] + ([f"{shared}_gate"] if kind == "qwen3_5_moe" else [])
        for gate in gates:
            assert gate not in layers and tensors[f"{gate}.weight"] == source[f"{gate}.weight"], gate
            assert tensors[f"{gate}.weight"][0] == "BF16"


def test_gated_deltanet_layer_follows_the_published_layout(moe_runs):
    """Qwen3.5-MoE's linear-attention layer as nvidia/Qwen3.6-35B-A3B-NVFP4 stores it (moe.py):
    in_proj_qkv, in_proj_z and out_proj FP8, each weight scale its own max |W| / 448; in_proj_a,
    in_proj_b and conv1d bf16, as in the source."""
    run = moe_runs["qwen3_5_moe-w4a16"]
    layers = json.loads((run["out"] / "hf_quant_config.json").read_text())["quantization"]["quantized_layers"]
    tensors, source = raw_tensors(run["out"]), raw_tensors(run["source"])
    at = "model.layers.0.linear_attn"  # tiny_moe.py: layer 0 linear attention, layer 1 full attention
    for proj in ("in_proj_qkv", "in_proj_z", "out_proj"):
        assert layers[f"{at}.{proj}"] == {"quant_algo": "FP8"}
        assert tensors[f"{at}.{proj}.weight"][0] == "F8_E4M3" and f"{at}.{proj}.input_scale" in tensors
        want = source_amax(run["source"], f"{at}.{proj}.weight") / 448
        assert np.isclose(f32(tensors[f"{at}.{proj}.weight_scale"][2]), np.float32(want), rtol=1e-6), proj
    for kept in ("in_proj_a", "in_proj_b", "conv1d"):
        assert not any(k.startswith(f"{at}.{kept}") for k in layers)
        assert tensors[f"{at}.{kept}.weight"] == source[f"{at}.{kept}.weight"], kept
    assert {k for k, v in layers.items() if v["quant_algo"] == "FP8" and ".self_attn." in k} == {
        f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}


@pytest.mark.parametrize("name", list(RUNS))
def test_verify_accepts_the_real_exports(moe_runs, name):
    proc = run_launcher("verify", str(moe_runs[name]["out"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if name.endswith("w4a16"):
        assert "MIXED_PRECISION" in proc.stdout and "FP8" in proc.stdout and "W4A16_NVFP4" in proc.stdout


def _broken_copy(src: Path, dst: Path, drop: str | None = None, change: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    tensors = raw_tensors(dst)
    for shard in dst.glob("*.safetensors"):
        shard.unlink()
    if drop:
        del tensors[drop]
    for name, value in (change or {}).items():
        dtype, shape, _ = tensors[name]
        tensors[name] = (dtype, shape, np.float32(value).tobytes())
    write_safetensors(dst / "model.safetensors", {k: (d, list(s), b) for k, (d, s, b) in tensors.items()})
    return dst


def test_verify_reports_a_missing_expert_scale(moe_runs, tmp_path):
    run = moe_runs["mixtral-w4a4"]
    name = "model.layers.1.block_sparse_moe.experts.2.w3.input_scale"
    broken = _broken_copy(run["out"], tmp_path / "broken", drop=name)
    proc = run_launcher("verify", str(broken))
    assert proc.returncode == 9 and "Traceback" not in proc.stderr
    problems = [line for line in proc.stdout.splitlines() if line.startswith("problem")]
    assert problems == [f"problem {name}: missing (activation scale, W4A4)"], proc.stdout


def test_verify_reports_experts_with_different_input_scales(moe_runs, tmp_path):
    run = moe_runs["mixtral-w4a4"]
    name = "model.layers.0.block_sparse_moe.experts.3.w2.input_scale"
    value = f32(raw_tensors(run["out"])[name][2]) / 2
    proc = run_launcher("verify", str(_broken_copy(run["out"], tmp_path / "b", change={name: value})))
    assert proc.returncode == 9, proc.stdout
    assert f"problem {name}: is {np.float32(value)!s} but the layer's largest" in proc.stdout


def test_verify_reports_a_layer_missing_from_quantized_layers(moe_runs, tmp_path):
    run = moe_runs["qwen3_moe-w4a16"]
    broken = tmp_path / "b"
    shutil.copytree(run["out"], broken)
    for file, key in (("hf_quant_config.json", "quantization"), ("config.json", "quantization_config")):
        cfg = json.loads((broken / file).read_text())
        del cfg[key]["quantized_layers"]["model.layers.1.self_attn.o_proj"]
        (broken / file).write_text(json.dumps(cfg))
    proc = run_launcher("verify", str(broken))
    assert proc.returncode == 9
    assert "problem model.layers.1.self_attn.o_proj: has quantized tensors but no quantized_layers entry" in proc.stdout


@pytest.mark.parametrize("name", list(RUNS))
def test_eval_emulates_the_moe_checkpoint(moe_runs, name, tmp_path):
    run = moe_runs[name]
    out = tmp_path / "eval.json"
    proc = run_launcher("eval", str(run["out"]), "--reference", str(run["source"]), "--text", "heldout-wiki",
                        "--tokens", "256", "--seq-len", "64", "--json-out", str(out), "--no-generations", env=run["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["tokens"] == 4 * 63 and 0 < got["kl_divergence"] < 1
    emulated = {row["name"]: row for row in got["per_layer"]}
    experts = [n for n in emulated if ".experts." in n]
    assert len(experts) == len(moe_layers(run["kind"])) * EXPERTS * 3  # every expert's own dequantized weights
    shared = [n for n in emulated if "shared_expert" in n]
    assert len(shared) == (len(moe_layers(run["kind"])) * 3 if run["kind"] in SHARED_AT else 0)
    if name.endswith("w4a16"):
        assert got["format"]["algo"] == "MIXED_PRECISION" and got["format"]["activations"] == ["fp8", "none"]
        assert {emulated[n]["act"] for n in experts} == {"none"}
    else:
        assert {emulated[n]["act"] for n in experts} == {"nvfp4"}


def test_payload_refuses_an_uncalibrated_expert(ref_python, tiny_models):
    """The payload's check after calibration (container_payload/steps/moe.py): a forward loop that
    never reaches the experts leaves their input quantizers without amax, and the job stops."""
    script = f"""
import sys; sys.path.insert(0, {str(REPO)!r})
import torch, modelopt.torch.quantization as mtq
from transformers import AutoModelForCausalLM
from container_payload.steps import moe
from container_payload.core.events import PayloadError
m = AutoModelForCausalLM.from_pretrained({str(tiny_models['mixtral'])!r}, dtype=torch.bfloat16)
m = mtq.quantize(m, moe.build_config("moe-w4a4-experts", mtq), lambda model: None)
try:
    moe.check_calibrated(m)
except PayloadError as e:
    print("REFUSED", e)
"""
    proc = subprocess.run([ref_python, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REFUSED"))
    assert "input_quantizer (no amax)" in line and ".experts." in line


def test_a_model_type_unknown_to_the_image_fails_in_one_line(tiny_models, old_image, shared_assets, tmp_path):
    """Qwen3.5-MoE needs transformers 5: in the 2025 stack's image (transformers 4.57; the MoE
    recipe runs in its derived image with ModelOpt 0.47) the payload stops before loading any
    weight, in one line that says what to do, and leaves no output."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "assets").symlink_to(shared_assets)
    out = tmp_path / "out"
    proc = run_launcher("quantize", "--model", str(tiny_models["qwen3_5_moe"]), "--output", str(out), "--recipe",
                        "moe-w4a16-experts", "--image", old_image, *CALIB, "--no-eval",
                        env={"SPARK_NVFP4_HOME": str(home)})
    assert proc.returncode == 7, proc.stderr[-3000:]
    line = one_line_error(proc.stderr)
    assert "model type 'qwen3_5_moe_text'" in line and "unknown to this image's transformers 4.57" in line, line
    assert "--image" in line and not out.exists()
