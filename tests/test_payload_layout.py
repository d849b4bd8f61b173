"""Issue 20: packages that show the architecture, in launcher/ and container_payload/.

The core the host shares (container_payload/core: contract, recipes, memory plan, tuning, events)
imports no torch; no import circles between modules nor between packages; no file over 600
lines; no import inside a function except the heavy or ordered ones listed below with their
reason; a step type is declared once (recipes: its Plan) and the memory plan reads the
declaration, so a new step needs no edit there; every declared step has a whole-model runner."""
from __future__ import annotations

import ast
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from container_payload.core import memory_plan, recipes

from conftest import REPO

TREES = ("launcher", "container_payload")
# Each tree's packages in layers (README: Design): a package imports only those before it; the
# command modules at the top of a tree may import any.
LAYERS = {"launcher": ("common", "records", "containers", "sources", "quality", "verify", "quantize"),
          "container_payload": ("core", "numerics", "steps", "pipelines")}
CORE = ("contract", "recipes", "memory_plan", "tuning", "events")

# Imports that may stay inside a function: third-party packages that are heavy and needed on
# one path only, or whose import order is the point (payload: torch, transformers and ModelOpt
# are imported after the background reads start; ModelOpt's internals differ by version).
HEAVY = {
    "torch": "the payload imports torch after its background reads start (pipelines/loading.py)",
    "transformers": "imported after torch, on the paths that load a model",
    "modelopt": "imported last; its internal modules differ between 0.37 and 0.47",
    "accelerate": "only to build an empty model skeleton",
    "datasets": "only for --calib hf: text",
    "safetensors": "safetensors.torch imports torch",
    "huggingface_hub": "launcher/common/paths.py stays stdlib for the benchmarks that import it",
    "mwparserfromhell": "only `make setup` converts wiki text; every command imports sources/assets.py",
    "lm_eval": "in the container only for eval --tasks, installed from the mounted wheels (tasks.py)",
}
# Our own modules imported inside a function, by file, with the reason.
LAZY_OWN = {
    "launcher/__main__.py": "SIGTERM is caught before the heavy imports (the cli and everything it loads)",
    "launcher/cli.py": "each command imports its own modules: `launcher --help` and `verify` start fast",
    "launcher/ending.py": "light on purpose: imported before the heavy modules, to catch SIGTERM",
    "container_payload/pipelines/loading.py": "direct_load imports torch: started before transformers",
    "container_payload/pipelines/pipelines.py": "direct_load, steps and streaming import torch/ModelOpt: "
                                                "after the background reads start",
    "container_payload/quantize.py": "recipe_build imports ModelOpt (imported last); linear_compute torch",
    "container_payload/tasks.py": "emulated_model imports torch: after lm-eval's mounted site is on sys.path",
}


def _modules(tree: str) -> dict[str, Path]:
    """Every module of a tree by dotted name (a package by its own name)."""
    out = {}
    for p in (REPO / tree).rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, bool, ast.AST]]:
    """(our module imported, inside a function?, node) for every import of the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - child.level + 1] if child.level else []
                module = ".".join(base + [child.module] if child.module else base)
                for a in child.names:
                    target = f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module
                    out.append((target, in_function, child))
            elif isinstance(child, ast.Import):
                out.extend((a.name, in_function, child) for a in child.names)
            visit(child, inner)
    visit(ast.parse(path.read_text()), False)
    return out


def _circles(graph: dict[str, set[str]]) -> list[str]:
    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))
    return sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and reaches(b, a, {b}))


def _package(module: str) -> str:
    """The subpackage a module belongs to (launcher.records.runs -> launcher.records); a module
    at the top of a tree is its own node."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_circles_and_packages_in_layers():
    for tree in TREES:
        mods = _modules(tree)
        graph = {n: {t for t, _, _ in _imports(n, p, mods) if t in mods and t != n and not n.startswith(t + ".")}
                 for n, p in mods.items()}
        assert not _circles(graph), (tree, _circles(graph))
        packages: dict[str, set[str]] = {}
        for n, targets in graph.items():
            packages.setdefault(_package(n), set()).update(_package(t) for t in targets if _package(t) != _package(n))
        assert not _circles(packages), (tree, _circles(packages))
        layers = [f"{tree}.{name}" for name in LAYERS[tree]]
        assert {p for p in packages if "." in p and (REPO / p.replace(".", "/")).is_dir()} == set(layers)
        upward = sorted(f"{a} -> {b}" for a in layers for b in packages.get(a, ())
                        if b not in layers or layers.index(b) > layers.index(a))
        assert not upward, (tree, upward)


def test_no_file_over_600_lines():
    long = {str(p.relative_to(REPO)): n for tree in TREES for p in (REPO / tree).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_imports_inside_functions_are_only_the_listed_heavy_ones():
    found = []
    for tree in TREES:
        mods = _modules(tree)
        for name, path in mods.items():
            rel = str(path.relative_to(REPO))
            for target, in_function, node in _imports(name, path, mods):
                if not in_function or target.split(".")[0] in HEAVY:
                    continue
                if target.split(".")[0] in TREES and rel in LAZY_OWN:
                    continue
                found.append(f"{rel}:{node.lineno} {target}")
    assert not found, found


def test_the_shared_core_imports_no_torch(ref_python):
    """In the ModelOpt venv (torch installed): importing the core leaves torch unloaded; every
    step recipes declares has a runner in the whole-model pipeline (steps.RUNNERS), and every step
    of a recipe that streams one in the streamed pipeline (streamed_steps.RUNNERS)."""
    code = (f"import sys, json; from container_payload.core import {', '.join(CORE)}; "
            "core = 'torch' in sys.modules; "
            "from container_payload.steps import steps; from container_payload.pipelines import streamed_steps; "
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


def test_benchmarks_import_names_the_payload_has(ref_python):
    """Every `from container_payload... import NAME` in benchmarks/ resolves (benchmarks run only
    on a GPU machine, where a name moved by a relayout costs a device call: 2026-12-07's first)."""
    wanted = sorted({(node.module, alias.name)
                     for path in sorted((REPO / "benchmarks").glob("*.py"))
                     for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("container_payload")
                     for alias in node.names})
    assert wanted, "no payload imports found in benchmarks/"
    check = ("import importlib, json, sys\nmissing = []\n"
             "for mod, name in json.loads(sys.argv[1]):\n"
             "    m = importlib.import_module(mod)\n"
             "    if not hasattr(m, name):\n"
             "        try: importlib.import_module(mod + '.' + name)\n"
             "        except ImportError: missing.append(mod + '.' + name)\n"
             "print(json.dumps(missing))")
    out = subprocess.run([ref_python, "-c", check, json.dumps(wanted)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == []
