"""A real pull: an image under a name shaped like NVIDIA's, served by Debian's
docker-registry on loopback (pytest-docker starts it), pulled by the launcher with
progress, used for a real run, and removed again by rollback. NGC itself can't be
reached here; the registry stands in for nvcr.io."""
from __future__ import annotations

import io
import json
import uuid

import pytest
from docker.errors import ImageNotFound

from conftest import run_launcher

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def pushed_image(registry, docker_client, standin_image):
    """The stand-in plus one layer of its own, pushed, then absent locally: the
    launcher must really download that layer."""
    ref = f"{registry}/nvidia/tensorrt-llm/release:spark-single-gpu-dev-{uuid.uuid4().hex[:8]}"
    dockerfile = f"FROM {standin_image}\nRUN echo {uuid.uuid4().hex} > /etc/pull-test\n"
    image, _ = docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=ref, rm=True)
    for line in docker_client.images.push(ref, stream=True, decode=True):
        assert "error" not in line, line
    docker_client.images.remove(ref)
    with pytest.raises(ImageNotFound):
        docker_client.images.get(ref)
    yield ref
    try:
        docker_client.images.remove(ref, force=True)
    except ImageNotFound:
        pass


def test_launcher_pulls_from_registry_and_rollback_removes_it(pushed_image, launcher_home, tmp_path,
                                                              docker_client, standin_image):
    out = tmp_path / "out"
    proc = run_launcher("quantize", "--image", pushed_image, "--output", str(out), "--calib-samples", "4",
                        "--calib-seq-len", "64", "--no-eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pulling {pushed_image}" in proc.stderr
    assert f"pulled {pushed_image}" in proc.stderr and "MB downloaded" in proc.stderr
    docker_client.images.get(pushed_image)
    record = json.loads(next((launcher_home / "runs").glob("*/record.json")).read_text())
    assert record["created"]["images"] == [pushed_image]
    assert record["image"] == pushed_image

    proc = run_launcher("rollback", record["id"], "--images", "--outputs", "--yes")
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(ImageNotFound):
        docker_client.images.get(pushed_image)
    docker_client.images.get(standin_image)  # the image we did not pull is untouched
    assert not out.exists()


def test_present_image_is_not_pulled_nor_recorded(launcher_home, tmp_path, standin_image):
    proc = run_launcher("quantize", "--image", standin_image, "--output", str(tmp_path / "o"),
                        "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "pulling" not in proc.stderr
    assert not list((launcher_home / "runs").glob("*/record.json"))  # a dry run leaves no record
