"""One payload container: create, stream, wait, and always remove.

The container is labelled with the run id so that rollback and orphan reaping find
it by label, never by name. No secret ever enters it: the model and hub datasets are
fetched on the host, and the container runs without network. Every container the
launcher starts is made here, and gets `hardening_kwargs()`: no capabilities, no privilege
gain, a pids limit, a read-only root filesystem with a tmpfs /tmp, and a memory limit
(except where noted: an image build's root, trtllm-serve's root and memory).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from docker.errors import APIError, DockerException, NotFound
from docker.types import DeviceRequest, Mount

import container_payload
import docker
from container_payload.core import contract

from ..common.daemon import LABEL_PREFIX, ROLE_LABEL, RUN_LABEL, has_nvidia_runtime
from ..common.errors import DOCKER_ERRORS, Interrupted, OutOfMemory, PayloadFailed, docker_error
from ..common.files import atomic_write_text
from .logstream import EventStream, open_log

if TYPE_CHECKING:
    from ..records import runs

# The payload ships inside this package's distribution (a wheel or `pip install .` has it too)
# and is mounted read-only into the image: nothing of ours is installed there.
PAYLOAD_DIR = Path(container_payload.__file__).resolve().parent
PAYLOAD_TARGET = "/opt/spark-nvfp4"


# How NVIDIA's playbook runs its TensorRT-LLM image (`--ipc=host --ulimit memlock=-1 --ulimit
# stack=67108864`): deep recursion in the compilers wants a 64 MiB stack, and CUDA's pinned host
# buffers unlimited locked memory (given with a GPU only: nothing else pins, and hosts without
# CAP_SYS_RESOURCE for dockerd refuse to raise it). Instead of the host's IPC namespace, a private
# /dev/shm sized for quantization (docker's 64 MB default is too small for torch's shared
# tensors): one process needs no more, and the container does not see the host's shared memory.
NVIDIA_SETTINGS = dict(shm_size="16g")  # a tmpfs: only what is written uses memory
STACK = docker.types.Ulimit(name="stack", soft=64 << 20, hard=64 << 20)
MEMLOCK = docker.types.Ulimit(name="memlock", soft=-1, hard=-1)


PAYLOAD_ENV = {"HOME": "/tmp", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def payload_command(command: str, *args: str) -> list[str]:
    """The payload's one entry point (container_payload/__main__.py)."""
    return ["python3", "-m", "container_payload", command, *args]


@dataclass
class Bind:
    host: Path
    target: str
    read_only: bool = True

    def mount(self) -> Mount:
        return Mount(target=self.target, source=str(Path(self.host).resolve()), type="bind",
                     read_only=self.read_only)


def owner_labels(run_id: str, role: str) -> dict[str, str]:
    return {RUN_LABEL: run_id, ROLE_LABEL: role,
            f"{LABEL_PREFIX}.owner-pid": str(os.getpid()),
            f"{LABEL_PREFIX}.owner-host": socket.gethostname()}


def gpu_requests(gpus: str, nvidia_runtime: bool) -> list[DeviceRequest]:
    if gpus == "none" or (gpus == "auto" and not nvidia_runtime):
        return []
    if gpus in ("auto", "all"):
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return [DeviceRequest(device_ids=gpus.split(","), capabilities=[["gpu"]])]


def check_gpus(gpus: str, nvidia_runtime: bool) -> None:
    """GPUs asked for by name (--gpus all, 0,1) where Docker has no NVIDIA runtime: the error the
    container's start would end in, said before anything is downloaded (and by a dry run)."""
    if gpu_requests(gpus, nvidia_runtime) and not nvidia_runtime:
        t = DOCKER_ERRORS[("start-gpu", None)]
        raise t.error(t.what, where="--gpus", advice=t.advice)


# Enough for torch's thread pools and tokenizers on a 20-core Spark, far below a fork bomb.
PIDS_LIMIT = 4096
HOST_RESERVE = 4 << 30  # memory left to the host (desktop, launcher, page cache for the reads)


def memory_budget() -> int:
    """The default container memory limit: the host's memory less a reserve, so a payload
    that outgrows the machine is stopped inside its own cgroup (exit 137, with advice)
    instead of the kernel's OOM killer picking a host process."""
    total = psutil.virtual_memory().total
    return max(1 << 30, total - max(HOST_RESERVE, total // 10))


def hardening_kwargs(mem_limit: str | int | None = None, *, read_only: bool = True,
                     limit_memory: bool = True, tmp_size: str = "4g") -> dict:
    """docker create() options every launcher container gets (docs/decisions.md, issue 13).

    The payload runs as the calling user and needs no capability at all: it reads its
    mounts, writes /out (a bind owned by that user) and /tmp. PID 1 is tini (init=True),
    which needs none either. `read_only` keeps the image's own files unwritable; /tmp is
    a tmpfs (HOME=/tmp there, so caches of torch, triton and HF land in it).
    `limit_memory` False: trtllm-serve, whose KV cache takes most of a Spark's unified memory."""
    kw = dict(
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        pids_limit=PIDS_LIMIT,
    )
    if limit_memory:
        kw["mem_limit"] = mem_limit or memory_budget()
    if read_only:
        kw["read_only"] = True
        kw["tmpfs"] = {"/tmp": f"rw,nosuid,nodev,size={tmp_size}"}
    return kw


class PayloadContainer:
    """One container of the launcher's: `python3 -m container_payload.<module> <job>` in the
    image (payload=True), or a plain command of the image (an image build, trtllm-serve).
    Attached (`run`: logs streamed until it exits) or detached (`start`: it keeps running)."""

    def __init__(self, client: docker.DockerClient, image: str, run_id: str, role: str = "quantize"):
        self.client = client
        self.image = image
        self.run_id = run_id
        self.role = role
        self.noun = "server container" if role == "serve" else "container"  # for messages
        self.container = None
        self.publish: int | None = None
        self._wants_gpu = False

    def create(self, command: list[str], binds: list[Bind], *, env: dict[str, str] | None = None,
               device_requests: list[DeviceRequest] | None = None, mem_limit: str | None = None,
               network: str | None = None, publish: int | None = None, container_port: int = 8000,
               name: str | None = None, user: str | None = "host", payload: bool = True,
               read_only: bool | None = None, limit_memory: bool = True, host_ipc: bool = False):
        """`payload` False: a plain container of the image, without our code, working folder or
        environment (an image build, whose commit would keep those; trtllm-serve). `read_only`
        defaults to `payload`: an image build writes into the image. `publish`: the host port
        on 127.0.0.1 only that `container_port` is published on. `host_ipc`: NVIDIA's setting
        for TensorRT-LLM (NCCL/MPI shared memory), instead of our private /dev/shm."""
        mounts = [Bind(PAYLOAD_DIR, f"{PAYLOAD_TARGET}/container_payload").mount()] if payload else []
        mounts += [b.mount() for b in binds]
        kwargs = dict(
            image=self.image,
            command=command,
            mounts=mounts,
            environment={**(PAYLOAD_ENV if payload else {}), **(env or {})},
            labels=owner_labels(self.run_id, self.role),
            # Files the payload writes into the output must belong to the user, not root. The
            # probe and trtllm-serve run as the image's own user (None), an image build as root.
            user=f"{os.getuid()}:{os.getgid()}" if user == "host" else user,
            init=True,  # tini as PID 1: docker stop's SIGTERM reaches python
            device_requests=device_requests or [],
            detach=True,
            name=name,
            ulimits=[STACK, MEMLOCK] if device_requests else [STACK],
            **({"ipc_mode": "host"} if host_ipc else NVIDIA_SETTINGS),
            **hardening_kwargs(mem_limit, read_only=payload if read_only is None else read_only,
                               limit_memory=limit_memory),
        )
        if payload:
            kwargs["working_dir"] = PAYLOAD_TARGET
        if network:
            kwargs["network_mode"] = network
        if publish is not None:  # loopback only: see serve.py for why
            kwargs["ports"] = {f"{container_port}/tcp": ("127.0.0.1", publish)}
        self.publish, self._wants_gpu = publish, bool(device_requests)
        try:
            self.container = self.client.containers.create(**kwargs)
        except APIError as e:
            raise docker_error(e, "create", ref=self.image, noun=self.noun) from None
        return self.container

    def start(self) -> None:
        """Start it and return at once (detached: a server, a probe)."""
        assert self.container is not None
        try:
            self.container.start()
        except APIError as e:
            raise self._start_error(e) from None

    def _start_error(self, e: APIError):
        """Docker says 500 for most start failures; the facts we can check pick the advice."""
        if self._wants_gpu and not has_nvidia_runtime(self.client):
            return docker_error(e, "start-gpu")
        if self.publish is not None and not port_free(self.publish):
            return docker_error(e, "publish", where="--port", port=str(self.publish))
        return docker_error(e, "start", noun=self.noun)

    def run(self, stream: EventStream) -> int:
        """Start and stream logs until the payload exits; return its exit status. Ctrl-C or
        SIGTERM (raised like Ctrl-C: ending.catch_sigterm) stops the container and raises
        Interrupted (the caller removes it)."""
        assert self.container is not None
        try:
            self.start()
            for chunk in self.container.logs(stream=True, follow=True, stdout=True, stderr=True):
                stream.feed(chunk)
            status = self.container.wait()
            return int(status.get("StatusCode", 1))
        except KeyboardInterrupt:
            self.stop()
            raise Interrupted("interrupted: the container was stopped and removed",
                              advice="rerun the same command to resume") from None

    def log_lines(self, tail: int = 200) -> list[str]:
        """Its last lines of output; none when it is gone already."""
        try:
            return self.container.logs(tail=tail).decode("utf-8", "replace").splitlines()
        except (DockerException, AttributeError):
            return []

    def oom_killed(self) -> bool:
        try:
            self.container.reload()
            return bool(self.container.attrs["State"].get("OOMKilled"))
        except (NotFound, APIError, AttributeError):
            return False

    def stop(self, timeout: int = 10) -> None:
        if self.container is None:
            return
        try:
            self.container.stop(timeout=timeout)
        except (NotFound, APIError):
            pass

    def remove(self) -> bool:
        """Force-remove it; True when it is gone (False: Docker refused, it is still there)."""
        if self.container is None:
            return True
        try:
            self.container.remove(force=True)
        except NotFound:
            pass
        except APIError:
            return False
        return True


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (bind test: connect would miss a listener elsewhere)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def check_exit(code: int, stream: EventStream, oom_killed: bool, log_path: Path) -> None:
    """Turn the container's ending into nothing (success) or one typed error."""
    out = stream.outcome
    if code == 0 and out.error is None:
        return
    if code == 137 or oom_killed:
        raise OutOfMemory("the payload was killed (exit 137): the container ran out of memory",
                          where=str(log_path),
                          advice="give Docker more memory, raise --memory-limit, close other programs, "
                                 "or lower --calib-batch-size")
    if out.saw_cuda_oom or (out.error and out.error.get("kind") == "oom"):
        raise OutOfMemory("the GPU ran out of memory during quantization", where=str(log_path),
                          advice="lower --calib-batch-size or --calib-seq-len, or free the GPU")
    if out.error:
        raise PayloadFailed(f"payload failed: {out.error.get('message', 'unknown error')}", where=str(log_path),
                            advice="see the log for details")
    last = out.tail[-1] if out.tail else "no output"
    raise PayloadFailed(f"payload exited with status {code}: {last[:200]}", where=str(log_path),
                        advice="see the log for details")


@dataclass
class PayloadRun:
    """Everything one payload container needs; `run_payload` does the rest."""
    client: docker.DockerClient
    image: str
    record: "runs.RunRecord"
    module: str                      # the payload command (contract.JOBS)
    job: object                      # its contract job (a dataclass of container_payload/core/contract.py)
    binds: list[Bind]
    gpus: str = "none"
    nvidia: bool = False
    env: dict | None = None
    network: str | None = "none"     # the payload needs no network unless told otherwise
    mem_limit: str | None = None
    keep: bool = False
    secrets: tuple[str, ...] = ()


def run_payload(p: PayloadRun, console) -> EventStream:
    """Write the job file into the run's folder, run the container with live progress,
    always remove it (unless keep), and raise a typed error for any failure."""
    job_file = p.record.folder / f"{p.module}-job.json"
    atomic_write_text(job_file, contract.to_json(p.job))
    box = PayloadContainer(p.client, p.image, p.record.id, role=p.module)
    box.create(payload_command(p.module, "/run/job.json"), p.binds + [Bind(job_file, "/run/job.json")], env=p.env,
               device_requests=gpu_requests(p.gpus, p.nvidia), mem_limit=p.mem_limit, network=p.network)
    p.record.add("containers", box.container.id)
    try:
        with open_log(p.record.log_path) as log, EventStream(log, console, secrets=p.secrets) as stream:
            code = box.run(stream)
            oom = box.oom_killed()
        check_exit(code, stream, oom, p.record.log_path)
        return stream
    finally:
        if not p.keep:
            box.remove()
