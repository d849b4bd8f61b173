"""The job spec: file < environment < flags, and errors that name the field and its source."""
from pathlib import Path

import pytest

from launcher.config import JobSpec, QuantFormat, load_spec
from launcher.errors import ConfigError

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
    with pytest.raises(ConfigError, match="config file is not valid toml"):
        load_spec({}, NAMES, bad, {})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_spec({}, NAMES, tmp_path / "missing.yaml", {})


def test_recipe_only_for_w4a4():
    with pytest.raises(ValueError, match="applies to nvfp4"):
        JobSpec(format="nvfp4-w4a16", recipe="awq-lite")


def test_only_spec_fields_are_read_from_the_environment():
    # SPARK_NVFP4_HOME and test/benchmark knobs share the prefix; they are not spec fields.
    from launcher.config import load_spec

    spec = load_spec({}, {}, environ={"SPARK_NVFP4_REF_PYTHON": "/x/python", "SPARK_NVFP4_HOME": "/tmp/h",
                                      "SPARK_NVFP4_RECIPE": "smooth", "SPARK_NVFP4_CALIBRATION__SAMPLES": "8"})
    assert spec.recipe == "smooth" and spec.calibration.samples == 8


def test_recipe_params_from_flag_environment_and_file_fingerprint_alike(tmp_path):
    from launcher.config import FLAG_NAMES, load_spec
    from launcher.job_inputs import options

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
