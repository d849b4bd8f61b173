"""The recipe registry and requirement set (container_payload/core/recipes.py) and the derived
image's plan, host side: no Docker, no torch. The stacks below are the ones NVIDIA's images
carry (docs/images.md); the end-to-end proof is tests/test_real_image.py."""
from __future__ import annotations

import pytest

from container_payload.core import recipes

# What NVIDIA's late-2025 TensorRT-LLM image reports (a probe's `packages`, abridged).
NVIDIA_2025 = {
    "torch": "2.9.0a0+50eac811a6.nv25.10", "numpy": "1.26.4", "transformers": "4.57.1",
    "nvidia-modelopt": "0.37.0", "tensorrt_llm": "1.2.0rc1", "tensorrt": "10.13.2.6", "triton": "3.5.0",
    "nvidia-cublas-cu13": "13.0.0.19", "nvidia-ml-py": "13.580.82", "accelerate": "1.10.1",
    "safetensors": "0.6.2", "setuptools": "79.0.1",
}
MID_2025 = {**NVIDIA_2025, "transformers": "4.53.1", "nvidia-modelopt": "0.33.1", "torch": "2.8.0a0+5228986c39.nv25.5"}


def test_version_tuple_reads_nvidia_builds():
    assert recipes.version_tuple("2.9.0a0+50eac811a6.nv25.10") == (2, 9, 0)
    assert recipes.version_tuple("0.37.0") < recipes.version_tuple("0.47")
    assert recipes.version_tuple("4.57.1") >= recipes.version_tuple("4.57")


def test_modelopt_037_exports_with_cuda_only():
    default = recipes.needs_for("default")
    assert recipes.shortfalls(default, NVIDIA_2025, cuda=True) == []
    (short,) = recipes.shortfalls(default, NVIDIA_2025, cuda=False)
    assert short.dist == "nvidia-modelopt" and short.need == "0.47" and "without CUDA" in str(short)


def test_our_recipes_need_static_block_scales_even_on_a_gpu():
    (short,) = recipes.shortfalls(recipes.needs_for("smooth-gptq-seq-mp"), NVIDIA_2025, cuda=True)
    assert short.dist == "nvidia-modelopt" and short.need == "0.46"
    assert recipes.shortfalls(recipes.needs_for("smooth-gptq-seq-mp"),
                              {**NVIDIA_2025, "nvidia-modelopt": "0.47.0"}, cuda=False) == []


def test_old_transformers_and_missing_packages_are_named():
    missing = recipes.shortfalls(recipes.needs_for("default", embedded=True), MID_2025, cuda=True)
    assert {m.dist for m in missing} == {"transformers", "gguf", "nvidia-modelopt"}
    assert any(str(m) == "transformers 4.53.1 < 4.57" for m in missing)


def test_formats_and_yaml_recipes_have_their_own_floors():
    w4a16 = recipes.needs_for("default", "nvfp4-w4a16")
    assert recipes.shortfalls(w4a16, NVIDIA_2025, cuda=True)[0].need == "0.45"
    yaml_needs = recipes.needs_for("general/ptq/nvfp4_default-kv_fp8_cast")
    assert {m.dist for m in recipes.shortfalls(yaml_needs, NVIDIA_2025, cuda=True)} == {"nvidia-modelopt",
                                                                                         "omegaconf"}


@pytest.mark.parametrize("name,ok", [("default", True), ("smooth-gptq-seq-mp", True),
                                     ("general/ptq/nvfp4_experts_only-kv_fp8_cast", True),
                                     ("my_recipe.yaml", True), ("bogus", False), ("../x", False),
                                     ("general/ptq/$(rm -rf)", False)])
def test_recipe_names(name, ok):
    assert (recipes.check_name(name) is None) == ok


def test_launcher_rejects_a_missing_yaml_and_takes_a_library_name(tmp_path):
    from launcher.common.config import load_spec
    from launcher.common.errors import ConfigError

    assert load_spec({"recipe": "general/ptq/nvfp4_default-kv_fp8_cast"}, {}, environ={}).recipe
    recipe = tmp_path / "r.yaml"
    recipe.write_text("metadata: {recipe_type: ptq}\n")
    assert load_spec({"recipe": str(recipe)}, {}, environ={}).recipe == str(recipe)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_spec({"recipe": str(tmp_path / "absent.yaml")}, {"recipe": "--recipe"}, environ={})


def _probe(packages):
    from launcher.containers.image_probe import ImageProbe

    return ImageProbe(image_id="sha256:" + "ab" * 32, arch="aarch64", python="3.12.3", torch_cuda="13.0",
                      trtllm_serve="/usr/local/bin/trtllm-serve", user="root", uid=0, packages=packages)


def test_derived_plan_pins_the_foundation_and_installs_only_from_the_lock():
    from launcher.containers import derived_image

    p = derived_image.plan("nvcr.io/nvidia/tensorrt-llm/release:spark-single-gpu-dev", _probe(NVIDIA_2025))
    pinned = {c.split("==")[0] for c in p.constraints}
    assert {"torch", "numpy", "tensorrt_llm", "tensorrt", "triton", "nvidia-cublas-cu13"} <= pinned
    assert not pinned & {"nvidia-modelopt", "transformers", "accelerate", "nvidia-ml-py", "setuptools"}
    assert "torch==2.9.0a0+50eac811a6.nv25.10" in p.constraints
    # transformers 4.57.1 is new enough: kept; ModelOpt comes from the lock
    assert [x.split("==")[0] for x in p.install] == ["nvidia-modelopt", "gguf", "omegaconf"]
    assert p.tag == f"spark-nvfp4/derived:{'ab' * 6}-{derived_image.lock_hash()}"


def test_the_lock_has_a_version_for_everything_a_derived_image_may_need():
    from launcher.containers import derived_image

    nothing = recipes.shortfalls(recipes.EVERYTHING, {}, cuda=False)
    pins = derived_image.lock_pins()
    assert {recipes.dist_key(m.dist) for m in nothing} <= set(pins)
    # and each pin satisfies the floor it is installed for
    for m in nothing:
        if m.need:
            version = pins[recipes.dist_key(m.dist)].split("==")[1]
            assert recipes.version_tuple(version) >= recipes.version_tuple(m.need), m


def test_host_pip_settings_reach_the_build_without_host_paths(tmp_path, monkeypatch):
    from launcher.containers import derived_image

    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.example/simple\ncert = /etc/proxy-ca.pem\n"
                    "extra-index-url = file:///opt/pypi/simple https://extra.example/simple\nconstraint = /x\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_CERT", raising=False)
    monkeypatch.setattr(derived_image, "PIP_CONFIG_FILES", ())
    got = derived_image.host_pip_settings()
    assert got["index-url"] == "https://mirror.example/simple" and got["retries"] == "0"
    assert got["cert"] == "/etc/proxy-ca.pem" and "constraint" not in got
    assert got["extra-index-url"] == "https://extra.example/simple"  # the host's file: index is not the container's
