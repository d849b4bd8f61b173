"""Issue 20: the payload's shape. The core the host shares (contract, recipes, memory plan, tuning)
imports no torch; no import circles and no file over 600 lines in container_payload/; a step
type is declared once (recipes: its Plan) and the memory plan reads the declaration, so a new
step needs no edit there; every declared step has a whole-model runner."""
from __future__ import annotations

import ast
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from container_payload import memory_plan, recipes

from conftest import REPO

PAYLOAD = REPO / "container_payload"
CORE = ("contract", "recipes", "memory_plan", "tuning")


def _own_imports(path: Path) -> set[str]:
    """The container_payload modules `path` imports, at any depth of the file."""
    names = {p.stem for p in PAYLOAD.glob("*.py")}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
    return out & names


def test_no_import_circles_and_no_file_over_600_lines():
    graph = {p.stem: _own_imports(p) for p in PAYLOAD.glob("*.py")}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))
    circles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and reaches(b, a))
    assert not circles, circles
    long = {p.name: n for p in PAYLOAD.glob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_the_shared_core_imports_no_torch(ref_python):
    """In the ModelOpt venv (torch installed): importing the core leaves torch unloaded; every
    step recipes declares has a runner in the whole-model pipeline (steps.RUNNERS), and every step
    of a recipe that streams one in the streamed pipeline (streamed_steps.RUNNERS)."""
    code = (f"import sys, json; from container_payload import {', '.join(CORE)}; core = 'torch' in sys.modules; "
            "from container_payload import steps, streamed_steps; "
            "streams = sorted({s.key for n in memory_plan.STREAMED_RECIPES for s in recipes.RECIPES[n].steps}); "
            "print(json.dumps([core, sorted(steps.RUNNERS), sorted(recipes.STEPS), streams, "
            "sorted(streamed_steps.RUNNERS)]))")
    proc = subprocess.run([ref_python, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch_loaded, runners, declared, streams, streamed_runners = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not torch_loaded
    assert runners == declared
    assert set(streams) <= set(streamed_runners) <= set(declared), (streams, streamed_runners)
    assert "keep_bf16" in streams  # smooth-gptq-seq-mp streams (issue 20)


@dataclass(frozen=True)
class _Rotate:
    """A step type the memory plan has never heard of: only its declaration speaks for it."""
    key = "rotate"

    def plan(self) -> recipes.Plan:
        return recipes.Plan(whole_only="rotate mixes every layer's weights", hidden_streams=3)


def test_memory_plan_reads_a_new_steps_declaration():
    steps = (recipes.Calibrate(), _Rotate())
    assert "rotate mixes every layer's weights" in memory_plan.refusal_of("custom", steps)
    shape = memory_plan.Shape(16 << 30, 2 << 30, 400 << 20, 4096, 14336)
    tokens = 65536
    with_it = memory_plan.peaks_of(shape, tokens, 4096, steps)
    without = memory_plan.peaks_of(shape, tokens, 4096, steps[:1])
    # three hidden-state streams, and "ours" (the whole path keeps the original weights too)
    assert with_it["streamed"] - without["streamed"] == 3 * tokens * shape.hidden * 2
    assert with_it["whole"] > without["whole"] + 3 * tokens * shape.hidden * 2
    # the resolved steps and the recipe name give the same plan
    for name in recipes.RECIPES:
        resolved = recipes.with_params(name, {})
        assert memory_plan.refusal(name) == memory_plan.refusal_of(name, resolved)
        assert memory_plan.peaks(shape, tokens, 4096, name) == memory_plan.peaks_of(shape, tokens, 4096, resolved)
