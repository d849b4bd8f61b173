"""Python entry points run in children forked from one interpreter that made their heavy imports
once: what `python -m MODULE ARGS` or `python FILE ARGS` does (exit code, stdout, stderr) without
paying those imports every time. `launcher verify` (the CLI, numpy, ml_dtypes: ~1 s) runs some
100 times in test_verify*.py; each case of test_algorithms.py imports torch, transformers and
ModelOpt (5-10 s).

The preload is the imports the entry point would make anyway, in its order, so a child starts
where a fresh process would be after them. The server reports each child's exit code and
ru_maxrss (wait4): a forked child's starts at the server's size, so a memory bound only gets
stricter. A child still running at the deadline is killed with the server's process group, and
the next call starts a new server. A server starts at its first call, with the environment
given (else that of the moment), and ends with pytest.
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
import json, os, runpy, sys, traceback
sys.path[0] = os.getcwd()  # as `python -m` has it (`-c` puts '' there, which follows a chdir)
exec(sys.argv[1])
for line in sys.stdin:
    kind, target, args, out, err = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the server's commands are not the child's input
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
        sys.argv, code = [target, *args], 0
        try:
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:  # `python FILE` puts the file's folder first on sys.path
                sys.path[0] = os.path.dirname(os.path.abspath(target))
                runpy.run_path(target, run_name="__main__")
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


class ForkServer:
    def __init__(self, python: str, preload: str, env: dict | None = None):
        self._python, self._preload, self._env = python, preload, env
        self._server: subprocess.Popen | None = None
        atexit.register(self.close)

    def _start(self) -> subprocess.Popen:
        if self._server is None or self._server.poll() is not None:
            self._server = subprocess.Popen([self._python, "-c", _SERVER, self._preload], cwd=REPO,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            text=True, env=self._env or {**os.environ, "COLUMNS": "200"},
                                            start_new_session=True)
        return self._server

    def run(self, kind: str, target: str, *args: str, timeout: float = 60) -> tuple[int, str, str, float, int]:
        """(exit code, stdout, stderr, seconds, peak RSS bytes) of `python -m TARGET ARGS` (kind
        "module") or `python TARGET ARGS` (kind "path")."""
        server = self._start()
        with tempfile.NamedTemporaryFile("r", encoding="utf-8", errors="replace") as out, \
                tempfile.NamedTemporaryFile("r", encoding="utf-8", errors="replace") as err:
            t = time.monotonic()
            server.stdin.write(json.dumps([kind, str(target), list(map(str, args)), out.name, err.name]) + "\n")
            server.stdin.flush()
            ready, _, _ = select.select([server.stdout], [], [], timeout)
            if not ready:
                self.close()
                pytest.fail(f"still running after {timeout} s: {target} {' '.join(map(str, args))}")
            reply = server.stdout.readline()
            seconds = time.monotonic() - t
            assert reply, "the fork server died"
            rc, peak_kib = json.loads(reply)
            return rc, out.read(), err.read(), seconds, peak_kib * 1024  # Linux: KiB

    def close(self) -> None:
        if self._server is not None and self._server.poll() is None:
            os.killpg(self._server.pid, 9)  # the server and a hung child
            self._server.wait()
        self._server = None


# `launcher ARGS` in the host venv: the CLI and the verifier (ml_dtypes: when it first checks
# FP8 block scales), as `python -m launcher verify` imports them
_LAUNCHER = ForkServer(sys.executable, "import launcher.cli, launcher.verify, ml_dtypes")


def forked_launcher(*args: str, timeout: float = 60) -> tuple[int, str, float, int]:
    """(exit code, stdout+stderr, seconds, peak RSS bytes) of `launcher ARGS`."""
    rc, out, err, seconds, peak = _LAUNCHER.run("module", "launcher", *args, timeout=timeout)
    return rc, out + err, seconds, peak
