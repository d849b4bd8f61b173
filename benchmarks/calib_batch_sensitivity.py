"""How much the calibration batch moves ModelOpt's checkpoint on this CPU (issue 22).

    .venv-mo/bin/python benchmarks/calib_batch_sensitivity.py MODEL_DIR TEXT [SAMPLES SEQ_LEN BATCHES...]

Runs tests/tools/modelopt_direct.py (ModelOpt's default NVFP4 recipe, outside any container) once
per batch size on the same windows and compares every checkpoint with the first batch's: tensors
that differ, and the largest relative input_scale difference. Prints the CPU's bf16 flags, since
the bf16 kernels (and their rounding per batch shape) depend on them. Defaults: the e2e tests'
calibration (16 x 256) at batches 4 (the payload's CPU "auto") then 1, 2, 8, 16.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "tools"))
from compare_ckpt import tensors  # noqa: E402


def cpu_flags() -> str:
    flags = set(re.findall(r"\b(avx2|avx512f|avx512_bf16|amx_bf16|amx_tile)\b", Path("/proc/cpuinfo").read_text()))
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return f"{model.group(1) if model else '?'}; " + " ".join(sorted(flags))


def main() -> None:
    model_dir, text = sys.argv[1], sys.argv[2]
    samples, seq_len = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (16, 256)
    batches = [int(b) for b in sys.argv[5:]] or [4, 1, 2, 8, 16]
    print("cpu:", cpu_flags())
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for b in batches:
            out = Path(tmp) / f"b{b}"
            t = time.time()
            subprocess.run([sys.executable, str(REPO / "tests" / "tools" / "modelopt_direct.py"), model_dir, text,
                            str(samples), str(seq_len), str(b), str(out)], check=True, capture_output=True)
            outs[b] = tensors(out)
            print(f"batch {b}: {json.loads((out / 'calibration.json').read_text())['batch_shapes']} "
                  f"({time.time() - t:.0f} s)")
        import numpy as np

        base = batches[0]
        for b in batches[1:]:
            differ = [k for k in outs[base] if outs[base][k] != outs[b][k]]
            scales = [k for k in outs[base] if k.endswith(".input_scale")]
            rel = [abs(float(np.frombuffer(outs[b][k][2], np.float32)[0]) /
                       float(np.frombuffer(outs[base][k][2], np.float32)[0]) - 1) for k in scales]
            print(f"batch {b} vs {base}: {len(differ)} of {len(outs[base])} tensors differ "
                  f"({sum(k.endswith('.input_scale') for k in differ)} of {len(scales)} input_scale, "
                  f"{sum(not k.endswith('.input_scale') for k in differ)} others); "
                  f"largest input_scale difference {max(rel):.3%}")


if __name__ == "__main__":
    main()
