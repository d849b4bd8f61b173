"""The MoE recipes' place in the requirement set (fast: no Docker, no torch)."""
from __future__ import annotations

import pytest

from container_payload.core import memory_plan, recipes

MOE = ("moe-w4a16-experts", "moe-w4a4-experts")
IMAGE_2025 = {"nvidia-modelopt": "0.37.0", "transformers": "4.57.1", "accelerate": "1.10.0"}


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize("cuda", [True, False])
def test_2025_image_needs_a_newer_modelopt(name, cuda):
    missing = recipes.shortfalls(recipes.needs_for(name), IMAGE_2025, cuda=cuda)
    assert [m.dist for m in missing] == ["nvidia-modelopt"] and missing[0].need == "0.47"


@pytest.mark.parametrize("name", MOE)
def test_the_derived_image_runs_them(name):
    have = {**IMAGE_2025, "nvidia-modelopt": "0.47.0"}
    assert recipes.shortfalls(recipes.needs_for(name), have, cuda=False) == []
    assert recipes.version_tuple(recipes.EVERYTHING.modelopt) >= (0, 47)  # the derived image installs it


def test_listed_and_cpu_capable():
    for name in MOE:
        assert recipes.check_name(name) is None
        assert not recipes.RECIPES[name].needs.gpu


@pytest.mark.parametrize("name", MOE)
def test_they_stream_by_their_steps_plan(name):
    """Issue 20: the MoE layouts are max calibration, so their Calibrate step declares it runs layer
    by layer (recipes.Plan) and the memory plan streams them; no MoE special case decides it."""
    step, = recipes.RECIPES[name].steps
    assert step.plan().whole_only is None and not step.plan().ours
    assert memory_plan.refusal(name) is None and name in memory_plan.STREAMED_RECIPES
    shape = memory_plan.Shape(64 << 30, 2 << 30, 1 << 30)
    assert memory_plan.peaks(shape, 1 << 16, 1 << 12, name) == memory_plan.peaks(shape, 1 << 16, 1 << 12, "default")
    # the declaration decides: a searching preset in the same step is refused
    assert "runs over the whole model" in recipes.Calibrate("NVFP4_AWQ_LITE_CFG").plan().whole_only


def test_streamed_plan_counts_the_experts_the_read_fuses(tmp_path):
    """A checkpoint that stores its experts one by one: the streamed read fuses one layer's experts
    (checkpoint_map), one more copy of them for a moment, and the streamed peak counts it; a dense
    layer of the same size does not add it."""
    from synthetic_ckpt import write_safetensors

    def checkpoint(folder, names):
        folder.mkdir()
        (folder / "config.json").write_text('{"hidden_size": 64, "intermediate_size": 128}')
        write_safetensors(folder / "model.safetensors", {n: ("BF16", [64, 64], bytes(64 * 64 * 2)) for n in names})
        return memory_plan.shape_of(folder, 0)

    experts = [f"model.layers.{i}.mlp.experts.{e}.{p}.weight" for i in range(2) for e in range(4)
               for p in ("gate_proj", "up_proj", "down_proj")]
    dense = [f"model.layers.{i}.mlp.{p}{e}.weight" for i in range(2) for e in range(4)
             for p in ("gate_proj", "up_proj", "down_proj")]
    outside = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    moe, flat = checkpoint(tmp_path / "moe", outside + experts), checkpoint(tmp_path / "dense", outside + dense)
    assert moe.expert_bytes == 12 * 64 * 64 * 2 and flat.expert_bytes == 0
    assert moe.largest_layer_bytes == flat.largest_layer_bytes
    a, b = (memory_plan.peaks(s, 1024, 256, "moe-w4a16-experts") for s in (moe, flat))
    assert a["streamed"] - b["streamed"] == moe.expert_bytes and a["whole"] == b["whole"]
