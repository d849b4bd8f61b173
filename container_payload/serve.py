"""A small OpenAI-compatible server for the CPU stand-in image.

    python3 -m container_payload serve JOB.json

The job is a contract.ServeJob: checkpoint (folder), model_name, port, host, device,
max_new_tokens (cap per request), api_key_file.

On the real image `launcher serve` runs trtllm-serve; here the same flow (container,
published port, /health, one chat request) runs against the EXACT emulation of what the
engines compute (emulated_model.load_any), so the answers are those of the NVFP4 checkpoint,
not of the original model. Greedy decoding only: sampling parameters are accepted and
ignored, because a stand-in that samples could not be compared with anything.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (no streaming).
Requests are served one at a time: the model is not thread-safe and the CPU is the
bottleneck anyway.
"""
import hmac
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .core import events
from .core.contract import READY, ServeJob
from .core.events import PayloadError
from .numerics.emulated_model import load_any


class Engine:
    def __init__(self, checkpoint: Path, device: str, max_new_tokens: int, name: str = "model",
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.name = name  # the host folder's name: inside, the checkpoint is always /ckpt
        events.stage("load", detail=f"{checkpoint} (emulated) on {device}")
        self.model, self.info = load_any(checkpoint, device, trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise PayloadError(f"{checkpoint} has no chat template: /v1/chat/completions cannot format "
                               "messages", kind="input")
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        pad = self.tokenizer.pad_token_id
        self.cap = max_new_tokens
        self.config = GenerationConfig(do_sample=False, eos_token_id=eos,
                                       pad_token_id=pad if pad is not None else next(iter(self.eos)))
        self.lock = threading.Lock()

    def chat(self, messages: list, max_tokens: int) -> dict:
        import torch

        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        n = max(1, min(int(max_tokens), self.cap))
        with self.lock, torch.inference_mode():
            seq = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      generation_config=self.config, max_new_tokens=n)
        new = seq[0, ids.shape[1]:].tolist()
        finish = "stop" if new and new[-1] in self.eos else "length"
        content = self.tokenizer.decode(new, skip_special_tokens=True)
        return {"content": content, "finish_reason": finish, "prompt_tokens": int(ids.shape[1]),
                "completion_tokens": len(new)}


MAX_BODY = 16 << 20  # bytes: far above any chat the stand-in's context can hold


class BadRequest(Exception):
    pass


def validate_messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message needs a 'role' and a 'content'")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            m["content"] = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        elif not isinstance(content, str):
            raise BadRequest("each message needs a 'role' and a 'content'")
    if body.get("stream"):
        raise BadRequest("streaming is not supported by the stand-in server; send stream: false")
    return messages


def make_handler(engine: Engine, api_key: str | None = None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _authorized(self) -> bool:
            """With a key (job key api_key_file), every route but /health needs
            `Authorization: Bearer KEY`, as vLLM's --api-key does."""
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return True
            self._error(401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key")
            return False

        def log_message(self, fmt, *args):  # one line per request on stdout (the container log)
            sys.stdout.write(f"{self.address_string()} {fmt % args}\n")

        def _send(self, status: int, payload: dict, close: bool = False) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str) -> None:
            # A POST answered before its body was read closes the connection: on a kept-alive
            # HTTP/1.1 connection the unread body would be parsed as the next request.
            unread = self.command == "POST" and not self.body_read
            self._send(status, {"error": {"message": message, "type": kind, "code": status}}, close=unread)

        def _body(self) -> dict:
            """The request's JSON body; a chunked body or a bad or oversized Content-Length is a 400
            before any read (read(-1) would wait for the client to close)."""
            if self.headers.get("Transfer-Encoding"):  # unread, a chunked body would be the next request
                raise BadRequest("chunked request bodies are not supported; send Content-Length")
            length = self.headers.get("Content-Length") or "0"
            if not length.isdecimal() or int(length) > MAX_BODY:  # isdigit() takes '²', which int() refuses
                raise BadRequest(f"Content-Length must be a whole number of bytes up to {MAX_BODY}")
            raw = self.rfile.read(int(length))
            self.body_read = True
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            return body

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif not self._authorized():
                return
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": engine.name, "object": "model", "created": int(time.time()),
                     "owned_by": "spark-nvfp4", "emulation": engine.info}]})
            else:
                self._error(404, f"no route {self.path}", "not_found")

        def do_POST(self):
            self.body_read = False  # one handler serves every request of a kept-alive connection
            if not self._authorized():
                return
            if self.path != "/v1/chat/completions":
                self._error(404, f"no route {self.path}", "not_found")
                return
            try:
                body = self._body()
                messages = validate_messages(body)
                max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or engine.cap
            except (ValueError, BadRequest) as e:
                self._error(400, str(e), "invalid_request_error")
                return
            try:
                out = engine.chat(messages, max_tokens)
            except Exception as e:  # noqa: BLE001 - the client gets the reason, the server stays up
                self._error(500, f"{type(e).__name__}: {e}", "server_error")
                return
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model") or engine.name,
                "choices": [{"index": 0, "finish_reason": out["finish_reason"],
                             "message": {"role": "assistant", "content": out["content"]}}],
                "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                          "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}})

    return Handler


def run(job: ServeJob) -> None:
    engine = Engine(Path(job.checkpoint), job.device, int(job.max_new_tokens), job.model_name, job.trust_remote_code)
    # The key comes in a read-only file (never the environment, which `docker inspect` shows);
    # read before /health answers, since the launcher removes the file once the server is up.
    api_key = Path(job.api_key_file).read_text().strip() if job.api_key_file else None
    # Listen only once the model is loaded: /health answering means ready.
    server = ThreadingHTTPServer((job.host, int(job.port)), make_handler(engine, api_key))
    events.emit(READY, port=server.server_address[1], model=engine.name, **engine.info)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(events.run_command(["serve", *sys.argv[1:]]))
