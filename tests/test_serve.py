"""`launcher serve` for real: quantize the embedded model, serve it from the stand-in
image (the exact-emulation server), ask it over HTTP on 127.0.0.1 like any OpenAI
client would, then `launcher rollback` and check the container is gone.

Only 127.0.0.1 is ever used to reach the server: the port is published there alone.
"""
from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from conftest import latest_record, one_line_error, run_launcher

pytestmark = [pytest.mark.docker, pytest.mark.slow]

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict, timeout: float = 300, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    with NO_PROXY.open(req, timeout=timeout) as r:
        assert r.status == 200
        return json.loads(r.read())


def raw_exchange(port: int, request: bytes, timeout: float = 20) -> bytes:
    """Everything the server sends back on one connection until it closes it (or goes quiet)."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:  # a server that keeps the connection open and waits
            got += b"<timed out>"
    return got


def raw_post(port: int, headers: list[bytes], body: bytes) -> bytes:
    """raw_exchange of a chat POST with these headers and this body, as sent (nothing added)."""
    return raw_exchange(port, b"\r\n".join([b"POST /v1/chat/completions HTTP/1.1", b"Host: x", *headers])
                        + b"\r\n\r\n" + body)


def one_answer(got: bytes, status: bytes) -> bool:
    """`got` is one HTTP/1.1 answer with `status`, its body exactly its Content-Length, and then the
    connection closed: nothing the server said after it (an answer to an unread body, even one
    without a status line)."""
    head, _, body = got.partition(b"\r\n\r\n")
    length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head + b"\r\n")
    return head.startswith(b"HTTP/1.1 " + status) and length is not None and len(body) == int(length[1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_assets, small_checkpoint):
    """conftest's small quantization (served read-only), and a home of the module's own."""
    from conftest import REAL_HOME

    home = tmp_path_factory.mktemp("serve") / "home"
    home.mkdir()
    (home / "assets").symlink_to(shared_assets)
    (REAL_HOME / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(REAL_HOME / "models")
    return small_checkpoint, home


def test_serve_chat_rollback(checkpoint, docker_client):
    ckpt, home = checkpoint
    env = {"SPARK_NVFP4_HOME": str(home)}
    port = free_port()
    t = time.time()
    proc = run_launcher("serve", str(ckpt), "--port", str(port), "--image", "spark-nvfp4/trtllm-standin:cpu",
                        "--timeout", "240", env=env, timeout=420)
    print(f"serve: {time.time() - t:.0f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = latest_record(home)
    assert rec["command"] == "serve" and rec["status"] == "complete"
    (cid,) = rec["created"]["containers"]
    try:
        c = docker_client.containers.get(cid)
        assert c.status == "running" and c.labels["io.spark-nvfp4.run-id"] == rec["id"]
        # published on loopback only
        assert c.attrs["HostConfig"]["PortBindings"] == {"8000/tcp": [{"HostIp": "127.0.0.1",
                                                                       "HostPort": str(port)}]}
        assert f"http://127.0.0.1:{port}/v1" in proc.stdout
        assert f"launcher rollback {rec['id']}" in proc.stdout
        assert "answer:" in proc.stdout

        # issue 13 (docs/decisions.md): a key, printed once, delivered as a file that is gone now; hardened container
        (key,) = [ln.split()[2] for ln in proc.stdout.splitlines() if ln.startswith("api key:")]
        assert len(key) >= 24 and key not in json.dumps(rec) and key not in json.dumps(c.attrs)
        assert not (home / "runs" / rec["id"] / "api-key").exists()
        host = c.attrs["HostConfig"]
        assert host["CapDrop"] == ["ALL"] and "no-new-privileges:true" in host["SecurityOpt"]
        assert host["PidsLimit"] > 0 and host["ReadonlyRootfs"] and host["Memory"] > 0
        with pytest.raises(urllib.error.HTTPError) as nokey:
            post(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert nokey.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as wrong:
            # the last character changed (a key that already ended in "x" stayed the right one: 400, seen once)
            post(port, "/v1/chat/completions", {"messages": []}, timeout=30,
                 key=key[:-1] + ("y" if key.endswith("x") else "x"))
        assert wrong.value.code == 401
        with NO_PROXY.open(f"http://127.0.0.1:{port}/health", timeout=30) as r:  # health stays open
            assert r.status == 200
        # A refused POST's unread body must not be served as the next request of a kept-alive connection
        # (here a body that is itself a request: one answer, the 401, then the server closes).
        inner = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        got = raw_post(port, [b"Content-Type: application/json", b"Content-Length: %d" % len(inner)], inner)
        assert one_answer(got, b"401"), got
        auth = b"Authorization: Bearer " + key.encode()
        # a Content-Length that is no length is a 400 at once, not a read that waits for the client to close
        got = raw_post(port, [auth, b"Content-Length: -1"], b"{}")
        assert one_answer(got, b"400") and b"Content-Length must be" in got, got
        # a chunked body is refused unread, and the connection closed (no second answer from its chunks)
        got = raw_post(port, [auth, b"Transfer-Encoding: chunked"], b"%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner))
        assert one_answer(got, b"400") and b"chunked" in got, got

        # a real client request, from here, over 127.0.0.1
        reply = post(port, "/v1/chat/completions", {
            "model": ckpt.name, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Name a colour."}]}, key=key)
        content = reply["choices"][0]["message"]["content"]
        assert content.strip(), reply
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] > 0
        models_req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                            headers={"Authorization": f"Bearer {key}"})
        with NO_PROXY.open(models_req, timeout=30) as r:
            models = json.loads(r.read())["data"]
        assert models[0]["id"] == ckpt.name and models[0]["emulation"]["algo"] == "NVFP4"
        with pytest.raises(urllib.error.HTTPError) as bad:  # a bad request is a 400, and the server lives
            post(port, "/v1/chat/completions", {"messages": []}, timeout=30, key=key)
        assert bad.value.code == 400

        # the orphan reaper of the next command must leave a served run alone
        assert run_launcher("list", env=env).returncode == 0
        docker_client.containers.get(cid)
    finally:
        t = time.time()
        rb = run_launcher("rollback", rec["id"], "--yes", env=env, timeout=120)
        print(f"rollback: {time.time() - t:.0f} s")
    assert rb.returncode == 0, rb.stdout + rb.stderr
    from docker.errors import NotFound
    with pytest.raises(NotFound):
        docker_client.containers.get(cid)
    assert not docker_client.containers.list(all=True, filters={"label": f"io.spark-nvfp4.run-id={rec['id']}"})
    with pytest.raises(OSError):
        NO_PROXY.open(f"http://127.0.0.1:{port}/health", timeout=5).read()
    assert json.loads((home / "runs" / rec["id"] / "record.json").read_text())["status"] == "rolled-back"


def test_serve_port_taken(checkpoint):
    ckpt, home = checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_launcher("serve", str(ckpt), "--port", str(port), env={"SPARK_NVFP4_HOME": str(home)},
                            timeout=60)
    assert proc.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in one_line_error(proc.stderr)


def test_serve_not_a_checkpoint(launcher_home, tmp_path):
    proc = run_launcher("serve", str(tmp_path), "--port", str(free_port()), timeout=60)
    assert proc.returncode == 2
    assert "not a checkpoint folder" in one_line_error(proc.stderr)


def test_serve_server_exits(launcher_home, tmp_path, docker_client, standin_image):
    """A checkpoint the server cannot load: it exits before /health; one error line with
    its reason, the log tail shown, the container removed, the run marked failed."""
    bad = tmp_path / "bad-ckpt"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "modelopt", "quant_algo": "INT4_AWQ"}}))
    proc = run_launcher("serve", str(bad), "--port", str(free_port()), "--image", standin_image,
                        "--timeout", "240", timeout=300)
    assert proc.returncode == 7, proc.stderr
    line = one_line_error(proc.stderr)
    assert "the server exited (status 1) before it was ready" in line and "INT4_AWQ" in line
    rec = latest_record(launcher_home)
    assert rec["status"] == "failed" and rec["created"]["containers"] == []
    assert not docker_client.containers.list(all=True, filters={"label": f"io.spark-nvfp4.run-id={rec['id']}"})
    assert "INT4_AWQ" in (launcher_home / "runs" / rec["id"] / "log.txt").read_text()
