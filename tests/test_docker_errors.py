"""The error table (launcher/common/errors.py DOCKER_ERRORS) against real answers of the real
daemon: Docker's status code picks the error, its class and exit code; never its wording."""
from __future__ import annotations

import socket
import uuid

import pytest
from docker.errors import APIError

from launcher.containers.container import PayloadContainer, gpu_requests
from launcher.common.errors import DOCKER_ERRORS, ConfigError, DockerConflict, DockerFailed, ImageError, docker_detail, docker_error
from launcher.containers.image import ImageStore

pytestmark = pytest.mark.docker


@pytest.fixture
def boxes(docker_client):
    made: list[PayloadContainer] = []
    yield made
    for box in made:
        assert box.remove()


def box_of(docker_client, image: str, boxes: list, role: str = "probe") -> PayloadContainer:
    box = PayloadContainer(docker_client, image, f"test-{uuid.uuid4().hex[:6]}", role=role)
    boxes.append(box)
    return box


def test_missing_tag_in_registry_is_404_image_error(registry, docker_client, launcher_home):
    ref = f"{registry}/nvidia/tensorrt-llm/release:no-such-tag-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ImageError) as e:
        ImageStore(docker_client).pull(ref)
    assert e.value.status_code == 404 and e.value.exit_code == 4
    assert e.value.what == f"image {ref} does not exist in the registry" and e.value.where == registry


def test_unreachable_registry_is_500(docker_client):
    ref = "127.0.0.1:9/nvidia/tensorrt-llm/release:x"
    with pytest.raises(ImageError) as e:
        ImageStore(docker_client).pull(ref)
    assert e.value.status_code == 500 and e.value.exit_code == 4
    assert e.value.what.startswith(f"registry unreachable while pulling {ref}: ")
    assert "127.0.0.1:9" in e.value.what  # Docker's own reason follows, first line only


def test_name_conflict_is_409(docker_client, standin_image, boxes):
    name = f"spark-nvfp4-test-{uuid.uuid4().hex[:8]}"
    box_of(docker_client, standin_image, boxes).create(["true"], [], name=name, network="none")
    with pytest.raises(DockerConflict) as e:
        box_of(docker_client, standin_image, boxes).create(["true"], [], name=name, network="none")
    assert e.value.status_code == 409 and e.value.exit_code == 1
    assert e.value.what.startswith("cannot create the container: the name is in use")
    assert "docker rm" in e.value.advice


def test_create_from_missing_image_is_404(docker_client, boxes):
    ref = f"spark-nvfp4/absent:{uuid.uuid4().hex[:8]}"
    with pytest.raises(ImageError) as e:
        box_of(docker_client, ref, boxes).create(["true"], [], network="none")
    assert e.value.status_code == 404 and e.value.exit_code == 4
    assert e.value.what == f"image {ref} is not present: cannot create the container"


def test_port_taken_at_start_is_config_error(docker_client, standin_image, boxes):
    """What serve meets when another program takes the port between its check and the
    start: Docker says 500; the port being taken (checked, not read from the message) says why."""
    box = box_of(docker_client, standin_image, boxes, role="serve")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        box.create(["sleep", "30"], [], publish=port)
        assert box.container.attrs["HostConfig"]["PortBindings"] == {
            "8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
        with pytest.raises(ConfigError) as e:
            box.start()
    assert e.value.status_code == 500 and e.value.exit_code == 2
    assert e.value.what == f"port {port} on 127.0.0.1 was taken meanwhile" and e.value.where == "--port"


def test_gpu_without_nvidia_runtime(docker_client, standin_image, boxes):
    from launcher.common.daemon import has_nvidia_runtime

    if has_nvidia_runtime(docker_client):
        pytest.skip("this Docker has the NVIDIA runtime")
    box = box_of(docker_client, standin_image, boxes)
    box.create(["true"], [], device_requests=gpu_requests("all", False), network="none")
    with pytest.raises(DockerFailed) as e:
        box.start()
    assert e.value.status_code == 500 and e.value.exit_code == 1
    assert "NVIDIA container runtime is missing" in e.value.what and "--gpus none" in e.value.advice


def test_no_status_falls_back_to_the_action_default():
    err = docker_error(APIError("boom\nsecond line", explanation="boom\nsecond line"), "pull", ref="x/y",
                       login="")
    assert isinstance(err, ImageError) and err.status_code is None
    assert err.what == "cannot pull x/y: boom"
    assert docker_detail(ValueError("")) == "ValueError"


def test_every_action_has_a_fallback():
    actions = {action for action, _ in DOCKER_ERRORS}
    assert all((action, None) in DOCKER_ERRORS for action in actions)
