"""Imports run down the layers: data/ uses neither train/, serve/ nor eval/; train/ uses neither
serve/ nor eval/; kb/ (the knowledge base, below the served graph) uses no training or eval code. Every import in the package counts, the ones inside functions too (a lazy
import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ray_ft"
FORBIDDEN = {"data": ("train", "serve", "eval", "pipeline", "retriever_stages", "run"),
             "train": ("serve", "eval", "pipeline", "retriever_stages", "run"),
             "kb": ("train", "eval", "pipeline", "retriever_stages", "run"),
             "metrics": ("data", "train", "serve", "eval", "pipeline", "retriever_stages", "run")}


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("ray_ft.")}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no modules under ray_ft/{layer}"
    bad = [f"{f.relative_to(PACKAGE.parent)} imports {m}" for f in files for m in sorted(imported_modules(f))
           if m.split(".")[1] in FORBIDDEN[layer]]
    assert bad == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ray_ft.serve.engines import VectorIndex\n    import ray_ft.eval.report\n")
    assert imported_modules(f) == {"ray_ft.serve.engines", "ray_ft.serve.engines.VectorIndex", "ray_ft.eval.report"}
