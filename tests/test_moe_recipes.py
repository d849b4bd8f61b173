"""The MoE recipes' place in the requirement set (fast: no Docker, no torch)."""
from __future__ import annotations

import pytest

from container_payload import memory_plan, recipes

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
