"""The package's layers import only what DESIGN allows (checked in fresh interpreters)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
