"""Adding a task is one module plus one registration.

The first part of this file is a whole new task, ``mean_colour`` (regress the mean RGB colour of an
image): its head, loss, evaluator, data, LightningModule, ``Predictor`` method and ``TaskSpec``. Once
registered, ``vlmoe finetune mean_colour`` trains and evaluates it, ``vlmoe export`` / ``vlmoe.load``
/ ``vlmoe predict mean_colour`` / the web page use it, and ``vlmoe finetune --help`` lists it; no other
file of the package knows of it. The toy task at the end shows the smallest LightningModule on the base.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tests.utils import trainer
from vlmoe.data import build_transform
from vlmoe.data.imagenet import ImageFolderDataset
from vlmoe.data.inputs import as_list
from vlmoe.metrics import Evaluator
from vlmoe.models import TaskModel, create_model, register_task_model
from vlmoe.tasks import VLMoETask
from vlmoe.tasks.finetune import FinetuneDataModule, FinetuneTask
from vlmoe.tasks.registry import Prediction, TaskSpec, register_task, unregister_task


# ---------------------------------------------------------------- the new task: one module's worth
class MeanColourModel(TaskModel):
    """Head: a linear map of the mean patch token to RGB in [0, 1]."""

    task = "mean_colour"

    def __init__(self, backbone) -> None:
        super().__init__(backbone)
        self.head = nn.Linear(backbone.config.dim, 3)

    def forward(self, image: Tensor, return_aux: bool = False):
        out = self.backbone(image=image)
        rgb = torch.sigmoid(self.head(out.vision_patches.mean(dim=1)))  # (B, 3)
        return (rgb, out.aux) if return_aux else rgb


class MeanColourEvaluator(Evaluator):
    """Mean absolute error (0-255 levels) and R^2 of the predicted colours, one record per image."""

    id_key = "index"

    def compute(self) -> dict[str, float]:
        pred = torch.tensor([r["pred"] for r in self.records])
        true = torch.tensor([r["target"] for r in self.records])
        sse, sst = ((pred - true) ** 2).sum(), ((true - true.mean(0)) ** 2).sum()
        return {"r2": float(1 - sse / sst), "mae": float((pred - true).abs().mean() * 255),
                "num_images": float(len(pred))}


class ColourImages(torch.utils.data.Dataset):
    """Synthetic images: a random background with a random rectangle of another colour; the target is
    the image's mean colour in [0, 1]."""

    def __init__(self, n: int, seed: int, transform: Any) -> None:
        self.n, self.seed, self.transform = n, seed, transform

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> Image.Image:
        rng = random.Random(self.seed * 100_003 + i)
        img = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        x0, y0 = rng.randrange(24), rng.randrange(24)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x0, y0, x0 + rng.randint(4, 8), y0 + rng.randint(4, 8)))
        return img

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = self.image(i)
        target = torch.tensor(img.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0)), dtype=torch.float32) / 255
        return {"image": self.transform(img), "target": target, "index": i}


class MeanColourDataModule(FinetuneDataModule):
    """``train_size`` / ``val_size`` synthetic images (:class:`ColourImages`)."""

    def __init__(self, train_size: int = 512, val_size: int = 128, **kwargs: Any) -> None:
        kwargs["tokenizer"] = None
        super().__init__(**kwargs)
        self.train_size, self.val_size = train_size, val_size

    def setup(self, stage: str | None = None) -> None:
        self.datasets.setdefault("train", ColourImages(self.train_size, 1, self.transform(True)))
        self.datasets.setdefault("val", ColourImages(self.val_size, 2, self.transform(False)))


class MeanColourTask(FinetuneTask):
    """L1 loss on the colour; evaluated by :class:`MeanColourEvaluator`."""

    default_overrides = {"modalities": ["vision"]}
    metric_key = "r2"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_model(self, backbone) -> MeanColourModel:
        return MeanColourModel(backbone)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        rgb, aux = self.model(batch["image"], return_aux=True)
        return self.loss_with_aux(F.l1_loss(rgb, batch["target"]), aux)

    def make_evaluator(self, stage: str) -> MeanColourEvaluator:
        return MeanColourEvaluator()

    def eval_step(self, batch: dict[str, Any]) -> tuple[Tensor | None, list[dict[str, Any]]]:
        rgb, aux = self.model(batch["image"], return_aux=True)
        loss = self.loss_with_aux(F.l1_loss(rgb, batch["target"]), aux, stage="val")
        return loss, [{"index": i, "pred": p, "target": t} for i, p, t in
                      zip(batch["index"].tolist(), rgb.tolist(), batch["target"].tolist())]


def mean_colour(predictor: Any, images: Any) -> list[dict[str, Any]]:
    """The mean colour of each image, ``{"rgb": [r, g, b]}`` in 0-255 levels."""
    imgs, out = as_list(images), []
    for s in predictor.batches(len(imgs)):
        rgb = predictor.model(predictor.images(imgs[s], s.start)) * 255
        out += [{"rgb": [round(v) for v in row]} for row in rgb.tolist()]
    return out


SPEC = TaskSpec(
    name="mean_colour", task=MeanColourTask, data=MeanColourDataModule, model=MeanColourModel, metric="r2",
    demo={"model.model": "tiny_moe", "model.init_checkpoint": None, "model.image_size": 32, "model.lr": 2e-3,
          "model.warmup_steps": 10, "data.batch_size": 32, "data.randaug": "", "data.scale": [1.0, 1.0],
          "data.hflip": 0.0, "data.num_workers": 0},
    trainer={"max_epochs": 12, "max_steps": -1},
    description="The mean colour of an image (a regression head; R^2 and MAE).",
    predict=Prediction("mean_colour", mean_colour, help="the mean colour of every image",
                       text=lambda r: "rgb({}, {}, {})".format(*r["rgb"])),
)
# ---------------------------------------------------------------- end of the new task


@pytest.fixture
def registered():
    register_task(SPEC)
    yield SPEC
    unregister_task(SPEC.name)


def _metrics(run) -> dict[str, float]:
    return json.loads((run / "predictions" / "val_metrics.json").read_text())


def test_a_new_task_trains_evaluates_predicts_and_is_listed(registered, tmp_path, capsys) -> None:
    from vlmoe.app import respond
    from vlmoe.cli import main

    main(["finetune", "--help"])
    assert re.search(r"\n  mean_colour +The mean colour of an image", capsys.readouterr().out)
    common = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]

    # train and score it (12 epochs of 16 steps); then the same split with the weights of a random init
    run = tmp_path / "run"
    main(["finetune", "mean_colour", f"--run_dir={run}", *common])
    trained = _metrics(run)
    assert trained["step"] == 192 and trained["num_images"] == 128
    assert trained["r2"] > 0.8 and trained["mae"] < 15, trained
    untrained = tmp_path / "untrained"
    main(["finetune", "mean_colour", "validate", f"--run_dir={untrained}", *common])
    assert _metrics(untrained)["r2"] < 0.2 and _metrics(untrained)["mae"] > 30, _metrics(untrained)
    last = run / "checkpoints" / "last.ckpt"
    again = tmp_path / "again"
    main(["finetune", "mean_colour", "validate", f"--ckpt_path={last}", f"--run_dir={again}", *common])
    assert _metrics(again)["r2"] == pytest.approx(trained["r2"], abs=1e-6)

    # use it: export, vlmoe.load, vlmoe predict, the web page
    import vlmoe

    main(["export", str(last), str(tmp_path / "export")])
    model = vlmoe.load(tmp_path / "export")
    assert model.task == "mean_colour" and "mean_colour" in dir(model)
    image = ColourImages(1, 3, lambda x: x).image(0)
    image.save(tmp_path / "img.png")
    truth = image.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    rgb = model.mean_colour(image)[0]["rgb"]
    assert max(abs(a - b) for a, b in zip(rgb, truth)) < 40, (rgb, truth)
    main(["predict", "mean_colour", "--model", str(tmp_path / "export"), str(tmp_path / "img.png"),
          "--out", str(tmp_path / "p.jsonl")])
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert row == {"image": str(tmp_path / "img.png"), "rgb": rgb}
    text, drawn, _, _ = respond(model, image)
    assert text == "rgb({}, {}, {})".format(*rgb) and drawn is None
    with pytest.raises(ValueError, match="this model's task is 'mean_colour'; this method needs a vqa model"):
        model.answer(image, "what colour is it?")


def test_a_task_name_or_method_is_registered_once(registered) -> None:
    from vlmoe.tasks.finetune import VQATask

    with pytest.raises(ValueError, match="a task named 'mean_colour' is already registered"):
        register_task(TaskSpec(name="mean_colour", task=VQATask, data=MeanColourDataModule, model=MeanColourModel,
                               metric="r2"))
    with pytest.raises(ValueError, match=r"prediction method\(s\) \['answer'\] already belong to task 'vqav2'"):
        register_task(TaskSpec(name="colour2", task=MeanColourTask, data=MeanColourDataModule,
                               model=MeanColourModel, metric="r2", predict=Prediction("answer", mean_colour)))


# ---- the smallest LightningModule on the base: 17 lines (a shape classifier on the vision branch) ----
@register_task_model
class ToyShapeModel(TaskModel):
    task = "toy_shapes"

    def __init__(self, backbone, num_classes: int = 3):
        super().__init__(backbone)
        self.num_classes, self.head = num_classes, nn.Linear(backbone.config.dim, num_classes)

    def head_config(self):
        return {"num_classes": self.num_classes}


class ToyShapeTask(VLMoETask):
    def __init__(self, preset: str = "tiny_moe", **kwargs):
        super().__init__(**kwargs)
        self.model = ToyShapeModel(create_model(preset, modalities=["vision"]))

    def training_step(self, batch, batch_idx):
        out = self.model(image=batch["image"])
        loss = F.cross_entropy(self.model.head(out.vision_cls), batch["label"]) + out.aux.loss
        self.check_terms({"loss": loss, **self.aux_terms(out.aux)}, stats=out.aux.stats)
        return loss
# ---- end of the toy task ----


def test_a_toy_task_trains_on_the_base(demo, tmp_path) -> None:
    data = ImageFolderDataset(demo.imagefolder_shape / "train", transform=build_transform("eval", 32))
    loader = DataLoader(torch.utils.data.Subset(data, range(8)), batch_size=4)
    task = ToyShapeTask(lr=1e-3, stats_every=1)
    before = task.model.head.weight.detach().clone()
    t = trainer(tmp_path, fast_dev_run=2)
    t.fit(task, loader)
    assert t.global_step == 2 and not torch.equal(before, task.model.head.weight)
    assert not any(".text." in n or n.startswith("model.backbone.text_embed") for n, _ in task.named_parameters())
    # what the base gives it: layer-decay groups through the backbone, MoE routing statistics
    groups = {n: g["lr_scale"] for g in task._param_groups() for n in g["names"]}
    assert groups["model.head.weight"] == 1.0
    assert "perf/samples_per_s" in t.callback_metrics  # throughput, from the base's callbacks
    assert any(type(c).__name__ == "RoutingStatistics" for c in t.callbacks)
    assert task.model.task_config() == {"type": "toy_shapes", "num_classes": 3}
