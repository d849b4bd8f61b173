"""The model card states what the recipe cost (docs/decisions.md, issue 14): its own time on this run, and for the
recipes measured at 8B shapes on an H200, that wall time."""
from pathlib import Path

from launcher.quality import model_card


def _result(recipe: str) -> dict:
    return {"format": "nvfp4", "recipe": recipe, "modelopt_preset": "NVFP4_DEFAULT_CFG", "device": "cpu",
            "calibration": {"samples": 128, "seq_len": 512, "source": "brown-calibration.txt"},
            "timings": {"total_s": 431.7, "quantize_s": 377.4}, "source": {"model": "embedded"}}


def test_card_gives_the_recipes_time_and_its_8b_gpu_cost(tmp_path: Path):
    card = model_card.render(tmp_path, _result("smooth-gptq-seq-mp"), None, None)
    assert "| recipe's own time | 377 s" in card
    assert model_card.GPU_8B_COST["smooth-gptq-seq-mp"] in card and "H200" in card


def test_card_without_a_gpu_measurement_says_nothing_about_one(tmp_path: Path):
    card = model_card.render(tmp_path, _result("smooth"), None, None)
    assert "| recipe's own time | 377 s" in card
    assert "8B model" not in card
