"""`make demo`, stage by stage: wall and CPU seconds per make target, and inside the quantize stage
the payload's own steps, the quick evaluation and the launcher around them.

    python3 benchmarks/demo_time.py [--fresh] [--home DIR] [--image-build] [--stages a,b] [--out FILE] [MAKEVAR=VALUE ...]

--fresh       clone this checkout's HEAD into a temporary folder and run there with an empty
              SPARK_NVFP4_HOME (venv, assets and the embedded model's conversion from scratch):
              the newcomer's `make demo` on a host whose images are built.
--home DIR    SPARK_NVFP4_HOME for the run (default: a fresh one with --fresh, else the usual one).
--image-build also time a full image build under a throwaway tag (removed afterwards); the shared
              spark-nvfp4/trtllm-standin images are never rebuilt.
MAKEVAR=VALUE passed to every make call (e.g. SAMPLES=128 for the Spark default's calibration).

Each stage is one make target, run in order as `make demo` runs them (bootstrap, venv, setup =
the assets, image), then `make demo` itself, whose earlier targets are done by then: the quantize
stage (launcher quantize + launcher verify, with make demo's own calibration, DEMO_SAMPLES). Per stage: wall seconds, the
CPU seconds of its host processes (getrusage of children), and the whole machine's busy CPU
seconds (/proc/stat), which also counts the containers and anything else running: on a quiet
host the two CPU columns differ by the containers' work; on a shared one the machine column shows
the load. The payload's own numbers come from the run's result.json (timings.steps_s, cpu_s).
Writes a markdown table (--out, default benchmarks/results/demo-time-<date>.md) and a .json beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("bootstrap", "venv", "setup", "image", "quantize")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")


def cpu_facts() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags],
            "missing_flags": [f for f in FLAGS if f not in flags],
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "kernel": platform.release()}


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores; idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    t, c, m, load = time.time(), children_cpu_s(), machine_busy_s(), os.getloadavg()[0]
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.time() - t, 1),
            "host_cpu_s": round(children_cpu_s() - c, 1), "machine_busy_s": round(machine_busy_s() - m, 1),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


def latest_run(home: Path, command: str, since: float) -> dict | None:
    """The result.json of the newest `command` run (quantize, eval) created after `since`."""
    best = None
    for rec in (home / "runs").glob("*/record.json"):
        try:
            r = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        if r.get("command") != command or rec.stat().st_mtime < since:
            continue
        res = rec.parent / "result.json"
        if res.exists() and (best is None or rec.parent.name > best[0]):
            best = (rec.parent.name, json.loads(res.read_text()))
    return best[1] if best else None


def quantize_breakdown(home: Path, since: float, output: Path) -> dict:
    q = latest_run(home, "quantize", since) or {}
    ev = latest_run(home, "eval", since) or {}
    payload = json.loads((output / "result.json").read_text()) if (output / "result.json").exists() else {}
    ev_full = json.loads((output / "eval.json").read_text()) if (output / "eval.json").exists() else {}
    return {"payload_timings": payload.get("timings") or q.get("timings"),
            "steps_applied": payload.get("steps_applied"), "calibration": payload.get("calibration"),
            "eval_timings": ev_full.get("timings") or ev.get("timings"),
            "quality": q.get("quality"), "checkpoint_bytes": (q.get("sizes") or {}).get("checkpoint_bytes")}


def image_build(workdir: Path, env: dict, log: Path) -> dict:
    tag = f"spark-nvfp4/trtllm-standin:demo-time-{os.getpid()}"
    try:
        return timed(["docker/build.sh", tag], workdir, env, log)
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)


def table(facts: dict) -> str:
    cpu, rows = facts["cpu"], facts["stages"]
    out = [f"# `make demo` time, stage by stage ({facts['date']})", "",
           f"Host: {cpu['model']}, {cpu['cores']} cores, {cpu['mem_gib']} GiB; CPU flags: "
           f"{', '.join(cpu['flags']) or 'none of interest'} (not: {', '.join(cpu['missing_flags'])}).",
           f"Checkout: {facts['commit']} ({'fresh clone, empty SPARK_NVFP4_HOME' if facts['fresh'] else 'in place'}); "
           f"make variables: {' '.join(facts['make_vars']) or 'defaults'}.",
           f"Load average at the start {facts['load_start']}, at the end {facts['load_end']} "
           "(machine busy CPU s counts everything that ran meanwhile, other users included).", "",
           "| stage | wall s | host CPU s | machine busy CPU s | load before/after | rc |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        out.append(f"| {name} | {r['wall_s']} | {r['host_cpu_s']} | {r['machine_busy_s']} | "
                   f"{r['load_before']}/{r['load_after']} | {r['rc']} |")
    out.append(f"| **total** | {round(sum(r['wall_s'] for r in rows.values()), 1)} | "
               f"{round(sum(r['host_cpu_s'] for r in rows.values()), 1)} | "
               f"{round(sum(r['machine_busy_s'] for r in rows.values()), 1)} | | |")
    qb = facts.get("quantize")
    if qb and qb.get("payload_timings"):
        t = qb["payload_timings"]
        ev = qb.get("eval_timings") or {}
        out += ["", "Inside the quantize stage (wall s; the payload's result.json and eval.json):", "",
                "| part | s |", "|---|---|"]
        for k in ("prepare_s", "imports_s", "load_s", "tokenize_s", "quantize_s", "calibrate_s", "export_s",
                  "total_s", "cpu_s"):
            if k in t:
                out.append(f"| payload {k} | {t[k]} |")
        for k, v in (t.get("steps_s") or {}).items():
            out.append(f"| payload step {k} | {v} |")
        for k in ("load_s", "score_s", "generate_s", "total_s", "cpu_s"):
            if k in ev:
                out.append(f"| quick evaluation {k} | {ev[k]} |")
        stage = rows.get("quantize", {}).get("wall_s")
        if stage and "total_s" in t:
            out.append(f"| launcher, containers, verify (the rest) | "
                       f"{round(stage - t['total_s'] - ev.get('total_s', 0), 1)} |")
        if qb.get("quality"):
            q = qb["quality"]
            out += ["", f"Quality: KL {q.get('kl_divergence')}, top-1 {q.get('top1_agreement')}, perplexity "
                        f"{q.get('perplexity')} (reference {q.get('reference_perplexity')}) on {q.get('tokens')} "
                        "held-out tokens."]
    if "image_build" in rows:
        out += ["", "image_build: docker/build.sh under a throwaway tag (removed afterwards)."]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--home", default=None)
    ap.add_argument("--image-build", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("make_vars", nargs="*", help="MAKEVAR=VALUE")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="demo-time-"))
    workdir = REPO
    if args.fresh:
        workdir = tmp / "spark-nvfp4"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(workdir)], check=True)
    env = dict(os.environ)
    home = Path(args.home) if args.home else (tmp / "home" if args.fresh else None)
    if home is not None:
        env["SPARK_NVFP4_HOME"] = str(home)
    else:
        sys.path.insert(0, str(REPO))
        from launcher import paths  # stdlib only
        home = paths.home()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=workdir, capture_output=True,
                            text=True).stdout.strip()
    log = tmp / "make.log"
    date = time.strftime("%Y-%m-%d")
    facts = {"date": date, "commit": commit, "fresh": args.fresh, "make_vars": args.make_vars, "cpu": cpu_facts(),
             "load_start": [round(x, 2) for x in os.getloadavg()], "stages": {}, "log": str(log)}
    output = workdir / "out" / "embedded-NVFP4"
    for stage in [s for s in STAGES if s in args.stages.split(",")]:
        if stage == "quantize" and output.exists():
            shutil.rmtree(output)  # a finished output would be reused, not quantized again
        since = time.time()
        # the last stage is `make demo` itself (its earlier targets are done by then and only
        # checked again): so its own settings (DEMO_SAMPLES) apply, as they do for a newcomer
        target = "demo" if stage == "quantize" else stage
        r = timed(["make", target, *args.make_vars], workdir, env, log)
        facts["stages"][stage] = r
        print(f"{stage}: {r}", flush=True)
        if stage == "quantize":
            facts["quantize"] = quantize_breakdown(home, since - 1, output)
        if r["rc"] != 0:
            print(f"make {stage} failed; see {log}", file=sys.stderr)
            break
    if args.image_build:
        facts["stages"]["image_build"] = image_build(workdir, env, log)
    facts["load_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"demo-time-{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table(facts))
    out.with_suffix(".json").write_text(json.dumps(facts, indent=2))
    print(out.read_text())
    return 0 if all(r["rc"] == 0 for r in facts["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
