"""Adding a task is small: a task model (backbone + head) and a LightningModule on the shared base."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from tests.utils import trainer
from vlmoe.data import build_transform
from vlmoe.data.imagenet import ImageFolderDataset
from vlmoe.models import TaskModel, create_model, register_task_model
from vlmoe.tasks import VLMoETask


# ---- the whole toy task: 17 lines (a shape classifier on the vision branch of an MoE model) ----
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
