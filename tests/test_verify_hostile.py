"""`launcher verify` on crafted files (docs/decisions.md, issue 13): any bytes in any file it reads end in
problem lines and a non-zero exit, within 10 s and 1 GB, never a traceback or a hang.

Every case starts from tests/synthetic_ckpt.py's checkpoint, which must pass first, and
runs the verifier's CLI in a subprocess whose time and peak memory (ru_maxrss from
wait4) are measured. The property-based test lets hypothesis mutate headers and configs;
its examples run the same CLI in processes forked from one that has imported it already
(tests/fork_server.py: about 1 s of imports each otherwise, 60 examples were 70 s).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fork_server import forked_launcher
from synthetic_ckpt import make_checkpoint

from launcher.verify import safetensors_header

REPO = Path(__file__).resolve().parents[1]
SHARD1 = "model-00001-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
TIME_LIMIT_S, MEMORY_LIMIT = 10.0, 1 << 30
VERIFY_EXIT = 9
LINE_STARTS = ("problem ", "ok: ")


# The peak RSS comes from a small wrapper that starts verify and reports its child's ru_maxrss.
# A child forked straight from pytest reports pytest's own size at the fork (Linux carries the
# copied memory's high-water mark across exec), and pytest grows to gigabytes over the suite.
_WRAPPER = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[2:])\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_verify(ckpt: Path, timeout: float = 60) -> tuple[int, str, float, int]:
    """(exit code, stdout+stderr, seconds, peak RSS bytes) of `python -m launcher.verify`."""
    return measure([sys.executable, "-m", "launcher", "verify", str(ckpt)], timeout, what=str(ckpt))


def measure(cmd: list[str], timeout: float, what: str = "") -> tuple[int, str, float, int]:
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as rss:
        t = time.monotonic()
        p = subprocess.Popen([sys.executable, "-c", _WRAPPER, rss.name, *cmd], cwd=REPO, stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, "COLUMNS": "200"}, start_new_session=True)
        deadline = t + timeout
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(p.pid, 9)  # the wrapper and verify
                os.wait4(p.pid, 0)
                pytest.fail(f"still running after {timeout} s: {what or cmd}")
            time.sleep(0.02)
        seconds = time.monotonic() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
        peak_kib = int(rss.read() or 0)
    return p.returncode, text, seconds, peak_kib * 1024  # Linux: KiB


def assert_rejected_cleanly(ckpt: Path, *fragments: str) -> str:
    rc, out, seconds, peak = run_verify(ckpt)
    assert "Traceback" not in out, out
    assert rc == VERIFY_EXIT, (rc, out)
    assert seconds <= TIME_LIMIT_S, f"{seconds:.1f} s"
    assert peak <= MEMORY_LIMIT, f"{peak / 2**20:.0f} MiB"
    lines = out.splitlines()
    assert len(lines) >= 3 and lines[-1].endswith("problem(s)"), out
    assert all(ln.startswith(LINE_STARTS) for ln in lines[1:-1]), out
    assert not any(c in out for c in "\x1b\r\x07\x08"), repr(out)  # no raw control characters
    for f in fragments:
        assert f in out, f"{f!r} not in:\n{out}"
    return out


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A copy of the session's checkpoint, which passed verify (base_checkpoint)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(base_checkpoint(), folder, symlinks=True)
    return folder


def header_of(path: Path) -> tuple[dict, bytes]:
    """The header and data of a valid file, by the launcher's one parser."""
    header, start = safetensors_header(path)
    return header, path.read_bytes()[start:]


def write_header(path: Path, header_text: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header_text)) + header_text + data)


# ---------------------------------------------------------------- the classes, one by one

def test_huge_config_is_not_parsed(ckpt):
    (ckpt / "config.json").write_bytes(b'{"a": "' + b"x" * (20 << 20) + b'"}')
    assert_rejected_cleanly(ckpt, "config.json: larger than 16 MiB")


def test_deeply_nested_json(ckpt):
    (ckpt / "hf_quant_config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert_rejected_cleanly(ckpt, "hf_quant_config.json: not valid JSON: nested too deeply")


def test_integer_past_the_digit_limit(ckpt):
    cfg = (ckpt / "config.json").read_text().replace('"group_size": 16', '"group_size": ' + "9" * 5000, 1)
    (ckpt / "config.json").write_text(cfg)
    assert_rejected_cleanly(ckpt, "config.json: not valid JSON")


def test_header_declaring_gigabytes(ckpt):
    """Offsets and shapes that span terabytes: judged from the header, nothing allocated."""
    header, data = header_of(ckpt / SHARD1)
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    header[name]["shape"] = [2**40, 2**20]
    header[name]["data_offsets"] = [header[name]["data_offsets"][0], 2**60]
    write_header(ckpt / SHARD1, json.dumps(header).encode(), data)
    assert_rejected_cleanly(ckpt, name)


def test_header_offsets_past_u64(ckpt):
    header, data = header_of(ckpt / SHARD1)
    name = "model.layers.0.mlp.up_proj.input_scale"
    text = json.dumps(header).replace(json.dumps(header[name]["data_offsets"]), f"[0, {2**70}]", 1)
    write_header(ckpt / SHARD1, text.encode(), data)
    assert_rejected_cleanly(ckpt, "malformed header entry")


@pytest.mark.parametrize("victim", ["config.json", "hf_quant_config.json", INDEX, SHARD1])
def test_fifo_in_place_of_a_file(ckpt, victim):
    (ckpt / victim).unlink()
    os.mkfifo(ckpt / victim)
    assert_rejected_cleanly(ckpt, f"{victim}: not a regular file")


def test_device_behind_a_symlink(ckpt):
    (ckpt / SHARD1).unlink()
    (ckpt / SHARD1).symlink_to("/dev/zero")
    assert_rejected_cleanly(ckpt, f"{SHARD1}: a symlink to /dev/zero, outside the folder: not followed")


@pytest.mark.parametrize("victim", ["config.json", "hf_quant_config.json", INDEX, SHARD1])
def test_symlink_out_of_the_checkpoint_is_not_read(ckpt, tmp_path, victim):
    """A checkpoint from a tarball or a clone whose file links elsewhere on the host: even to
    a valid copy of the very file (so only not-following can tell), it is refused unread."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(ckpt / victim, outside / victim)
    (ckpt / victim).symlink_to(outside / victim)
    assert_rejected_cleanly(ckpt, f"{victim}: a symlink to {outside / victim}, outside the folder: not followed")


def test_symlinks_inside_the_checkpoint_and_into_its_hf_blobs_stay_accepted(tmp_path):
    """HF cache snapshots are symlinks into their repo's ../../blobs (huggingface_hub makes
    them), and a link to another file of the folder stays in it: normal, not hostile."""
    repo = tmp_path / "models--org--name"
    snap = make_checkpoint(repo / "snapshots" / "0123abc")
    (repo / "blobs").mkdir()
    shutil.move(snap / SHARD1, repo / "blobs" / "abc123")
    (snap / SHARD1).symlink_to("../../blobs/abc123")
    shutil.move(snap / INDEX, snap / "index-copy.json")
    (snap / INDEX).symlink_to("index-copy.json")
    rc, out, _, _ = run_verify(snap)
    assert rc == 0, out


@pytest.mark.parametrize("span", [1 << 30, 10 << 30])
def test_scale_spanning_gigabytes_of_a_sparse_file_is_judged_unread(ckpt, span):
    """A 4-byte F32 scale whose data_offsets span 1 or 10 GiB, laid out last so the file is
    otherwise consistent (a sparse file: no disk used). The span is a problem found from
    the header; nothing of it is read (once: 2.1 GB resident, or a MemoryError)."""
    header, data = header_of(ckpt / SHARD1)
    victim = "model.layers.0.self_attn.q_proj.input_scale"
    meta = header.pop("__metadata__", None)
    pieces, end = [], 0
    for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        if name == victim:
            continue
        b, e = header[name]["data_offsets"]
        pieces.append(data[b:e])
        header[name]["data_offsets"] = [end, end + e - b]
        end += e - b
    header[victim]["data_offsets"] = [end, end + span]
    if meta is not None:
        header["__metadata__"] = meta
    text = json.dumps(header).encode()
    write_header(ckpt / SHARD1, text, b"".join(pieces))
    os.truncate(ckpt / SHARD1, 8 + len(text) + end + span)
    index = json.loads((ckpt / INDEX).read_text())
    index["metadata"]["total_size"] += span - 4  # what the shards now declare: no second problem
    (ckpt / INDEX).write_text(json.dumps(index))
    rc, out, seconds, peak = run_verify(ckpt)
    assert "Traceback" not in out and rc == VERIFY_EXIT, (rc, out)
    problems = [ln for ln in out.splitlines() if ln.startswith("problem ")]
    assert problems == [f"problem {victim}: data_offsets span {span} bytes but F32 [] needs 4 ({SHARD1})"], out
    assert seconds < 5, f"{seconds:.1f} s"
    assert peak < 300 << 20, f"{peak / 2**20:.0f} MiB"


def test_index_entry_outside_the_folder_is_not_followed(ckpt, tmp_path):
    """A copy of a valid shard one level up, named through `../`: once accepted as ok."""
    shutil.copy(ckpt / SHARD1, tmp_path / SHARD1)
    (ckpt / SHARD1).unlink()
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"] = {k: f"../{v}" if v == SHARD1 else v for k, v in index["weight_map"].items()}
    (ckpt / INDEX).write_text(json.dumps(index))
    assert_rejected_cleanly(ckpt, f"'../{SHARD1}', which is not a file in the checkpoint folder")


@pytest.mark.parametrize("pattern", ["re:(a|aa)+$", "re:(a|a)*$"])
def test_backtracking_regex_in_the_exclude_list(ckpt, pattern):
    """Each of these takes minutes with Python's re on a 60-character module name."""
    header, data = header_of(ckpt / SHARD1)
    long_name = "a" * 60 + "!.weight"  # no match at the end: the regex backtracks
    header[long_name] = {"dtype": "F16", "shape": [0], "data_offsets": [len(data), len(data)]}
    write_header(ckpt / SHARD1, json.dumps(header).encode(), data)
    for name in ("config.json", "hf_quant_config.json"):
        cfg = json.loads((ckpt / name).read_text())
        sub = cfg["quantization_config"] if name == "config.json" else cfg["quantization"]
        sub["ignore" if name == "config.json" else "exclude_modules"] = ["lm_head", pattern]
        (ckpt / name).write_text(json.dumps(cfg))
    assert_rejected_cleanly(ckpt, "takes over 0.2 s to match")


def test_invalid_regex_in_the_exclude_list(ckpt):
    cfg = json.loads((ckpt / "hf_quant_config.json").read_text())
    cfg["quantization"]["exclude_modules"] = ["lm_head", "re:(unclosed"]
    (ckpt / "hf_quant_config.json").write_text(json.dumps(cfg))
    assert_rejected_cleanly(ckpt, "is not a valid regular expression")


@pytest.mark.parametrize("where, value", [
    ("ignore", [["lm_head"]]), ("ignore", [{"a": 1}]), ("quant_algo", {"x": [1]}),
    ("config_groups", {"g": {"weights": [4], "targets": 7}}), ("kv_cache_scheme", [1, 2])])
def test_non_strings_where_names_are_expected(ckpt, where, value):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"][where] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_rejected_cleanly(ckpt, "config.json")


def test_non_string_dtype_and_index_values(ckpt):
    header, data = header_of(ckpt / SHARD1)
    header["model.layers.0.mlp.up_proj.weight"]["dtype"] = ["U8"]
    write_header(ckpt / SHARD1, json.dumps(header).encode(), data)
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = {"evil": 1}
    (ckpt / INDEX).write_text(json.dumps(index))
    assert_rejected_cleanly(ckpt, "has no weight_map object")


def test_control_characters_in_tensor_names_are_escaped(ckpt):
    header, data = header_of(ckpt / SHARD1)
    evil = "model.layers.0.\x1b[2J\x1b]0;owned\x07\rfake ok\u202e\u2028.weight"  # U+2028: found by the fuzz test
    header[evil] = header.pop("model.layers.0.input_layernorm.weight")
    write_header(ckpt / SHARD1, json.dumps(header).encode(), data)
    out = assert_rejected_cleanly(ckpt, "\\x1b[2J", "\\r")
    assert "\u202e" not in out and "\u2028" not in out


def test_many_tensors_times_many_patterns_stay_in_time(ckpt):
    """150k tensors against 1000 exclude globs is minutes of matching: the verifier stops
    at its deadline and says so, instead of running on."""
    header, data = header_of(ckpt / SHARD1)
    end = len(data)
    header.update({f"model.layers.{i}.x.mlp.up_proj.weight": {"dtype": "F16", "shape": [0],
                                                               "data_offsets": [end, end]} for i in range(150_000)})
    write_header(ckpt / SHARD1, json.dumps(header).encode(), data)
    cfg = json.loads((ckpt / "hf_quant_config.json").read_text())
    cfg["quantization"]["exclude_modules"] = ["lm_head"] + [f"model.layers.{i}.*.q*x" for i in range(999)]
    (ckpt / "hf_quant_config.json").write_text(json.dumps(cfg))
    assert_rejected_cleanly(ckpt, "verification stopped after 6 s")


def test_problem_flood_is_capped(ckpt):
    header, data = header_of(ckpt / SHARD1)
    header.update({f"junk.{i}": {"dtype": "nope"} for i in range(5000)})
    write_header(ckpt / SHARD1, json.dumps(header).encode(), data)
    out = assert_rejected_cleanly(ckpt, "more (all in --json-out)")
    assert len(out.splitlines()) < 210


# ---------------------------------------------------------------- property-based

RAW = {  # JSON texts json.dumps cannot produce, spliced in through placeholders
    "@@BIGINT@@": "9" * 5000, "@@DEEP@@": "[" * 100_000 + "]" * 100_000, "@@U65@@": str(2**65),
    "@@INF@@": "1e400", "@@NAN@@": "NaN"}
hostile_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=False),
    st.text(max_size=40), st.sampled_from(sorted(RAW)),
    st.sampled_from(["U8", "F32", "F8_E4M3", "F4", "../x", "re:(a|aa)+$", "NVFP4", "modelopt", "\x1b[31m"]),
    st.builds(lambda n: "x" * n, st.integers(0, 3_000_000)))
hostile_values = st.recursive(hostile_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=12)
QUANT_SUFFIXES = (".weight", ".weight_scale", ".weight_scale_2", ".input_scale")


def dumps(value) -> str:
    text = json.dumps(value)
    for key, raw in RAW.items():
        text = text.replace(json.dumps(key), raw)
    return text


def _quantized_names(header: dict) -> list[str]:
    return sorted(k for k in header if k.startswith("model.layers.") and k.endswith(QUANT_SUFFIXES)
                  and "layernorm" not in k)


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaf_paths(v, prefix + (k,))
    else:
        yield prefix


@st.composite
def mutations(draw):
    """(description, function of the checkpoint folder) for one mutation that must make it invalid."""
    kind = draw(st.sampled_from(["entry-field", "rename", "header-length", "header-bytes", "header-whole",
                                 "config-leaf", "config-whole", "special-file"]))
    if kind == "entry-field":
        field, value = draw(st.sampled_from(["dtype", "shape", "data_offsets"])), draw(hostile_values)
        pick = draw(st.integers(0, 10**6))

        def apply(c: Path):
            header, data = header_of(c / SHARD1)
            name = _quantized_names(header)[pick % len(_quantized_names(header))]
            assume(header[name][field] != value)
            header[name][field] = value
            write_header(c / SHARD1, dumps(header).encode(), data)
        return f"{field} of a tensor = {value!r:.80}", apply
    if kind == "rename":
        new = draw(st.text(min_size=1, max_size=60))
        pick = draw(st.integers(0, 10**6))

        def apply(c: Path):
            header, data = header_of(c / SHARD1)
            names = sorted(k for k in header if k != "__metadata__")
            old = names[pick % len(names)]
            assume(new not in header)
            header[new] = header.pop(old)
            write_header(c / SHARD1, json.dumps(header).encode(), data)
        return f"rename to {new!r}", apply
    if kind == "header-length":
        n = draw(st.integers(0, 2**64 - 1))

        def apply(c: Path):
            blob = (c / SHARD1).read_bytes()
            assume(n != struct.unpack("<Q", blob[:8])[0])
            (c / SHARD1).write_bytes(struct.pack("<Q", n) + blob[8:])
        return f"header length {n}", apply
    if kind == "header-bytes":
        at, junk = draw(st.integers(0, 10**6)), draw(st.binary(min_size=1, max_size=64))

        def apply(c: Path):
            blob = bytearray((c / SHARD1).read_bytes())
            n = struct.unpack("<Q", blob[:8])[0]
            i = 8 + at % n
            assume(bytes(blob[i:i + len(junk)]) != junk[:n - (i - 8)])
            blob[i:i + len(junk)] = junk[:n - (i - 8)]
            (c / SHARD1).write_bytes(bytes(blob))
        return f"header bytes at {at}: {junk!r}", apply
    if kind == "header-whole":
        value = draw(hostile_values)

        def apply(c: Path):
            _, data = header_of(c / SHARD1)
            write_header(c / SHARD1, dumps(value).encode(), data)
        return f"header = {value!r:.80}", apply
    if kind == "config-leaf":
        name, value = draw(st.sampled_from(["config.json", "hf_quant_config.json", INDEX])), draw(hostile_values)
        pick = draw(st.integers(0, 10**6))

        def apply(c: Path):
            cfg = json.loads((c / name).read_text())
            top = {"config.json": "quantization_config", "hf_quant_config.json": "quantization",
                   INDEX: "weight_map"}[name]
            paths = [p for p in _leaf_paths(cfg[top], (top,)) if "targets" not in p]
            path = paths[pick % len(paths)]
            node = cfg
            for k in path[:-1]:
                node = node[k]
            assume(node[path[-1]] != value)
            node[path[-1]] = value
            (c / name).write_text(dumps(cfg))
        return f"{name} leaf = {value!r:.80}", apply
    if kind == "config-whole":
        name = draw(st.sampled_from(["config.json", "hf_quant_config.json", INDEX]))
        raw = draw(st.one_of(hostile_values.map(dumps).map(str.encode), st.binary(max_size=200)))

        def apply(c: Path):
            assume(raw != (c / name).read_bytes())
            (c / name).write_bytes(raw)
        return f"{name} = {raw!r:.80}", apply
    name = draw(st.sampled_from(["config.json", "hf_quant_config.json", INDEX, SHARD1]))
    special = draw(st.sampled_from(["fifo", "/dev/zero", "/dev/urandom", "folder"]))

    def apply(c: Path):
        (c / name).unlink()
        if special == "fifo":
            os.mkfifo(c / name)
        elif special == "folder":
            (c / name).mkdir()
        else:
            (c / name).symlink_to(special)
    return f"{name} -> {special}", apply


_BASE: dict[str, Path] = {}


def base_checkpoint() -> Path:
    """Built once per session and verified valid (the starting point: every rejection is the
    mutation's); each test and example works on a copy."""
    if "ckpt" not in _BASE:
        folder = make_checkpoint(Path(tempfile.mkdtemp(prefix="verify-fuzz-")) / "ckpt")
        rc, out, _, _ = run_verify(folder)
        assert rc == 0, out
        _BASE["ckpt"] = folder
    return _BASE["ckpt"]


MEASURED: list[tuple[float, int]] = []


@settings(max_examples=int(os.environ.get("VERIFY_FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutation=mutations())
def test_fuzzed_checkpoint_is_rejected_in_one_line_each(mutation):
    what, apply = mutation
    with tempfile.TemporaryDirectory() as tmp:
        c = Path(tmp) / "ckpt"
        shutil.copytree(base_checkpoint(), c, symlinks=True)
        apply(c)
        rc, out, seconds, peak = forked_launcher("verify", c, timeout=60)
    MEASURED.append((seconds, peak))
    assert "Traceback" not in out, (what, out)
    assert rc == VERIFY_EXIT, (what, rc, out)
    lines = out.splitlines()
    assert lines[-1].endswith("problem(s)") and all(ln.startswith(LINE_STARTS) for ln in lines[1:-1]), (what, out)
    assert not any(c in out for c in "\x1b\r\x07\x08"), (what, out)
    assert seconds <= TIME_LIMIT_S, (what, seconds)
    assert peak <= MEMORY_LIMIT, (what, peak)


def test_fuzz_measurements_are_reported():
    """Runs after the fuzz test (file order): says what was measured, and that it ran."""
    if not MEASURED:
        pytest.skip("the fuzz test did not run in this session")
    worst_t, worst_m = max(t for t, _ in MEASURED), max(m for _, m in MEASURED)
    print(f"fuzz: {len(MEASURED)} runs, slowest {worst_t:.2f} s, largest peak RSS {worst_m / 2**20:.0f} MiB")
    assert worst_t <= TIME_LIMIT_S and worst_m <= MEMORY_LIMIT


def test_memory_measurement_sees_a_big_child():
    """The measurement itself: ru_maxrss is in KiB on Linux, so a child that touches 300 MB
    must read as at least 300 MB (else the 1 GB bound above would prove nothing)."""
    _, _, _, peak = measure([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"], 60)
    assert peak >= 300 * 2**20
    # and a small child reads small however big this (pytest) process has grown
    ballast = bytearray(1 << 30)
    ballast[::4096] = b"x" * len(ballast[::4096])
    _, _, _, peak = measure([sys.executable, "-c", "pass"], 60)
    assert peak < 200 * 2**20, peak


def test_json_out_is_never_written_through_a_symlink(ckpt, tmp_path):
    victim, out = tmp_path / "victim.txt", tmp_path / "report.json"
    victim.write_text("precious")
    out.symlink_to(victim)
    proc = subprocess.run([sys.executable, "-m", "launcher", "verify", str(ckpt), "--json-out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "report.json is a symlink" in proc.stderr and victim.read_text() == "precious"
