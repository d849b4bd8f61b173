"""benchmarks/peers_gpu.py's verdict lines (issue 21's goals) are computed from the rows: the
goal-1 row is whichever ran make quantize's recipe as recipes.py defines it now, whatever its
label, and the size bound and the 25% margin are both enforced. Host-only: synthetic rows."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import peers_gpu  # noqa: E402


def _row(label, tool, kl, size=1.0, pure=True, spec=None):
    ev = {t: {"kl_divergence": kl, "kl_window_se": 0.01, "top1_agreement": 0.7, "perplexity": 50.0,
              "reference_perplexity": 40.0} for t in ("brown", "wiki")}
    return {"label": label, "tool": tool, "pure": pure, "eval": ev, "size_ratio": size, "bytes": size * 1e8,
            "quantize_s": 1.0, "what": "", "steps": peers_gpu.steps_of(spec) if spec else None}


def test_goal_rows_are_found_by_steps_and_bounds_hold():
    make = peers_gpu.MAKE_RECIPE
    rows = [_row("default", "ModelOpt", 0.40, spec="default"),
            _row("peer", "llm-compressor", 0.20),
            _row("big-peer", "ModelOpt", 0.05, size=1.2, pure=False),   # over the size bound: not a rival
            _row("renamed", "ours", 0.14, size=1.05, pure=False, spec=make),
            _row("stale", "ours", 0.01, size=1.05, pure=False, spec=make + ":keep_bf16.budget=0.5"),
            _row("pure-ours", "ours", 0.19, spec="smooth-gptq-seq")]
    lines = "\n".join(peers_gpu.verdicts(rows))
    assert "Goal 1 (met)" in lines and "(row `renamed`)" in lines and "`peer`" in lines, lines
    assert "30.0% lower" in lines, lines
    assert "Goal 2 (met)" in lines and "`pure-ours`" in lines, lines
    rows[3]["size_ratio"] = 1.07
    lines = "\n".join(peers_gpu.verdicts(rows))
    assert "Goal 1 (NOT met)" in lines and "Over the 1.06x size bound" in lines, lines
    rows[3]["size_ratio"], rows[3]["eval"]["brown"]["kl_divergence"] = 1.0, 0.18  # mean 0.16: 20% lower
    assert "Goal 1 (NOT met)" in "\n".join(peers_gpu.verdicts(rows))
    del rows[3]
    assert "Goal 1 (no verdict)" in "\n".join(peers_gpu.verdicts(rows))
