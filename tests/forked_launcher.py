"""`launcher ARGS` in a child forked from a process that has imported the CLI and the verifier
once: what `python -m launcher` does (its exit code; its stdout and stderr, together, in a file),
without its second of imports each time (test_verify*.py run it some 100 times).

The server reports each child's exit code and ru_maxrss (wait4). A forked child's ru_maxrss starts
at the server's size (~50 MB), so a memory bound only gets stricter. A child still running at the
deadline is killed with the server's process group, and the next call starts a new server. The
server starts at the first call, with the environment of that moment, and ends with pytest.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_SERVER = """
import json, os, sys, traceback
from launcher.__main__ import main
import launcher.verify  # noqa: F401  the heavy imports, once
import ml_dtypes  # noqa: F401  the verifier's, when it first checks FP8 block scales
for line in sys.stdin:
    args, out = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(out, os.O_WRONLY | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.argv, code = ["launcher", *args], 0
        try:
            main()
        except SystemExit as e:  # what the interpreter does with it
            code = e.code if isinstance(e.code, int) or e.code is None else (print(e.code, file=sys.stderr) or 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    _, status, usage = os.wait4(pid, 0)
    print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]), flush=True)
"""


class ForkedLauncher:
    def __init__(self):
        self._server: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self._server is None or self._server.poll() is not None:
            self._server = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=REPO, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                            env={**os.environ, "COLUMNS": "200"}, start_new_session=True)
        return self._server

    def __call__(self, *args: str, timeout: float = 60) -> tuple[int, str, float, int]:
        """(exit code, stdout+stderr, seconds, peak RSS bytes) of `launcher ARGS`."""
        server = self._start()
        with tempfile.NamedTemporaryFile("r", encoding="utf-8", errors="replace") as out:
            t = time.monotonic()
            server.stdin.write(json.dumps([list(map(str, args)), out.name]) + "\n")
            server.stdin.flush()
            ready, _, _ = select.select([server.stdout], [], [], timeout)
            if not ready:
                self.close()
                pytest.fail(f"still running after {timeout} s: launcher {' '.join(map(str, args))}")
            reply = server.stdout.readline()
            seconds = time.monotonic() - t
            assert reply, "the fork server died"
            rc, peak_kib = json.loads(reply)
            return rc, out.read(), seconds, peak_kib * 1024  # Linux: KiB

    def close(self) -> None:
        if self._server is not None and self._server.poll() is None:
            os.killpg(self._server.pid, 9)  # the server and a hung child
            self._server.wait()
        self._server = None


forked_launcher = ForkedLauncher()
atexit.register(forked_launcher.close)
