"""The shuffled-image control of the vision-language evaluations (``--model.controls``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.utils import trainer
from vlmoe.data.controls import ShuffledImages, image_derangement
from vlmoe.data.transforms import resolve_mean_std
from vlmoe.moe import MoEAux
from vlmoe.tasks.finetune import RetrievalDataModule, RetrievalTask, VQADataModule, VQATask
from vlmoe.tasks.finetune.base import control_name

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")


def test_derangement_gives_every_sample_another_image_the_same_for_equal_images() -> None:
    keys = [3, 3, 7, 1, 1, 1, 9, 7, 5]
    donor = image_derangement(keys, seed=0)
    assert all(keys[d] != k for k, d in zip(keys, donor))
    # the questions of one image share one control image (a function of the image, not the sample)
    by_key: dict[int, set[int]] = {}
    for k, d in zip(keys, donor):
        by_key.setdefault(k, set()).add(keys[d])
    assert all(len(v) == 1 for v in by_key.values())
    # a permutation of the distinct images: every image is handed to exactly one other
    assert sorted(next(iter(v)) for v in by_key.values()) == sorted(set(keys))
    assert donor == image_derangement(keys, seed=0) and donor != image_derangement(keys, seed=1)
    with pytest.raises(ValueError, match="2 distinct images"):
        image_derangement([4, 4, 4])


def test_shuffled_images_hands_over_both_images_of_a_pair() -> None:
    data = [{"image": torch.full((1,), float(i)), "image2": torch.full((1,), 10.0 + i), "text": str(i)}
            for i in range(5)]
    wrapped = ShuffledImages(data, keys=list(range(5)))
    for i in range(5):
        s, d = wrapped[i], wrapped.donor[i]
        assert d != i and s["text"] == str(i) and s["image"].item() == i
        assert s["control_image"].item() == d and s["control_image2"].item() == 10 + d
    with pytest.raises(ValueError, match="3 image keys for 5 samples"):
        ShuffledImages(data, keys=[0, 1, 2])


def test_control_names() -> None:
    assert control_name("accuracy") == "accuracy_shuffled_images"
    assert control_name("accuracy/yes/no") == "accuracy_shuffled_images/yes/no"
    assert control_name("num_questions") == "num_questions" and control_name("coverage") == "coverage"


# ---------------------------------------------------------------------------------------------- VQA
def _shape_rgb(image: torch.Tensor, mean_std: str) -> np.ndarray:
    """The RGB of the pixel farthest from the corner (background) colour of an easy-vqa image."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in resolve_mean_std(mean_std))
    rgb = (image * std + mean).clamp(0, 1).mul(255).permute(1, 2, 0).reshape(-1, 3)  # (3, H, W) -> (HW, 3)
    far = (rgb - rgb[0]).abs().sum(-1).argmax()
    return rgb[far].numpy()


def _palette(demo) -> dict[str, np.ndarray]:
    """Each colour's fill RGB, read from one training image of the demo's colour x shape folders."""
    out = {}
    for name in COLORS:
        path = sorted((Path(demo.imagefolder_color_shape) / "train").glob(f"{name}_circle/*"))[0]
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).reshape(-1, 3)
        out[name] = rgb[np.abs(rgb - rgb[0]).sum(-1).argmax()]
    return out


class _TextOnly(nn.Module):
    """Answers from the question's tokens alone: 'yes' for an even token count, else 'no'."""

    def __init__(self, backbone: nn.Module, answers: list[str]) -> None:
        super().__init__()
        self.backbone, self.answers = backbone, answers

    def forward(self, image, text_ids, text_padding_mask=None, return_aux=False):
        n = (~text_padding_mask).sum(-1)
        logits = torch.zeros(len(text_ids), len(self.answers))
        logits[n % 2 == 0, self.answers.index("yes")] = 1.0
        logits[n % 2 == 1, self.answers.index("no")] = 1.0
        return (logits, MoEAux.zero(image.device)) if return_aux else logits


class _ColourReader(_TextOnly):
    """Names the colour of the image's shape (the palette entry nearest to its fill), for any question."""

    def __init__(self, backbone: nn.Module, answers: list[str], palette: dict[str, np.ndarray], mean_std: str):
        super().__init__(backbone, answers)
        self.palette, self.mean_std = palette, mean_std

    def forward(self, image, text_ids, text_padding_mask=None, return_aux=False):
        logits = torch.zeros(len(image), len(self.answers))
        for i, img in enumerate(image):
            rgb = _shape_rgb(img, self.mean_std)
            name = min(self.palette, key=lambda c: np.abs(self.palette[c] - rgb).sum())
            logits[i, self.answers.index(name)] = 1.0
        return (logits, MoEAux.zero(image.device)) if return_aux else logits


def _vqa_validate(demo, tokenizer, tmp_path, build, controls=True, questions=600):
    dm = VQADataModule(demo_dir=str(demo.root), randaug="", scale=(1.0, 1.0), num_workers=0, batch_size=4,
                       val_batch_size=100, max_len=16, image_size=32)
    dm.tokenizer = tokenizer
    dm.setup("validate")
    dm.datasets["val"].records = dm.datasets["val"].records[:questions]

    class Task(VQATask):
        def build_model(self, backbone):
            return build(backbone, self.answers)

    task = Task(answers=dm.answers, vocab_size=dm.vocab_size, model="tiny", init_checkpoint=None,
                controls=controls, output_dir=str(tmp_path / "pred"))
    return trainer(tmp_path, limit_val_batches=None).validate(task, datamodule=dm)[0]


def test_a_model_that_ignores_the_image_scores_the_same_with_shuffled_images(demo, tokenizer, tmp_path) -> None:
    m = _vqa_validate(demo, tokenizer, tmp_path, _TextOnly)
    for key in ("accuracy", "accuracy/yes/no", "accuracy/other"):
        assert m[f"val/{control_name(key)}"] == m[f"val/{key}"]
    assert 0.0 < m["val/accuracy/yes/no"] < 1.0
    saved = json.loads((tmp_path / "pred" / "val_metrics.json").read_text())
    assert saved["accuracy_shuffled_images"] == pytest.approx(m["val/accuracy_shuffled_images"])


def test_a_model_that_reads_the_colour_loses_it_with_shuffled_images(demo, tokenizer, tmp_path) -> None:
    palette = _palette(demo)
    m = _vqa_validate(demo, tokenizer, tmp_path, lambda bb, answers: _ColourReader(bb, answers, palette, "inception"))
    gt = json.loads(Path(demo.vqa_val_annotations).read_text())["annotations"][:600]
    colour_share = sum(a["multiple_choice_answer"] in COLORS for a in gt) / len(gt)
    # it answers every colour question right from the true images (and nothing else) ...
    assert m["val/accuracy"] == pytest.approx(colour_share, abs=0.02)
    # ... and about one in eight of them with another image's colour
    assert m["val/accuracy_shuffled_images"] < colour_share * 0.3
    assert m["val/accuracy_shuffled_images/yes/no"] == m["val/accuracy/yes/no"] == 0.0


def test_controls_off_scores_the_metric_alone(demo, tokenizer, tmp_path) -> None:
    m = _vqa_validate(demo, tokenizer, tmp_path, _TextOnly, controls=False, questions=100)
    assert "val/accuracy" in m and not any("shuffled" in k for k in m)


def test_retrieval_control_permutes_the_image_embeddings(demo, tokenizer, tmp_path) -> None:
    dm = RetrievalDataModule(demo_dir=str(demo.root), num_workers=0, batch_size=4, val_batch_size=50, max_len=16,
                             hflip=0.0, scale=(1.0, 1.0), randaug="")
    dm.tokenizer = tokenizer
    task = RetrievalTask(vocab_size=dm.vocab_size, model="tiny", init_checkpoint=None)
    m = trainer(tmp_path, limit_val_batches=2).validate(task, datamodule=dm)[0]
    assert {"val/average_score", "val/average_score_shuffled_images", "val/tr_r1_shuffled_images"} <= set(m)
    ev = task.evaluators["val"]
    images = [r for r in ev.records if r["key"].startswith("i")]
    texts = [r for r in ev.records if r["key"].startswith("t")]
    # the control by hand: every image's embedding is another image's, the captions stay
    donor = image_derangement([r["image_id"] for r in images], seed=dm.seed)
    img = torch.tensor([images[d]["embedding"] for d in donor])
    txt = torch.tensor([r["embedding"] for r in texts])
    row = {r["image_id"]: i for i, r in enumerate(images)}
    target = torch.tensor([row[r["image_id"]] for r in texts])
    ranks = (img @ txt.t()).t().argsort(dim=1, descending=True)  # text -> image
    ir_r1 = (ranks[:, 0] == target).float().mean().item()
    assert m["val/ir_r1_shuffled_images"] == pytest.approx(ir_r1)


def test_nlvr2_control_replaces_both_images_by_another_statements_pair(demo, tokenizer) -> None:
    from vlmoe.tasks.finetune import NLVR2DataModule

    dm = NLVR2DataModule(demo_dir=str(demo.root), num_workers=0, val_batch_size=6, max_len=16, image_size=32)
    dm.tokenizer = tokenizer
    dm.controls = True
    dm.setup("validate")
    data = dm.datasets["val"]
    batch = next(iter(dm.val_dataloader()))
    pairs = [tuple(str(p) for p in data.image_paths(i)) for i in range(len(data))]
    wrapped = dm.val_dataloader().dataset
    for i in range(6):
        d = wrapped.donor[i]
        assert pairs[d] != pairs[i]
        other = dm.collator()([data[d]])
        assert torch.equal(batch["control_image"][i], other["image"][0])
        assert torch.equal(batch["control_image2"][i], other["image2"][0])
        assert not torch.equal(batch["control_image"][i], batch["image"][i])


def test_pretraining_control_pairs_each_caption_with_the_next_pairs_image(make_task, make_data) -> None:
    torch.manual_seed(0)
    task = make_task("dense").eval()
    dm = make_data()
    dm.image_size, dm.patch_size = 32, 8
    dm.setup("fit")
    pair = next(iter(dm.train_dataloader()))["pair"]
    with torch.no_grad():
        got = task._shuffled_pair_forward(pair).text_tokens
        n = pair["image"].shape[0]
        for i in range(n):
            j = (i - 1) % n  # the roll hands caption i the image of pair i - 1
            one = task.model(image=pair["image"][j : j + 1], text_ids=pair["text_ids"][i : i + 1],
                             text_padding_mask=pair["text_padding_mask"][i : i + 1],
                             image_mask=pair["image_mask"][j : j + 1])
            torch.testing.assert_close(got[i : i + 1], one.text_tokens, rtol=1e-5, atol=1e-5)
