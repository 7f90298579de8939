"""The package's layers import only what DESIGN allows (checked in fresh interpreters)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", ["vlmoe.moe", "vlmoe.layers", "vlmoe.models"])
def test_model_code_never_imports_lightning(module: str) -> None:
    mods = _imported(module)
    assert not {m for m in mods if m.split(".")[0] in ("lightning", "pytorch_lightning", "jsonargparse")}
    assert not {m for m in mods if m.startswith(("vlmoe.tasks", "vlmoe.data", "vlmoe.metrics"))}


def test_data_imports_neither_tasks_nor_metrics_nor_lightning() -> None:
    mods = _imported("vlmoe.data")
    assert not {m for m in mods if m.startswith(("vlmoe.tasks", "vlmoe.metrics", "vlmoe.models"))}
    assert "lightning" not in {m.split(".")[0] for m in mods}


def test_metrics_and_protocols_are_pure_python() -> None:
    for module in ("vlmoe.metrics", "vlmoe.metrics.vqa", "vlmoe.protocols.vqa", "vlmoe.protocols.nlvr2"):
        mods = _imported(module)
        assert not {m for m in mods if m.split(".")[0] in ("torch", "lightning")}, module
        assert not {m for m in mods if m.startswith(("vlmoe.data", "vlmoe.tasks", "vlmoe.models"))}, module


# Which part of the package may import which (DESIGN.md, "Layers of the package"); `io` and `runtime`
# are leaf helpers every part may use. Checked on the source, so imports inside functions count too.
ALLOWED = {
    "protocols": set(),
    "moe": set(),
    "layers": {"moe"},
    "models": {"layers", "moe"},
    "data": {"protocols"},
    "metrics": {"protocols"},
    "tasks": {"models", "layers", "moe", "data", "metrics", "protocols"},
    "inference": {"tasks", "models", "layers", "moe", "data", "metrics", "protocols"},
    "analysis": {"tasks", "models", "layers", "moe", "data", "metrics", "protocols"},
    "app": {"inference", "analysis", "tasks", "models", "layers", "moe", "data", "metrics", "protocols"},
    "study": {"tasks", "models", "layers", "moe", "data", "metrics", "protocols"},
}
TOP = {"commands", "cli", "bench", "vlmoe"}  # the entry points: anything below them
LEAVES = {"io", "runtime"}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return None if parts[0] != "vlmoe" else parts[1] if len(parts) > 1 else "vlmoe"


def _imports(path) -> set[str]:
    """Every vlmoe module ``path`` imports, at the top or inside a function (relative imports resolved)."""
    import ast

    rel = path.with_suffix("").relative_to(ROOT).parts
    package = list(rel if path.name == "__init__.py" else rel[:-1])
    package = package[:-1] if package[-1] == "__init__" else package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.add(".".join(base + ([node.module] if node.module else [])))
    return {m for m in found if m.split(".")[0] == "vlmoe"}


def test_every_import_follows_the_layers_functions_included() -> None:
    wrong = []
    for path in sorted((ROOT / "vlmoe").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        part = _part(".".join(rel.parts))
        if part in TOP or part in LEAVES:
            continue
        for module in sorted(_imports(path)):
            target = _part(module)
            if target not in (part, None) and target not in LEAVES and target not in ALLOWED[part]:
                wrong.append(f"{rel}: {part} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_layering_check_sees_an_import_inside_a_function(tmp_path) -> None:
    probe = ROOT / "vlmoe" / "metrics" / "_layering_probe.py"
    probe.write_text("def f():\n    from vlmoe.data._io import load_json\n    from ..tasks import base\n")
    try:
        assert _imports(probe) == {"vlmoe.data._io", "vlmoe.tasks"}
    finally:
        probe.unlink()


def test_task_base_and_callbacks_form_no_circle() -> None:
    assert not {m for m in _imports(ROOT / "vlmoe" / "tasks" / "callbacks.py") if m.startswith("vlmoe.tasks")}
