"""Every YAML under configs/ goes through the real command-line parser.

Pretraining recipes and trainer presets are parsed as the CLI parses them (types checked, every
``class_path`` imported and its ``init_args`` checked against the signature); model configs are
parsed as the ``model.model`` of a pretraining run and read by ``VLMoEConfig``. The demo config is
also instantiated (model, data, trainer) and must equal the CLI's defaults, which are the demo.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmoe.models import VLMoEConfig
from vlmoe.tasks.pretrain.cli import PretrainCLI, build_cli

ROOT = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted((ROOT / "pretrain").glob("*.yaml")) + sorted((ROOT / "trainer").glob("*.yaml"))
OVERLAYS = sorted((ROOT / "pretrain" / "moe").glob("*.yaml"))
MODEL_CONFIGS = sorted((ROOT / "model").glob("*.yaml"))


class ParseOnlyCLI(PretrainCLI):
    """Parse (and validate) without building anything: trainer presets name GPUs this machine lacks."""

    def instantiate_classes(self) -> None:
        self.config_init = None


def parse(*args: str):
    return build_cli(list(args), run=False, cli_class=ParseOnlyCLI).config


def test_configs_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in RUN_CONFIGS}
    assert {"pretrain/demo.yaml", "pretrain/beit3_base.yaml", "trainer/cpu.yaml", "trainer/ddp.yaml",
            "trainer/fsdp.yaml"} <= names
    assert {p.stem for p in OVERLAYS} == {"xmoe8", "mhmoe8", "xmoe32", "mhmoe32"}


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.stem)
def test_moe_overlay_composes_with_the_base_recipe(path: Path) -> None:
    """One base recipe, the MoE variants as overlays: each changes the model and the run folder only."""
    base = parse("--config", str(ROOT / "pretrain" / "beit3_base.yaml"))
    cfg = parse("--config", str(ROOT / "pretrain" / "beit3_base.yaml"), "--config", str(path))
    assert cfg.run_dir == f"runs/pretrain/beit3_base_{path.stem}" and cfg.model.model.startswith("base_")
    assert cfg.model.lr == base.model.lr == 2.8e-3 and cfg.data.batch_size == base.data.batch_size
    assert cfg.model.model_overrides["drop_path_rate"] == 0.1 and cfg.model.model_overrides["magneto_init"]
    if path.stem.endswith("32"):
        assert cfg.model.model_overrides["moe"] == {"num_experts": 32}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_run_config_parses(path: Path) -> None:
    cfg = parse("--config", str(path))
    assert cfg.trainer is not None and cfg.model is not None


@pytest.mark.parametrize("path", sorted((ROOT / "trainer").glob("*.yaml")), ids=lambda p: p.name)
def test_trainer_preset_composes_with_a_recipe(path: Path) -> None:
    cfg = parse("--config", str(ROOT / "pretrain" / "beit3_base.yaml"), "--config", str(ROOT / "pretrain" / "moe" /
                "mhmoe8.yaml"), "--config", str(path))
    assert cfg.model.model == "base_mhmoe8"
    if path.stem in ("ddp", "multi-node"):
        assert cfg.trainer.strategy == "ddp_find_unused_parameters_true"


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.name)
def test_model_config_parses_as_the_pretraining_model(path: Path) -> None:
    cfg = parse("--model.model", str(path))
    assert cfg.model.model == str(path)
    VLMoEConfig.from_file(path)  # what PretrainTask does with it


def _plain(ns):
    """Namespaces as dicts, tuples as lists (a YAML list and a default tuple mean the same)."""
    ns = ns.as_dict() if hasattr(ns, "as_dict") else ns
    if isinstance(ns, dict):
        return {k: _plain(v) for k, v in ns.items()}
    if isinstance(ns, list | tuple):
        return [_plain(v) for v in ns]
    return ns


def test_demo_yaml_is_the_default_run() -> None:
    default = _plain(parse())
    demo = _plain(parse("--config", str(ROOT / "pretrain" / "demo.yaml")))
    for section in ("trainer", "data", "checkpoint", "seed_everything"):
        assert demo[section] == default[section], section
    from jsonargparse.typing import import_object

    for model in (demo["model"], default["model"]):  # one class, named by either of its import paths
        model["mim_target"]["class_path"] = import_object(model["mim_target"]["class_path"])
    assert demo["model"] == default["model"]


def test_demo_pretraining_targets_keep_the_colours_the_captions_name() -> None:
    # the captions say "a red circle": a MIM target normalised per patch is the same (all zeros) for a
    # flat red patch and a flat blue one, so pretraining never needs the image's colours
    from vlmoe.tasks.pretrain import PixelTarget

    target = parse("--config", str(ROOT / "pretrain" / "demo.yaml")).model.mim_target
    assert target.class_path.endswith(".PixelTarget")
    pixel = PixelTarget(**dict(target.get("init_args") or {}))
    red, blue = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    red[:, 0], blue[:, 2] = 1.0, 1.0
    assert not torch.allclose(pixel(red, 8, "inception"), pixel(blue, 8, "inception"))
    data = parse("--config", str(ROOT / "pretrain" / "demo.yaml")).data
    assert tuple(data.scale) == (1.0, 1.0) and data.hflip == 0  # the captions' "left" and "large" hold
    assert data.mim_ratio_pair == 0  # the shape a caption names is never masked out of its image


def test_demo_config_instantiates(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the run folder is relative
    cli = build_cli(["fit", "--config", str(ROOT / "pretrain" / "demo.yaml")], run=False)
    assert cli.model.model.config.name == "demo_xmoe"
    assert cli.model.model.config.vocab_size == cli.datamodule.vocab_size  # linked from the tokenizer
    assert cli.trainer.max_steps == 600
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    assert cli.trainer.checkpoint_callback.dirpath.endswith("runs/pretrain/demo/checkpoints")


# ---------------------------------------------------------------------------------------------- finetuning
FINETUNE_CONFIGS = sorted((ROOT / "finetune").glob("*/*.yaml"))


def parse_finetune(task: str, *args: str):
    from vlmoe.tasks.finetune.cli import _cli_class, build_cli

    def skip(self):
        self.config_init = None

    cls = type("ParseOnly", (_cli_class(task),), {"instantiate_classes": skip})
    return build_cli(task, list(args), run=False, cli_class=cls).config


def test_finetune_configs_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in FINETUNE_CONFIGS}
    for task in ("vqav2", "nlvr2", "imagenet", "captioning", "retrieval"):
        assert {f"finetune/{task}/{n}.yaml" for n in ("demo", "beit3_base", "beit3_large")} <= names


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_finetune_config_parses(path: Path) -> None:
    cfg = parse_finetune(path.parent.name, "--config", str(path))
    assert cfg.model is not None and cfg.data is not None
    if path.stem.startswith("beit3"):
        cfg = parse_finetune(path.parent.name, "--config", str(path), "--config", str(ROOT / "trainer" / "ddp.yaml"))
        assert cfg.trainer.strategy == "ddp_find_unused_parameters_true"
    if path.stem.startswith("vitdet"):
        cfg = parse_finetune(path.parent.name, "--config", str(path), "--config", str(ROOT / "trainer" / "ddp.yaml"))
        assert (cfg.model.image_size, cfg.model.layer_decay, cfg.model.window_size) == (1024, 0.7, 14)
        assert cfg.trainer.strategy == "ddp_find_unused_parameters_true"


@pytest.mark.parametrize("task", ["vqav2", "nlvr2", "imagenet", "captioning", "retrieval", "detection", "segmentation"])
def test_finetune_demo_yaml_is_the_default_run(task: str) -> None:
    default = _plain(parse_finetune(task))
    demo = _plain(parse_finetune(task, "--config", str(ROOT / "finetune" / task / "demo.yaml")))
    for section in ("trainer", "model", "data", "checkpoint", "seed_everything"):
        assert demo[section] == default[section], section


def test_published_recipes_carry_the_reference_hyperparameters() -> None:
    """BEiT-3's documented finetuning settings (resolution, lr, layer decay, drop path, weight decay)."""
    want = {
        ("vqav2", "beit3_base"): (480, 3e-5, 1.0, 0.1, 0.01),
        ("vqav2", "beit3_large"): (480, 2e-5, 1.0, 0.15, 0.01),
        ("nlvr2", "beit3_base"): (224, 7e-4, 0.65, 0.2, 0.2),
        ("nlvr2", "beit3_large"): (224, 3e-4, 0.85, 0.2, 0.2),
        ("imagenet", "beit3_base"): (224, 7e-4, 0.65, 0.15, 0.05),
        ("imagenet", "beit3_large"): (224, 2e-4, 0.8, 0.25, 0.05),
        ("captioning", "beit3_base"): (480, 4e-5, 1.0, 0.1, 0.05),
        ("captioning", "beit3_large"): (480, 8e-6, 1.0, 0.0, 0.05),
        ("retrieval", "beit3_base"): (384, 2e-4, 0.65, 0.2, 0.05),
        ("retrieval", "beit3_large"): (384, 5e-5, 0.85, 0.2, 0.05),
    }
    for (task, name), (res, lr, ld, dp, wd) in want.items():
        m = parse_finetune(task, "--config", str(ROOT / "finetune" / task / f"{name}.yaml")).model
        assert (m.image_size, m.lr, m.layer_decay, m.drop_path_rate, m.weight_decay) == (res, lr, ld, dp, wd), name
    vqa = parse_finetune("vqav2", "--config", str(ROOT / "finetune" / "vqav2" / "beit3_base.yaml"))
    assert vqa.model.task_head_lr_weight == 20.0 and vqa.data.split == "beit3" and list(vqa.model.betas) == [0.9, 0.98]
    cap = parse_finetune("captioning", "--config", str(ROOT / "finetune" / "captioning" / "beit3_base.yaml"))
    m = cap.model
    assert (cap.data.max_len, cap.data.mask_prob, m.drop_worst_after, m.drop_worst_ratio) == (32, 0.7, 12000, 0.2)
    assert (cap.model.num_beams, cap.model.length_penalty, cap.model.label_smoothing) == (3, 0.6, 0.1)


# ---------------------------------------------------------------------------------------------- MoE options
def test_moe_fields_are_typed_options_with_help(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", str(ROOT / "pretrain" / "demo.yaml"), "--model.moe.top_k=1",
                     "--model.moe.router=softmax"], run=False)
    moe = cli.model.model.config.moe
    assert (moe.top_k, moe.router, moe.num_experts) == (1, "softmax", 4)  # the rest of demo_xmoe's MoE kept
    assert all(b.mlp.vision.config.top_k == 1 for b in cli.model.model.backbone.blocks)
    with pytest.raises(SystemExit):
        build_cli(["fit", "--help"], run=False)
    help_text = capsys.readouterr().out
    assert "--model.moe.top_k TOP_K" in help_text and "Experts each token is sent to" in help_text
    from argparse import ArgumentError

    with pytest.raises(ArgumentError, match="unrecognized arguments: --model.moe.topk"):  # refused by the parser
        parse("--model.moe.topk=1")
    with pytest.raises(ArgumentError, match="top_k"):
        parse("--model.moe.top_k=two")


def test_moe_overrides_name_the_valid_keys_and_a_dense_model_needs_a_size() -> None:
    from vlmoe.tasks.pretrain import PretrainTask

    with pytest.raises(ValueError, match=r"unknown MoEConfig key\(s\) \['topk'\]; known keys: \[.*'top_k'"):
        PretrainTask("tiny_moe", model_overrides={"moe": {"topk": 1}})
    from vlmoe.moe import MoEOptions

    with pytest.raises(ValueError, match=r"\['top_k'\] given, but 'tiny' has no MoE layers; give moe.num_experts"):
        PretrainTask("tiny", moe=MoEOptions(top_k=1))
    made = PretrainTask("tiny", moe=MoEOptions(num_experts=2, top_k=1, ffn_dim=64)).model.config.moe
    assert (made.num_experts, made.top_k, made.ffn_dim) == (2, 1, 64)


# ---------------------------------------------------------------------------------------------- one source
def test_the_yaml_stated_in_python_is_what_python_writes() -> None:
    """configs/model/*.yaml, configs/finetune/*/demo.yaml and configs/pretrain/demo.yaml are written from
    PRESETS, the tasks' specs and the pretraining CLI's defaults (tools/write_configs.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("write_configs", ROOT.parent / "tools" / "write_configs.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    files = tool.generated()
    assert {p.relative_to(ROOT).as_posix() for p in files} >= {"model/demo_xmoe.yaml", "finetune/vqav2/demo.yaml",
                                                                "pretrain/demo.yaml"}
    stale = [p.relative_to(ROOT).as_posix() for p, text in files.items() if p.read_text() != text]
    assert not stale, f"{stale}: run python tools/write_configs.py"
    assert {p.stem for p in MODEL_CONFIGS} == {p.stem for p in files if p.parent.name == "model"}
