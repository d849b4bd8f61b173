"""The job spec: file < environment < flags, and errors that name the field and its source."""
from pathlib import Path

import pytest

from launcher.common.config import FLAG_NAMES, JobSpec, QuantFormat, load_spec
from launcher.common.errors import ConfigError

NAMES = {"calibration.samples": "--calib-samples", "recipe": "--recipe"}


def test_layers_flags_over_env_over_file(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: org/from-file\ncalibration:\n  samples: 32\n  seq_len: 256\nkv_cache: fp8\n")
    env = {"SPARK_NVFP4_CALIBRATION__SAMPLES": "64", "SPARK_NVFP4_MODEL": "org/from-env"}
    spec = load_spec({"model": "org/from-flag", "calibration": {"samples": None}}, NAMES, cfg, env)
    assert spec.model == "org/from-flag"            # flag wins
    assert spec.calibration.samples == 64           # env beats file
    assert spec.calibration.seq_len == 256          # file beats default
    assert spec.kv_cache == "fp8" and spec.format is QuantFormat.NVFP4
    assert spec.output == Path("out/from-flag-NVFP4")


@pytest.mark.parametrize("flags,env,needle", [
    ({"calibration": {"samples": 0}}, {}, "invalid calibration.samples = 0: Input should be greater than 0 [--calib-samples]"),
    ({}, {"SPARK_NVFP4_CALIBRATION__SAMPLES": "many"}, "invalid calibration.samples = 'many'"),
    ({"recipe": "magic"}, {}, "invalid recipe = 'magic': Value error, unknown recipe"),
    ({"gpus": "first"}, {}, "invalid gpus = 'first'"),
    ({"calibration": {"source": "notes.docx"}}, {}, "invalid calibration.source"),
    ({"colour": "blue"}, {}, "invalid colour"),
])
def test_invalid_values_name_field_and_source(flags, env, needle):
    with pytest.raises(ConfigError) as e:
        load_spec(flags, NAMES, None, env)
    assert needle in str(e.value)
    if env:
        assert "[$SPARK_NVFP4_CALIBRATION__SAMPLES]" in str(e.value)


def test_bad_config_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "job.toml"
    bad.write_text("model = [unclosed")
    with pytest.raises(ConfigError, match="config file is not valid TOML"):
        load_spec({}, NAMES, bad, {})
    with pytest.raises(ConfigError, match="config file not found"):
        load_spec({}, NAMES, tmp_path / "missing.yaml", {})


def test_recipe_only_for_w4a4():
    with pytest.raises(ValueError, match="applies to nvfp4"):
        JobSpec(format="nvfp4-w4a16", recipe="awq-lite")


def test_only_spec_fields_are_read_from_the_environment():
    # SPARK_NVFP4_HOME and test/benchmark knobs share the prefix; they are not spec fields.
    from launcher.common.config import load_spec

    spec = load_spec({}, {}, environ={"SPARK_NVFP4_REF_PYTHON": "/x/python", "SPARK_NVFP4_HOME": "/tmp/h",
                                      "SPARK_NVFP4_RECIPE": "smooth", "SPARK_NVFP4_CALIBRATION__SAMPLES": "8"})
    assert spec.recipe == "smooth" and spec.calibration.samples == 8


def test_recipe_params_from_flag_environment_and_file_fingerprint_alike(tmp_path):
    from launcher.common.config import FLAG_NAMES, load_spec
    from launcher.quantize.job_inputs import options

    flag = load_spec({"recipe": "smooth-gptq-seq-mp", "recipe_params": ["smooth.alpha=0.6", "gptq.ridge=3"]},
                     FLAG_NAMES, environ={})
    env = load_spec({"recipe": "smooth-gptq-seq-mp"}, FLAG_NAMES,
                    environ={"SPARK_NVFP4_RECIPE_PARAMS": "smooth.alpha=0.6,gptq.ridge=3"})
    cfg = tmp_path / "job.yaml"
    cfg.write_text("recipe: smooth-gptq-seq-mp\nrecipe_params:\n  smooth.alpha: 0.6\n  gptq.ridge: 3\n")
    file = load_spec({}, FLAG_NAMES, cfg, environ={})
    assert flag.recipe_params == env.recipe_params == file.recipe_params == {"smooth.alpha": 0.6, "gptq.ridge": 3.0}
    assert options(flag) == options(env) == options(file)  # the part of the job fingerprint they make
    assert options(flag) != options(load_spec({"recipe": "smooth-gptq-seq-mp"}, FLAG_NAMES, environ={}))



# ---------------------------------------------------------------- values at the edge (issue 22, item 5)

@pytest.mark.parametrize("param,needle", [
    ("smooth.alpha=nan", "smooth.alpha = nan is not a finite number"),
    ("smooth.alpha=inf", "smooth.alpha = inf is not a finite number"),
    ("smooth.alpha=-inf", "smooth.alpha = -inf is not a finite number"),
    ("smooth.alpha=1.5", "smooth.alpha = 1.5 is outside its range [0, 1]"),
    ("smooth.alpha=-0.1", "smooth.alpha = -0.1 is outside its range [0, 1]"),
    ("keep_bf16.batches=0", "keep_bf16.batches = 0 is outside its range >= 1"),
    ("keep_bf16.budget=1.5", "keep_bf16.budget = 1.5 is outside its range [0, 1]"),
    ("gptq.ridge=0", "gptq.ridge = 0 is outside its range > 0"),
    ("gptq.ridge=nan", "gptq.ridge = nan is not a finite number"),
    ("calibrate.preset=MY_OWN_CFG", "calibrate.preset = 'MY_OWN_CFG' must be one of NVFP4_DEFAULT_CFG"),
])
def test_recipe_params_out_of_range_are_refused_with_flag_value_and_range(param, needle):
    with pytest.raises(ConfigError) as e:
        load_spec({"recipe": "smooth-gptq-seq-mp", "recipe_params": [param]}, FLAG_NAMES, environ={})
    assert needle in str(e.value) and "[--recipe-param]" in str(e.value) and e.value.exit_code == 2


def test_recipe_params_from_a_file_are_finite_and_whole(tmp_path):
    # YAML's .nan and a fractional count never reach the payload either
    for text, needle in (("smooth.alpha: .nan", "not a finite number"), ("keep_bf16.batches: 2.5", "whole number")):
        cfg = tmp_path / "job.yaml"
        cfg.write_text(f"recipe: smooth-gptq-seq-mp\nrecipe_params:\n  {text}\n")
        with pytest.raises(ConfigError, match=needle):
            load_spec({}, FLAG_NAMES, cfg, environ={})
    cfg.write_text("recipe: smooth-gptq-seq-mp\nrecipe_params:\n  keep_bf16.batches: 2.0\n")
    assert load_spec({}, FLAG_NAMES, cfg, environ={}).recipe_params == {"keep_bf16.batches": 2}


def test_ranges_are_declared_once_beside_the_parameters():
    # the payload and the launcher read the same declaration: every numeric parameter has one
    from dataclasses import fields

    from container_payload.core import recipes

    for step in recipes.STEPS.values():
        for f in fields(step):
            if f.type in ("float", "int", "float | None"):
                assert f.name in step.ranges, f"{step.key}.{f.name} has no declared range"


def test_a_preset_from_the_registry_decides_the_needs():
    # calibrate.preset is honoured: a GPU-only search preset makes the job need a GPU
    from container_payload.core import recipes

    assert not recipes.needs_for("gptq").gpu
    assert recipes.needs_for("gptq", params={"calibrate.preset": "NVFP4_AWQ_LITE_CFG"}).gpu
    assert recipes.effective("gptq", {"calibrate.preset": "NVFP4_AWQ_LITE_CFG"}).preset == "NVFP4_AWQ_LITE_CFG"


@pytest.mark.parametrize("flags,needle", [
    ({"memory_limit": "0"}, "invalid memory_limit = '0': Value error, must be more than 0 [--memory-limit]"),
    ({"memory_limit": "0g"}, "must be more than 0"),
    ({"memory_limit": "1k"}, "must be in [6m, "),
    ({"memory_limit": "1048576g"}, "this machine's memory"),
    ({"memory_budget": "0"}, "invalid memory_budget = '0': Value error, must be more than 0 [--memory-budget]"),
    ({"calibration": {"batch_size": 10 ** 9}}, "must be 'auto' or a whole number in [1, 65536] [--calib-batch-size]"),
    ({"calibration": {"batch_size": 0}}, "[--calib-batch-size]"),
])
def test_numeric_flags_out_of_range_are_refused(flags, needle):
    with pytest.raises(ConfigError) as e:
        load_spec(flags, FLAG_NAMES, environ={})
    assert needle in str(e.value) and e.value.exit_code == 2


def test_memory_limit_within_the_machine_is_kept():
    import psutil

    top = f"{psutil.virtual_memory().total >> 20}m"
    assert load_spec({"memory_limit": top}, FLAG_NAMES, environ={}).memory_limit == top
    assert load_spec({"memory_limit": "6m"}, FLAG_NAMES, environ={}).memory_limit == "6m"
