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


def test_card_gives_the_recovery_table_beside_the_kl(tmp_path: Path):
    """`launcher eval --tasks`' result (its tasks.json) as a table under the KL, stderrs included;
    a row without numbers (a hostile or broken file) is left out, not printed as garbage."""
    evaluation = {"text": "heldout-wiki.txt", "tokens": 2047, "perplexity": 20.5, "reference_perplexity": 19.0,
                  "kl_divergence": 0.0712, "top1_agreement": 0.9}
    tasks = {"versions": {"lm_eval": "0.4.13"}, "task_args": {"limit": 8},
             "tasks": {"spark_facts": {"acc": {"reference": 1.0, "quantized": 0.875, "reference_stderr": 0.0,
                                               "quantized_stderr": 0.125, "recovery": 0.875, "recovery_stderr": 0.125},
                                       "bogus": {"reference": "x"}}}}
    card = model_card.render(tmp_path, _result("default"), evaluation, None, tasks)
    kl_at, table_at = card.index("KL(original"), card.index("| task | metric | original | quantized | recovery |")
    assert kl_at < table_at
    assert "| spark_facts | acc | 1.0000 ± 0.0000 | 0.8750 ± 0.1250 | 87.5 ± 12.5% |" in card
    assert "bogus" not in card and "lm-evaluation-harness 0.4.13" in card and "8 documents per task" in card
    assert "| task |" not in model_card.render(tmp_path, _result("default"), evaluation, None)
