"""Every file the launcher reads is untrusted (issue 22): a home filled with hostile content in
each file it reads there, and hostile --config/--recipe files, end every command within 10 s in
one line (an error with its exit code, or a warning and the command's usual outcome): never a
traceback, a hang, memory exhaustion, or the content of a symlink's target on the screen.

A new file kind is one entry of HOME_FILES, a new kind of hostility one entry of HOSTILE.
The host-only cases point DOCKER_HOST at nothing (fast); the probe-cache cases need the real
daemon and the stand-in image (their commands probe it).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, STANDIN

SECRET = "TOP-SECRET-4711"   # in the file outside the home a symlink points at: never printed
NO_DOCKER = "unix:///nonexistent/docker.sock"
LIMIT_S = 10
PROBE_MARGIN_S = 60


def _deep() -> bytes:
    return b'{"id": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"


def _sparse(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(20 << 30)  # 20 GB that take no disk


# hostility -> how to put it at a path; `valid` is that file kind's good content with SECRET in a
# field some command prints, `wrong` its content with fields of the wrong types
HOSTILE: dict[str, Callable[[Path, Path, bytes, bytes], object]] = {
    "fifo": lambda p, outside, valid, wrong: os.mkfifo(p),
    "symlink-dev-zero": lambda p, outside, valid, wrong: p.symlink_to("/dev/zero"),
    "symlink-outside": lambda p, outside, valid, wrong: (outside.write_bytes(valid), p.symlink_to(outside)),
    "huge-sparse": lambda p, outside, valid, wrong: _sparse(p),
    "invalid-json": lambda p, outside, valid, wrong: p.write_bytes(valid[: len(valid) // 2]),
    "wrong-types": lambda p, outside, valid, wrong: p.write_bytes(wrong),
    "deep-json": lambda p, outside, valid, wrong: p.write_bytes(_deep()),
}
NOT_REGULAR = frozenset({"fifo", "symlink-dev-zero", "symlink-outside"})  # refused before a byte is read


def record(run_id: str, **fields) -> dict:
    base = {"id": run_id, "command": "quantize", "created_at": "2026-11-30T06:00:00+00:00", "status": "failed",
            "pid": 1, "pid_started": 0.0, "host": socket.gethostname(), "spec": {}, "created": {}}
    return {**base, **fields}


def probe_json(image_id: str, python: str = "3.12.3") -> dict:
    return {"image_id": image_id, "arch": "x86_64", "python": python, "user": "root", "uid": 0,
            "packages": {"torch": "2.9.0", "transformers": "4.57.0", "nvidia-modelopt": "0.47.0"}}


@dataclass
class Home:
    home: Path
    tmp: Path
    image_id: str = ""

    def out(self, run: str) -> Path:
        return self.tmp / "outs" / run

    def lock(self, run: str) -> Path:
        return self.tmp / "outs" / f".{run}.spark-nvfp4.lock"


@dataclass(frozen=True)
class HomeFile:
    """One kind of file the launcher reads, in a run of its own (`run`): where it lies, its good
    and wrongly typed content, and the commands that read it ({run}: its run id). 'refuse': the
    command ends in one error line naming the file, exit `code` (for the hostilities in
    `refused_by`: a log is text, JSON damage is none to it); 'tolerate': the exit code of the same
    command on a home without the hostile file; 'warn': that, and one line naming the file."""
    run: str
    path: Callable[[Home, str], Path]
    valid: Callable[[Home, str], dict | str]
    wrong: Callable[[Home, str], dict]
    commands: tuple[tuple[tuple[str, ...], str], ...]
    code: int = 11
    refused_by: frozenset[str] | None = None
    own_record: bool = True    # a good record of `run` besides the hostile file
    docker: bool = False


DOCKER_COMMANDS = (("doctor", "--image", STANDIN),
                   ("quantize", "--dry-run", "--image", STANDIN, "--no-eval", "--output", "{tmp}/outs/new"),
                   ("image", "prepare", "--image", STANDIN, "--dry-run"))

HOME_FILES = {
    "run record": HomeFile(
        run="20261130-060000-a1a1a1", path=lambda h, r: h.home / "runs" / r / "record.json",
        valid=lambda h, r: record(r, spec={"model": SECRET}),
        wrong=lambda h, r: record(r, created_at=5, pid="x", created={"outputs": "/"}, result={"checkpoint_bytes": "x"}),
        commands=((("list",), "warn"), (("status", "{run}"), "refuse"), (("logs", "{run}"), "refuse"),
                  (("logs", "{run}", "--follow"), "refuse"), (("rollback", "{run}", "--dry-run"), "refuse"),
                  (("rollback", "--all", "--outputs", "--dry-run"), "warn"),
                  *((c, "tolerate") for c in DOCKER_COMMANDS)),   # (they skip it silently)
        own_record=False),
    "run log": HomeFile(
        run="20261130-060000-b2b2b2", path=lambda h, r: h.home / "runs" / r / "log.txt",
        valid=lambda h, r: f"{SECRET}\n", wrong=lambda h, r: {"not": ["a", "log"]},
        commands=((("logs", "{run}"), "refuse"), (("logs", "{run}", "--follow"), "refuse"),
                  (("status", "{run}"), "tolerate")),
        refused_by=NOT_REGULAR),
    "run result": HomeFile(
        run="20261130-060000-c3c3c3", path=lambda h, r: h.home / "runs" / r / "result.json",
        valid=lambda h, r: {"run_id": r, "status": "complete", "output": SECRET},
        wrong=lambda h, r: {"run_id": 5, "status": []},
        commands=((("status", "{run}"), "tolerate"), (("logs", "{run}"), "tolerate"))),
    "output result": HomeFile(   # rollback --outputs reads it: is the output still the run's?
        run="20261130-060000-d4d4d4", path=lambda h, r: h.out(r) / "result.json",
        valid=lambda h, r: {"run_id": SECRET}, wrong=lambda h, r: {"run_id": ["x"]},
        commands=((("status", "{run}"), "tolerate"), (("rollback", "--all", "--outputs", "--dry-run"), "tolerate"))),
    "output lock": HomeFile(
        run="20261130-060000-e5e5e5", path=lambda h, r: h.lock(r),
        valid=lambda h, r: {"run_id": SECRET, "pid": 1, "started": 0.0, "host": "elsewhere"},
        wrong=lambda h, r: {"run_id": r, "pid": "x", "started": [], "host": {}},
        commands=((("status", "{run}"), "tolerate"), (("rollback", "--all", "--outputs", "--dry-run"), "tolerate"))),
    "image-probe cache": HomeFile(
        run="", path=lambda h, r: h.home / "probes" / f"{h.image_id.removeprefix('sha256:')}.json",
        valid=lambda h, r: probe_json(h.image_id, python=SECRET),
        wrong=lambda h, r: {**probe_json(h.image_id), "uid": "root", "packages": ["torch"]},
        commands=tuple((c, "warn") for c in DOCKER_COMMANDS), own_record=False, docker=True),
}


def build(h: Home, hostility: str | None) -> None:
    """Every file kind's run and hostile file (none: the clean home the outcomes are compared with)."""
    (h.tmp / "user").mkdir(parents=True)
    (h.tmp / "outs").mkdir()
    for name, kind in HOME_FILES.items():
        if kind.docker and not h.image_id:
            continue
        if kind.own_record:
            path = h.home / "runs" / kind.run / "record.json"
            path.parent.mkdir(parents=True)
            h.out(kind.run).mkdir()
            path.write_text(json.dumps(record(kind.run, output=str(h.out(kind.run)), created={
                "outputs": [str(h.out(kind.run))], "locks": [str(h.lock(kind.run))]})))
        if hostility is None:
            continue
        target = kind.path(h, kind.run)
        target.parent.mkdir(parents=True, exist_ok=True)
        good, wrong = [(v if isinstance(v, str) else json.dumps(v)).encode()
                       for v in (kind.valid(h, kind.run), kind.wrong(h, kind.run))]
        HOSTILE[hostility](target, h.tmp / f"outside-{name.replace(' ', '-')}.txt", good, wrong)


def launcher(args: tuple[str, ...], h: Home, docker: bool, limit: float = LIMIT_S
             ) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "COLUMNS": "200", "SPARK_NVFP4_HOME": str(h.home), "HOME": str(h.tmp / "user"),
           "HF_HUB_CACHE": str(h.tmp / "hub"), "HF_HUB_OFFLINE": "1"}
    if not docker:
        env["DOCKER_HOST"] = NO_DOCKER
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, env=env,
                              timeout=limit, cwd=REPO, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`launcher {' '.join(args)}` still running after {limit:.0f} s")
    return proc, time.monotonic() - t0


def commands(docker: bool) -> dict[tuple[str, ...], list[tuple[str, str]]]:
    """Each command (its argv) -> the (file kind, expectation) it reads, host-only or Docker ones."""
    out: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for name, kind in HOME_FILES.items():
        for args, expect in kind.commands:
            if (args in DOCKER_COMMANDS) == docker:
                out.setdefault(tuple(a.replace("{run}", kind.run) for a in args), []).append((name, expect))
    return out


_clean: dict[tuple, tuple[int, int, float]] = {}


def clean_outcome(args: tuple[str, ...], docker: bool, image_id: str, tmp: Path) -> tuple[int, int, float]:
    """(exit code, error lines, seconds) of a command on a home of its own without the hostile
    files (doctor's code depends on the machine; without a cached probe, the Docker commands
    probe the image, as they do after refusing a hostile one): once per command for the module."""
    if args not in _clean:
        clean = Home(tmp / f"home{len(_clean)}", tmp / f"t{len(_clean)}", image_id)
        build(clean, None)
        ok, took = launcher(tuple(a.replace("{tmp}", str(clean.tmp)) for a in args), clean, docker, limit=120)
        _clean[args] = (ok.returncode, len([ln for ln in ok.stderr.splitlines() if ln.startswith("error:")]), took)
    return _clean[args]


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clean-home")


def check_home(hostility: str, tmp_path: Path, clean_root: Path, docker: bool, image_id: str = "") -> None:
    clean_tmp = clean_root / ("docker" if docker else "host")
    for n, (args, readers) in enumerate(commands(docker).items()):
        hostile = Home(tmp_path / f"home{n}", tmp_path / f"t{n}", image_id)  # fresh: a new probe replaces one
        build(hostile, hostility)
        argv = tuple(a.replace("{tmp}", str(hostile.tmp)) for a in args)
        # a refused probe cache means a new probe, as on a clean home: a container start, which the
        # 10 s do not include (its time on a clean home, and a margin: it varies 1-25 s on a loaded host)
        code, error_lines, clean_s = clean_outcome(args, docker, image_id, clean_tmp) if docker else (0, 0, 0.0)
        proc, took = launcher(argv, hostile, docker, limit=LIMIT_S + (clean_s + PROBE_MARGIN_S if docker else 0))
        said = proc.stdout + proc.stderr
        what = f"{hostility}: `launcher {' '.join(argv)}` -> {proc.returncode} in {took:.1f} s"
        assert "Traceback" not in proc.stderr, f"{what}\n{proc.stderr[-3000:]}"
        assert SECRET not in said, f"{what}: printed the symlink's target\n{said[-2000:]}"
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        refusing = [name for name, e in readers if e == "refuse"
                    and (HOME_FILES[name].refused_by is None or hostility in HOME_FILES[name].refused_by)]
        if refusing:
            kind = HOME_FILES[refusing[0]]
            assert proc.returncode == kind.code and len(errors) == 1, f"{what}\n{proc.stderr[-2000:]}"
            assert str(kind.path(hostile, kind.run)) in errors[0], f"{what}\n{errors[0]}"
            continue
        code, error_lines, _ = clean_outcome(args, docker, image_id, clean_tmp)
        assert proc.returncode == code, f"{what}, {code} without the file\n{proc.stderr[-2000:]}"
        assert len(errors) == error_lines, f"{what}\n{proc.stderr[-2000:]}"
        for name in (name for name, e in readers if e == "warn"):
            path = str(HOME_FILES[name].path(hostile, HOME_FILES[name].run))
            said_once = [ln for ln in proc.stderr.splitlines() if path in ln and not ln.startswith("error:")]
            assert len(said_once) == 1, f"{what}: {name} not reported in one line\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize("hostility", HOSTILE)
def test_hostile_home_host_commands(hostility, tmp_path, clean_root):
    """list, status, logs, logs --follow, rollback: no Docker daemon (its absence is not what
    is tested here: they read the home whether Docker is up or not)."""
    check_home(hostility, tmp_path, clean_root, docker=False)


@pytest.mark.parametrize("hostility", HOSTILE)
def test_hostile_home_docker_commands(hostility, tmp_path, clean_root, docker_client, standin_image):
    """doctor, quantize --dry-run and image prepare --dry-run probe the image: a hostile cached
    probe is one warning and a new probe; the other hostile files of the home (they read the
    records too) change nothing of their outcome."""
    check_home(hostility, tmp_path, clean_root, docker=True, image_id=docker_client.images.get(standin_image).id)


# --------------------------------------------------------------- files the user names: --config, --recipe, EVAL.json

def _alias_bomb() -> bytes:
    """300 bytes of YAML that are 10**9 values once its aliases are walked."""
    keys = [f"k{j}" for j in range(10)]
    lines = ["a0: &a0 {" + ", ".join(f"{k}: 1" for k in keys) + "}"]
    lines += [f"a{i}: &a{i} {{" + ", ".join(f"{k}: *a{i - 1}" for k in keys) + "}" for i in range(1, 10)]
    return "\n".join(lines).encode()


USER_FILES: dict[str, Callable[[Path], None]] = {
    "fifo": os.mkfifo,
    "symlink-dev-zero": lambda p: p.symlink_to("/dev/zero"),
    "folder": lambda p: p.mkdir(),
    "huge-sparse": _sparse,
    "binary": lambda p: p.write_bytes(bytes(range(256)) * 64),
    "deep": lambda p: p.write_bytes(_deep() if p.suffix == ".json" else b"a: " + b"[" * 100_000),
    "alias-bomb": lambda p: p.write_bytes(_alias_bomb()),
    "wrong-types": lambda p: p.write_bytes(b'{"calibration": {"samples": "many"}, "model": 5}'),
}


# how each command is given the file
READERS: dict[str, Callable[[Path, Path], tuple[str, ...]]] = {
    "--config": lambda p, tmp: ("quantize", "--dry-run", "--output", str(tmp / "out"), "--config", str(p)),
    "--recipe": lambda p, tmp: ("quantize", "--dry-run", "--output", str(tmp / "out"), "--recipe", str(p)),
    "report EVAL.json": lambda p, tmp: ("report", str(tmp / "report.html"), str(p)),
}


@pytest.mark.parametrize("hostility", USER_FILES)
@pytest.mark.parametrize("option,suffix", [("--config", ".json"), ("--config", ".yaml"), ("--recipe", ".yaml"),
                                           ("report EVAL.json", ".json")])
def test_hostile_files_the_user_names(option, suffix, hostility, tmp_path):
    path = tmp_path / f"job{suffix}"
    USER_FILES[hostility](path)
    h = Home(tmp_path / "home", tmp_path)
    (tmp_path / "user").mkdir()
    proc, took = launcher(READERS[option](path, tmp_path), h, docker=False)
    what = f"{option} {hostility}{suffix} -> {proc.returncode} in {took:.1f} s"
    assert "Traceback" not in proc.stderr, f"{what}\n{proc.stderr[-3000:]}"
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    if option == "--recipe" and hostility in ("binary", "deep", "alias-bomb", "wrong-types"):
        # a regular file of sane size: its YAML is ModelOpt's to read in the container; the
        # dry run without Docker stops at the daemon (exit 3)
        assert proc.returncode == 3 and len(errors) == 1, f"{what}\n{proc.stderr}"
        return
    assert proc.returncode == 2 and len(errors) == 1, f"{what}\n{proc.stderr}"
    assert str(path) in errors[0], errors[0]


# --------------------------------------------------------------- the home's folders themselves

HOME_FOLDERS: dict[str, Callable[[Path], object]] = {
    "a file": lambda p: p.write_text(SECRET),
    "a fifo": os.mkfifo,
    "a symlink to /dev/zero": lambda p: p.symlink_to("/dev/zero"),
}


@pytest.mark.parametrize("shape", HOME_FOLDERS)
@pytest.mark.parametrize("folder,args,code", [
    ("runs", ("list",), 0), ("runs", ("status", "20261130-060000-a1a1a1"), 11),
    ("runs", ("rollback", "--all", "--dry-run"), 0),
    ("runs", ("image", "prepare", "--image", STANDIN, "--dry-run"), 1),   # it cannot write its record
    ("probes", ("image", "prepare", "--image", STANDIN, "--dry-run"), 0),  # a warning: the cache is a cache
])
def test_home_folders_that_are_not_folders(folder, args, code, shape, tmp_path, request):
    docker = "prepare" in args
    if docker:
        request.getfixturevalue("standin_image")
    h = Home(tmp_path / "home", tmp_path)
    (tmp_path / "user").mkdir()
    h.home.mkdir()
    HOME_FOLDERS[shape](h.home / folder)
    proc, took = launcher(args, h, docker, limit=LIMIT_S + (PROBE_MARGIN_S if docker else 0))
    what = f"{folder} as {shape}: `launcher {' '.join(args)}` -> {proc.returncode} in {took:.1f} s"
    assert "Traceback" not in proc.stderr, f"{what}\n{proc.stderr[-3000:]}"
    assert SECRET not in proc.stdout + proc.stderr, what
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == code and len(errors) == (1 if code else 0), f"{what}\n{proc.stderr[-2000:]}"


# --------------------------------------------------------------- a checkpoint's result.json (eval's source)

@pytest.mark.parametrize("hostility", HOSTILE)
def test_hostile_checkpoint_result_names_no_source(hostility, tmp_path):
    """`launcher eval CKPT` takes the reference model from CKPT/result.json: a checkpoint from a
    tarball is anyone's, so a hostile one names no model (exit 2, pass --reference); a link out
    of the checkpoint is not followed (its target's model name would be printed)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    HOSTILE[hostility](ckpt / "result.json", tmp_path / "outside.json",
                       json.dumps({"source": {"model": SECRET}}).encode(), b'{"source": {"model": ["x"]}}')
    (tmp_path / "user").mkdir()
    proc, took = launcher(("eval", str(ckpt)), Home(tmp_path / "home", tmp_path), docker=False)
    what = f"result.json as {hostility}: `launcher eval` -> {proc.returncode} in {took:.1f} s"
    assert "Traceback" not in proc.stderr and SECRET not in proc.stdout + proc.stderr, f"{what}\n{proc.stderr}"
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    # a link out of the checkpoint is refused as such (model_source.refuse_links_out), before any read
    expected = "outside the folder: not followed" if hostility.startswith("symlink") else "--reference"
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], f"{what}\n{proc.stderr}"
