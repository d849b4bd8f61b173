"""The MoE recipes' place in the requirement set (fast: no Docker, no torch)."""
from __future__ import annotations

import pytest

from container_payload.core import recipes

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
