"""Every code snippet of the README runs.

- Python blocks run as written, at the ``tiny`` scale: preset names, image sizes and widths are
  substituted (:data:`TINY`), and the checkpoint file a snippet names is made first (a random tiny
  model in BEiT-3's published key layout).
- The main command (``vlmoe pretrain && vlmoe finetune vqav2``) runs on the demo data with a few steps;
  then the "Use a model" section runs as written on what it wrote (its finetuning with a few steps, its
  exports, ``vlmoe predict`` on a ``photos/`` folder of demo images with a corrupt file and a text file
  in it, its Python block; ``vlmoe app`` is started on a free port until its page answers, then
  stopped - ``tests/test_app.py`` drives the page in a browser); ``vlmoe export`` lines run on what it
  wrote; every other
  ``vlmoe pretrain`` / ``vlmoe finetune`` line is parsed by the real CLI (``--print_config``: options,
  config files and subcommands checked).
- The install and test commands are the ones ``.ci/run`` runs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from tests.utils import free_port
from vlmoe.cli import main as vlmoe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

TINY = [
    ('"base_mhmoe8"', '"tiny_mhmoe"'),
    ('"base_xmoe8"', '"tiny_moe"'),
    ("torch.randn(2, 3, 224, 224)", "torch.randn(2, 3, 32, 32)"),
    ("torch.randint(0, 64010, (2, 16))", "torch.randint(0, 128, (2, 16))"),
    ("codebook_size=8192", "codebook_size=64"),
    ("MoE(dim=768", "MoE(dim=64"),
    ("ffn_dim=3072", "ffn_dim=128"),
    ("torch.randn(4, 256, 768)", "torch.randn(4, 16, 64)"),
    ('init_process_group("nccl")', 'init_process_group("gloo")'),
]


def _blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


USE = README[README.index("\n## Use a model") : README.index("\n## ", README.index("\n## Use a model") + 5)]
GENERIC_PYTHON = [b for b in _blocks("python") if b not in _blocks("python", USE)]


def _beit3_file(path: Path) -> None:
    from vlmoe.models import VLMoEForPretraining, create_model, vlmoe_to_beit3

    task = VLMoEForPretraining(create_model("tiny"), codebook_size=64)
    torch.save({"model": vlmoe_to_beit3(task.state_dict())}, path)


@pytest.mark.parametrize("index", range(len(GENERIC_PYTHON)))
def test_python_snippet_runs(index, tmp_path, monkeypatch) -> None:
    code = GENERIC_PYTHON[index]
    for a, b in TINY:
        code = code.replace(a, b)
    monkeypatch.chdir(tmp_path)
    for name in set(re.findall(r'"([\w.]+\.pth)"', code)):
        _beit3_file(tmp_path / name)
    group = "init_process_group" in code
    if group:
        port = free_port()
        for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
            monkeypatch.setenv(k, v)
    try:
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    finally:
        if group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _vlmoe_lines(text: str = README) -> list[str]:
    lines = []
    for block in _blocks("bash", text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):
                part = part.split(">", 1)[0].strip()  # a shell redirection is not an argument
                if part.startswith("vlmoe "):
                    lines.append(part)
    return lines


def test_install_and_test_commands_are_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().replace(" -q", "")
    bash = _blocks("bash")
    install = next(b for b in bash if "vlmoe pretrain && vlmoe finetune vqav2" in b)
    tests = next(b for b in bash if "pytest" in b)
    assert "python3 -m venv .venv" in install and "pip install -e ." in install
    for step in ('pip install -e ".[test,app]"', "pip install --no-deps torchscale fairscale", "python -m pytest"):
        assert step in tests and step in ci, step


def test_main_command_and_every_cli_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLMOE_DATA", str(tmp_path / "data"))
    quick = {
        "pretrain": ["--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
                     "--data.num_workers=0", "--trainer.enable_progress_bar=false"],
        "finetune": ["--trainer.max_steps=2", "--data.limit_train_samples=64", "--data.batch_size=16",
                     "--trainer.limit_val_batches=1",
                     "--trainer.val_check_interval=2", "--data.num_workers=0", "--trainer.enable_progress_bar=false"],
    }
    lines = _vlmoe_lines()
    assert "vlmoe pretrain" in lines and "vlmoe finetune vqav2" in lines
    # the main command, on the demo data (built on first use), a few steps of each
    vlmoe(["pretrain", *quick["pretrain"]])
    vlmoe(["finetune", "vqav2", *quick["finetune"]])
    assert (tmp_path / "runs" / "pretrain" / "demo" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "runs" / "finetune" / "vqav2" / "demo" / "predictions" / "val_metrics.json").is_file()
    done = _use_a_model(tmp_path, quick["finetune"], capsys)
    for line in lines:
        if line in done:
            continue
        argv = shlex.split(line)[1:]
        if argv[0] == "export":
            vlmoe(argv)  # on what the main command wrote
            assert Path(argv[2]).joinpath("config.json").is_file()
            continue
        if argv[0] == "study":  # hours of CPU: planned and reported (no jobs run), which checks every name
            vlmoe([*argv, "--report-only"] if "--report-only" not in argv else argv)
            continue
        if argv[0] in ("predict", "evaluate", "analyze"):  # they need the user's files: the line must parse
            import importlib

            from vlmoe.cli import COMMANDS

            importlib.import_module(COMMANDS[argv[0]][0]).build_parser().parse_args(argv[1:])
            continue
        if argv[0] not in ("pretrain", "finetune") or argv in (["pretrain"], ["finetune", "vqav2"]):
            continue
        argv = [a if a != "..." else "runs/finetune/vqav2/demo/checkpoints/last.ckpt" for a in argv]
        argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv]
        if "--help" in argv:
            with pytest.raises(SystemExit) as e:
                vlmoe(argv)
            assert e.value.code == 0, line
            continue
        with pytest.raises(SystemExit) as e:
            vlmoe([*argv, "--print_config"])
        assert e.value.code in (0, None), (line, capsys.readouterr().err[-2000:])


def _use_a_model(tmp_path: Path, quick: list[str], capsys) -> set[str]:
    """The "Use a model" section, as written, on what the main command wrote (see the module docstring)."""
    import json

    from tests.utils import easy_vqa_pngs

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, png in zip(["shape.png", "b.png", "c.png"], easy_vqa_pngs(3, "test")):
        (photos / name).write_bytes(png)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (photos / "notes.txt").write_text("not an image")
    lines = _vlmoe_lines(USE)
    assert any(line.startswith("vlmoe predict caption") for line in lines), lines
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv[0] == "finetune":
            vlmoe([*argv, *quick])
        elif argv[0] == "app":
            _serve_and_fetch(argv)
        else:
            capsys.readouterr()
            vlmoe(argv)
            if argv[0] == "predict":
                out = capsys.readouterr()
                path = argv[argv.index("--out") + 1] if "--out" in argv else None
                rows = [json.loads(r) for r in (Path(path).read_text() if path else out.out).splitlines()]
                assert sorted(Path(r["image"]).name for r in rows) == ["b.png", "c.png", "shape.png"], line
                assert "broken.jpg" in out.err  # reported and skipped
    for code in _blocks("python", USE):
        capsys.readouterr()
        exec(compile(code, "README.md 'Use a model' python block", "exec"), {"__name__": "__readme__"})
        printed = capsys.readouterr().out
        assert "'answer'" in printed and "'score'" in printed
    return set(lines)


def _serve_and_fetch(argv: list[str]) -> None:
    """Start ``vlmoe app ...`` (on a free port), wait until its page is served, stop it."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("gradio", reason="the web demo needs Gradio: pip install 'vlmoe[app]'")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmoe.cli", *argv, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        if page is None:
            out = proc.stdout.read()[-2000:] if proc.poll() is not None else "(still running)"
            raise AssertionError(f"vlmoe app did not serve its page (exit {proc.poll()}): {out}")
        assert '"title":"vlmoe"' in page and "a vqa model" in page  # the page of this model
    finally:
        proc.terminate()
        proc.wait(timeout=30)
