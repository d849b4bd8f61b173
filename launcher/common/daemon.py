"""The Docker daemon connection, with failures turned into typed errors."""
from __future__ import annotations

import os

from docker.errors import DockerException

import docker

from .errors import DockerUnavailable

LABEL_PREFIX = "io.spark-nvfp4"
RUN_LABEL = f"{LABEL_PREFIX}.run-id"
ROLE_LABEL = f"{LABEL_PREFIX}.role"


def connect(timeout: int = 30) -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except DockerException as e:
        reason = str(e).split("(")[0].strip() or type(e).__name__
        raise DockerUnavailable(f"cannot reach the Docker daemon: {reason}",
                                where=_docker_host(),
                                advice="start it (`sudo systemctl start docker`, or `dockerd &`) "
                                       "and check you may use it (`docker info`)") from None


def _docker_host() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def has_nvidia_runtime(client: docker.DockerClient) -> bool:
    info = client.info()
    return "nvidia" in (info.get("Runtimes") or {}) or info.get("DefaultRuntime") == "nvidia"
