"""`launcher serve`: an OpenAI-compatible server for a checkpoint, in the same image.

On NVIDIA's image the server is `trtllm-serve`; on the CPU stand-in (label
io.spark-nvfp4.standin=true) it is container_payload/serve.py, which answers with the
exact emulation of the NVFP4 checkpoint, so the whole flow is real here too.

The server outlives this command: the container is detached, labelled with a run id and
recorded in that run, whose status turns `complete` once /health answers, so the
orphan reaper leaves it alone and `launcher rollback RUN_ID` removes it. The port is
published on 127.0.0.1 only, and this command talks to the server only there: never
through Docker's bridge addresses, which are not reachable from every host (Docker
Desktop, rootless) and would bypass the loopback-only publishing.

Inside its container the server must listen on all interfaces (Docker's published port
arrives on the bridge interface), so other containers and local users could reach it
through the bridge address. The stand-in server therefore requires an API key
(`--api-key`, else a random one printed once): it reaches the container as a
read-only file, never as an environment variable (`docker inspect` shows those), and
the file is deleted once the server has read it. trtllm-serve has no key option in
NVIDIA's image that we could test; for it, the loopback publishing is the protection.
"""
from __future__ import annotations

import json
import os
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from docker.errors import NotFound
from rich.console import Console
from rich.markup import escape

from container_payload.core import contract

from .common import output
from .common.errors import ConfigError, Interrupted, LauncherError, PayloadFailed, PreflightError
from .common.files import atomic_write_text
from .containers.container import Bind, PayloadContainer, gpu_requests, payload_command, port_free
from .containers.logstream import PREFIX as EVENT_PREFIX
from .containers.logstream import find_event
from .containers.session import DockerSession
from .records import runs
from .sources import model_source

CONTAINER_PORT = 8000
KEY_TARGET = "/run/secrets/api-key"
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
LOG_TAIL = 15
# Loopback only, and never through a proxy from the environment (HTTP_PROXY would
# otherwise catch 127.0.0.1 where NO_PROXY is not set).
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class ServeRequest:
    checkpoint: Path
    port: int = 8000
    image: str = "auto"
    timeout: float = 600.0          # seconds to wait for /health
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 32
    api_key: str | None = None      # None: a random key, printed once
    trust_remote_code: bool = False  # the checkpoint's own code (auto_map) may run: model_source.check_remote_code


@dataclass
class ServeOutcome:
    run_id: str
    container_id: str
    endpoint: str
    model: str
    answer: str
    api_key: str | None = None


# ---------------------------------------------------------------- HTTP on 127.0.0.1

def http_json(port: int, path: str, body: dict | None = None, timeout: float = 5.0,
              api_key: str | None = None) -> dict:
    url = f"http://127.0.0.1:{port}{path}"
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    with _HTTP.open(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def healthy(port: int) -> bool:
    try:
        with _HTTP.open(f"http://127.0.0.1:{port}/health", timeout=3) as r:
            return r.status == 200
    except (OSError, ValueError, urllib.error.URLError):
        # refused, reset by docker-proxy while nothing listens inside yet, or a timeout
        return False
    except Exception:  # noqa: BLE001 - http.client's RemoteDisconnected etc.: not ready yet
        return False


# ---------------------------------------------------------------- the container

def create_server(box: PayloadContainer, *, standin: bool, nvidia: bool, ckpt: Path, job_file: Path,
                  port: int, key_file: Path | None = None, trust_remote_code: bool = False) -> None:
    """The server's container, published on 127.0.0.1:port only."""
    if standin:
        # our emulation server: a payload like the others (its hardening, its user), plus the port
        binds = [Bind(ckpt, "/ckpt"), Bind(job_file, "/run/job.json")]
        box.create(payload_command("serve", "/run/job.json"), binds + ([Bind(key_file, KEY_TARGET)] if key_file else []),
                   device_requests=gpu_requests("auto", nvidia), publish=port, container_port=CONTAINER_PORT)
        return
    # NVIDIA's settings for TensorRT-LLM containers: host IPC (NCCL/MPI shared memory),
    # unlimited locked memory, a 64 MB stack. It runs as the image's user and keeps its caches
    # under its home: the root filesystem stays writable. No memory limit: on a Spark's unified
    # memory the KV cache takes most of it (untested on a GPU here).
    # trtllm-serve's own flag for a model with auto_map (untested here: no GPU image)
    trust = ["--trust_remote_code"] if trust_remote_code else []
    box.create(["trtllm-serve", "/ckpt", "--host", "0.0.0.0", "--port", str(CONTAINER_PORT), *trust], [Bind(ckpt, "/ckpt")],
               env={"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}, device_requests=gpu_requests("all", True),
               publish=port, container_port=CONTAINER_PORT, user=None, payload=False, limit_memory=False,
               host_ipc=True)


def write_key_file(path: Path, key: str) -> Path:
    """The key for the container, readable by this user only (the stand-in runs as it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return path


def _reason(lines: list[str]) -> str:
    """The payload's own error event if it sent one (container_payload/core/events.py), else the
    last line it printed."""
    ev = find_event(reversed(lines), "error")
    if ev is not None:
        return str(ev.get("message"))
    text = [l for l in lines if l.strip() and not l.startswith(EVENT_PREFIX)]
    return text[-1].strip()[:200] if text else "no output"


class ServerFailed(PayloadFailed):
    """The server exited, or did not become healthy in time."""


# ---------------------------------------------------------------- the command

def serve(req: ServeRequest, console: Console | None = None, out: Console | None = None) -> ServeOutcome:
    console = console or output.console
    out = out or output.stdout
    ckpt = req.checkpoint.expanduser().resolve()
    if not (ckpt / "config.json").exists():
        raise ConfigError(f"not a checkpoint folder (no config.json): {ckpt}", where="OUTPUT",
                          advice="pass the folder `launcher quantize` wrote")
    model_source.refuse_links_out(ckpt)  # nothing read through a link out of the checkpoint, as eval
    model_source.check_remote_code(ckpt, req.trust_remote_code, str(ckpt))  # before Docker, as quantize does
    if not port_free(req.port):
        raise ConfigError(f"port {req.port} on 127.0.0.1 is already in use", where="--port",
                          advice="pass another --port, or stop what listens there")

    docker = DockerSession.open(console)
    image = docker.image_ref(req.image)
    rec = docker.start_run("serve", {"model": str(ckpt), "checkpoint": str(ckpt), "port": req.port, "image": image},
                           image)
    box = PayloadContainer(docker.client, image, rec.id, role="serve")
    key_file = None
    with rec.ends_on_error():
        try:
            docker.ensure_image(rec, image)
            standin = docker.is_standin(image)
            if not standin and not docker.nvidia:
                raise PreflightError(f"trtllm-serve needs a GPU and Docker has no NVIDIA runtime ({image})",
                                     advice="install nvidia-container-toolkit (see `launcher doctor`), or serve the "
                                            "exact CPU emulation with --image spark-nvfp4/trtllm-standin:cpu")
            console.print(f"run [bold]{rec.id}[/]: serving {escape(str(ckpt))} with {escape(image)}"
                          + (" (CPU stand-in: exact NVFP4 emulation)" if standin else ""), highlight=False)
            key = (req.api_key or secrets.token_urlsafe(24)) if standin else None
            key_file = write_key_file(rec.folder / "api-key", key) if key else None
            job_file = rec.folder / "serve-job.json"
            job_file.write_text(contract.to_json(contract.ServeJob(
                checkpoint="/ckpt", model_name=ckpt.name, port=CONTAINER_PORT, host="0.0.0.0",
                device="auto" if docker.nvidia else "cpu", api_key_file=KEY_TARGET if key else None,
                trust_remote_code=req.trust_remote_code)))
            create_server(box, standin=standin, nvidia=docker.nvidia, ckpt=ckpt, job_file=job_file, port=req.port,
                          key_file=key_file, trust_remote_code=req.trust_remote_code)
            rec.add("containers", box.container.id)  # recorded before it runs: a crash now leaves it findable
            box.start()
            _wait_healthy(box, req, rec, console)
            _save_log(box, rec)
            rec.result = {"endpoint": f"http://127.0.0.1:{req.port}/v1", "container": box.container.id,
                          "port": req.port}
            rec.finish("complete")  # from here on the server is a result, not debris of a live run
        except KeyboardInterrupt:
            _discard(box, rec)
            raise Interrupted("interrupted before the server was ready: its container was removed") from None
        except BaseException:
            _discard(box, rec)
            raise
        finally:
            if key_file is not None:
                key_file.unlink(missing_ok=True)  # read by the server at start; not kept on disk

    endpoint = f"http://127.0.0.1:{req.port}/v1"
    stop = f"launcher rollback {rec.id}"
    try:
        models = http_json(req.port, "/v1/models", timeout=30, api_key=key).get("data") or [{}]
        model = models[0].get("id") or ckpt.name
        reply = http_json(req.port, "/v1/chat/completions", timeout=600, api_key=key, body={
            "model": model, "messages": [{"role": "user", "content": req.prompt}],
            "max_tokens": req.max_tokens, "temperature": 0})
        answer = reply["choices"][0]["message"]["content"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise LauncherError(f"the server is up but the test chat request failed: {e}", where=endpoint,
                            advice=f"see `docker logs {box.container.short_id}`; stop it with `{stop}`") from None
    out.print(f"[bold]prompt:[/] {escape(req.prompt)}", highlight=False)
    out.print(f"[bold]answer:[/] {escape(answer)}", highlight=False)
    out.print(f"[bold]endpoint:[/] {endpoint}  (OpenAI-compatible; model {escape(model)!r})", highlight=False)
    if key and not req.api_key:
        out.print(f"[bold]api key:[/] {key}  (send `Authorization: Bearer KEY`; shown once, stored nowhere)",
                  highlight=False)
    elif not key:
        out.print("[bold]api key:[/] none: trtllm-serve checks no key; the port is on 127.0.0.1 only",
                  highlight=False)
    out.print(f"[bold]stop it:[/] {stop}", highlight=False)
    return ServeOutcome(rec.id, box.container.id, endpoint, model, answer, key)


def _wait_healthy(box: PayloadContainer, req: ServeRequest, rec: runs.RunRecord, console: Console) -> None:
    container = box.container
    start = time.monotonic()
    with console.status(f"waiting for http://127.0.0.1:{req.port}/health") as status:
        while True:
            try:
                container.reload()
            except NotFound:
                raise ServerFailed("the server container disappeared while starting",
                                   advice="was it removed by someone else? run the command again") from None
            if container.status in ("exited", "dead"):
                lines = box.log_lines()
                _save_log(box, rec)
                code = container.attrs.get("State", {}).get("ExitCode")
                _show_tail(lines, console)
                raise ServerFailed(f"the server exited (status {code}) before it was ready: {_reason(lines)}",
                                   where=str(rec.log_path), advice="see the log; the container was removed")
            if healthy(req.port):
                console.print(f"server ready after {time.monotonic() - start:.0f} s")
                return
            waited = time.monotonic() - start
            if waited > req.timeout:
                lines = box.log_lines()
                _save_log(box, rec)
                _show_tail(lines, console)
                raise ServerFailed(f"the server did not answer /health within {req.timeout:.0f} s",
                                   where=str(rec.log_path),
                                   advice="see the log; a big model may need a longer --timeout")
            status.update(f"waiting for http://127.0.0.1:{req.port}/health ({waited:.0f} s)")
            time.sleep(1.0)


def _show_tail(lines: list[str], console: Console) -> None:
    text = [l for l in lines if not l.startswith(EVENT_PREFIX)][-LOG_TAIL:]
    if text:
        console.print("[dim]server log (last lines):[/]")
        for line in text:
            console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)


def _save_log(box: PayloadContainer, rec: runs.RunRecord) -> None:
    """What the server printed so far, for `launcher logs RUN_ID` (later: `docker logs`)."""
    lines = box.log_lines(tail=2000)
    if lines:
        rec.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rec.log_path, "\n".join(lines) + "\n")


def _discard(box: PayloadContainer, rec: runs.RunRecord) -> None:
    """The container of a server that never became ready goes; struck from the record only
    once it is gone (otherwise rollback retries it)."""
    if box.container is None or not box.remove():
        return
    if box.container.id in rec.created.containers:
        rec.created.containers.remove(box.container.id)
        rec.save()
