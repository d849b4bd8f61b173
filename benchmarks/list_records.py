"""How long `launcher list` takes with N run records (issue 22: 5,000 dry runs took 6.5 s).

    python benchmarks/list_records.py [N]

Makes N finished quantize records in a fresh temporary home, as runs leave them, then times
`launcher list` (and `launcher status` of one run) as a user runs them: a new process each.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
home = Path(tempfile.mkdtemp(prefix="list-bench-"))
os.environ["SPARK_NVFP4_HOME"] = str(home)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launcher.records import runs  # noqa: E402

t = time.time()
for i in range(n):
    rec = runs.new_run("quantize", {"model": "embedded", "output": f"/tmp/out-{i}"})
    rec.output = f"/tmp/out-{i}"
    rec.finish("complete")
made = time.time() - t
env = {**os.environ, "COLUMNS": "160"}
for args in (["list"], ["status", rec.id]):
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, env=env)
    took = time.time() - t
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(f"{' '.join(args[:1])}: {took:.2f} s with {n} records ({len(proc.stdout.splitlines())} lines out)")
print(f"(made the records in {made:.1f} s; home {home})")
