"""The Makefile's demo settings, read with `make -n` (prints the commands, runs none): make demo
calibrates on its own smaller set (DEMO_SAMPLES) so that it ends within about 10 minutes on 2 CPU
cores; make quantize, the Spark default, keeps 128 x 512 (benchmarks/results/demo-calibration.md)."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def calib_flags(*args: str) -> tuple[int, int]:
    out = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
    m = re.search(r"--calib-samples (\d+) --calib-seq-len (\d+)", out.replace("\\\n", " "))
    assert m, out
    return int(m.group(1)), int(m.group(2))


def test_demo_calibrates_on_its_own_smaller_set_and_quantize_keeps_the_default():
    assert calib_flags("demo") == (32, 512)
    assert calib_flags("quantize") == (128, 512)
    # the user's choice wins over the demo's
    assert calib_flags("demo", "DEMO_SAMPLES=128") == (128, 512)
    assert calib_flags("demo", "SAMPLES=64") == (64, 512)
