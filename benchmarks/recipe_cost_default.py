"""The default recipe, whole, on the checkpoint and job file a streamed_gpu.py run just left in /tmp/sg
(`--work /tmp/sg`), only the recipe changed: the recipe's cost against the default in the same call.

    python3 benchmarks/streamed_gpu.py --recipe smooth-gptq-seq-mp --work /tmp/sg --out DIR ...
    python3 benchmarks/recipe_cost_default.py DIR/default-whole.log    # prints the run's JSON line

Kept as run for benchmarks/results/gpu_8b-recipe-cost-2026-12-07.md.
"""
import json, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
import gpu_8b
j = json.load(open("/tmp/sg/job-whole.json"))
j.update(recipe="default", output_dir="/tmp/sg/out-default")
Path("/tmp/sg/job-default.json").write_text(json.dumps(j))
gpu_8b.evict(list(Path(j["model_dir"]).glob("*.safetensors")), everything=False)
t = time.time()
rc = subprocess.run([sys.executable, "-m", "container_payload.quantize", "/tmp/sg/job-default.json"],
                    stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT).returncode
wall = time.time() - t
r = json.load(open("/tmp/sg/out-default/result.json")) if rc == 0 else {}
print(json.dumps({"recipe": "default", "rc": rc, "wall_s": round(wall, 3), "timings": r.get("timings"), "memory": r.get("memory")}))
