"""Pretraining input: stream mixing, the batch-dict contract, epoch length; collation; transforms."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmoe.data.collate import Collator, collate_detection
from vlmoe.data.masking import IGNORE_INDEX, BlockMaskingGenerator
from vlmoe.data.pretrain import MultiStream, PretrainData, PretrainDataConfig, split_batch
from vlmoe.data.transforms import build_transform, resolve_mean_std


@pytest.mark.parametrize(
    ("bs", "weights", "expected"),
    [
        (48, {"pair": 1, "image": 1, "text": 1}, {"pair": 16, "image": 16, "text": 16}),
        (10, {"pair": 2, "image": 1, "text": 1}, {"pair": 5, "image": 3, "text": 2}),
        (7, {"pair": 1, "image": 0, "text": 0.01}, {"pair": 6, "text": 1}),
        (3, {"pair": 100, "image": 1, "text": 1}, {"pair": 1, "image": 1, "text": 1}),
    ],
)
def test_split_batch(bs, weights, expected) -> None:
    got = split_batch(bs, weights)
    assert sum(got.values()) == bs
    if expected["pair"] == 5:  # remainder ties are broken by order: only the total is fixed
        assert got["pair"] == 5 and sorted(got.values()) == [2, 3, 5]
    else:
        assert got == expected


def test_split_batch_errors() -> None:
    with pytest.raises(ValueError, match="positive weight"):
        split_batch(4, {"pair": 0})
    with pytest.raises(ValueError, match="smaller than"):
        split_batch(2, {"pair": 1, "image": 1, "text": 1})


def test_pretrain_batches_follow_the_contract(demo, tokenizer) -> None:
    cfg = PretrainDataConfig(
        pair_shards=demo.pretrain_pairs,
        image_shards=demo.pretrain_images,
        text_shards=demo.pretrain_texts,
        batch_size=12,
        image_size=64,
        patch_size=8,
        max_len=24,
        min_mask_patches=4,
        num_workers=0,
        shuffle=50,
        samples_per_epoch=48,
    )
    data = PretrainData(cfg, tokenizer=tokenizer)
    assert data.batch_sizes == {"pair": 4, "image": 4, "text": 4}
    assert data.steps_per_epoch == 12  # 48 samples / 4 pairs per step
    batches = list(data.loader())
    assert len(batches) == 12
    b = batches[0]
    assert set(b) == {"pair", "image", "text"}
    pair, image, text = b["pair"], b["image"], b["text"]
    assert pair["image"].shape == (4, 3, 64, 64) and pair["image"].dtype == torch.float32
    assert pair["image_mask"].shape == (4, 64) and pair["image_mask"].dtype == torch.bool
    assert pair["image_mask"].sum(1).tolist() == [25] * 4  # floor(0.4 * 64), exact
    for sub in (pair, text):
        ids, pad, labels = sub["text_ids"], sub["text_padding_mask"], sub["mlm_labels"]
        assert ids.shape == pad.shape == labels.shape == (4, 24)
        assert ids.dtype == labels.dtype == torch.long and pad.dtype == torch.bool
        assert (ids[:, 0] == tokenizer.bos_id).all() and torch.equal(pad, ids == tokenizer.pad_id)
        assert ((labels != IGNORE_INDEX).sum(1) >= 1).all()
        assert not torch.isin(labels[labels != IGNORE_INDEX], torch.tensor(sorted(tokenizer.special_ids))).any()
    n_real = (~pair["text_padding_mask"]).sum(1) - 2  # caption tokens without bos/eos
    assert ((pair["mlm_labels"] != IGNORE_INDEX).sum(1) == torch.clamp((n_real * 0.5).round(), min=1)).all()
    assert "mlm_labels" not in image and "text_ids" not in image
    assert image["label"].dtype == torch.long and set(image["label"].tolist()) <= {0, 1, 2}
    assert "image" not in text and "image_mask" not in text
    assert data.error_counts()["pair"]["corrupt_image"] == 0


def test_pretrain_streams_can_be_switched_off(demo, tokenizer) -> None:
    cfg = PretrainDataConfig(
        pair_shards=demo.pretrain_pairs,
        text_shards=demo.pretrain_texts,
        weights={"pair": 3, "image": 1, "text": 1},
        batch_size=8,
        image_size=32,
        patch_size=16,
        mim_ratio=0,
        num_workers=0,
        shuffle=0,
    )
    data = PretrainData(cfg, tokenizer=tokenizer)
    assert data.batch_sizes == {"pair": 6, "text": 2}
    assert data.samples_per_epoch == 4000  # from sizes.json of the pair shards
    b = next(iter(data.loader()))
    assert set(b) == {"pair", "text"} and "image_mask" not in b["pair"]


def test_the_pair_stream_can_see_its_images_whole(demo, tokenizer) -> None:
    cfg = PretrainDataConfig(
        pair_shards=demo.pretrain_pairs,
        image_shards=demo.pretrain_images,
        batch_size=8,
        image_size=64,
        patch_size=8,
        min_mask_patches=4,
        mim_ratio_pair=0.0,
        num_workers=0,
        shuffle=0,
    )
    b = next(iter(PretrainData(cfg, tokenizer=tokenizer).loader()))
    assert "image_mask" not in b["pair"] and "mlm_labels" in b["pair"]
    assert b["image"]["image_mask"].sum(1).tolist() == [25] * 4  # the image stream keeps mim_ratio


def test_pretrain_epoch_is_equal_across_ranks(demo, tokenizer) -> None:
    cfg = PretrainDataConfig(
        pair_shards=demo.pretrain_pairs,
        weights={"pair": 1},
        batch_size=10,
        image_size=32,
        patch_size=16,
        num_workers=2,
        samples_per_epoch=95,
        mim_ratio=0,
    )
    steps = [PretrainData(cfg, tokenizer=tokenizer, rank=r, world_size=2).steps_per_epoch for r in (0, 1)]
    # ceil(95 / (10 * 2)) = 5 steps per rank, split over 2 workers -> 3 each -> 6 per rank.
    assert steps == [6, 6]
    got = list(PretrainData(cfg, tokenizer=tokenizer, rank=1, world_size=2).loader())
    assert len(got) == 6 and all(g["pair"]["image"].shape[0] == 10 for g in got)


def test_multistream_cycles_short_streams_and_reports_empty_ones() -> None:
    class Listy(torch.utils.data.IterableDataset):
        def __init__(self, items):
            self.items = items

        def __iter__(self):
            return iter(self.items)

    ms = MultiStream({"a": Listy([1, 2, 3]), "b": Listy(["x"])}, batches_per_worker=4)
    assert list(ms) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}, {"a": 3, "b": "x"}, {"a": 1, "b": "x"}]
    assert list(MultiStream({"a": Listy([1, 2, 3]), "b": Listy(["x"])})) == [{"a": 1, "b": "x"}]
    with pytest.raises(RuntimeError, match="yields no batch"):
        list(MultiStream({"a": Listy([])}, batches_per_worker=1))


def test_collator_task_batches(tokenizer) -> None:
    samples = [
        {
            "image": torch.ones(3, 8, 8) * i,
            "image2": torch.zeros(3, 8, 8),
            "text": f"statement {i}",
            "label": i % 2,
            "vqa_targets": torch.tensor([0.0, 0.3]),
            "question_id": 10 + i,
            "key": f"k{i}",
            "url": "dropped",
        }
        for i in range(3)
    ]
    batch = Collator(tokenizer, max_len=8)(samples)
    assert set(batch) == {
        "image",
        "image2",
        "text_ids",
        "text_padding_mask",
        "label",
        "vqa_targets",
        "question_id",
        "key",
    }
    assert batch["image"].shape == (3, 3, 8, 8) and batch["label"].tolist() == [0, 1, 0]
    assert batch["vqa_targets"].shape == (3, 2) and batch["question_id"].tolist() == [10, 11, 12]
    assert batch["key"] == ["k0", "k1", "k2"] and "mlm_labels" not in batch
    mim = Collator(tokenizer, max_len=8, mlm_ratio=0.5, mim=BlockMaskingGenerator(4, 6, min_num_patches=2))(samples)
    assert mim["image_mask"].shape == (3, 16) and (mim["image_mask"].sum(1) == 6).all()
    assert "mlm_labels" in mim
    with pytest.raises(ValueError, match="no tokenizer"):
        Collator()(samples)
    det = collate_detection([(torch.zeros(3, 5, 7), {"boxes": torch.zeros(0, 4)}), (torch.zeros(3, 9, 4), {})])
    assert [i.shape for i in det["image"]] == [(3, 5, 7), (3, 9, 4)] and len(det["targets"]) == 2


def test_transforms_shapes_and_determinism() -> None:
    img = Image.new("RGB", (80, 60), (200, 30, 30))
    for kind in ("pretrain", "train", "eval", "imagenet_train", "imagenet_eval"):
        out = build_transform(kind, 32)(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    ev = build_transform("eval", 32)
    assert torch.equal(ev(img), ev(img))
    # inception normalisation maps [0, 1] to [-1, 1]: red 200 -> 200/255*2-1
    assert ev(img)[0, 0, 0].item() == pytest.approx(200 / 255 * 2 - 1, abs=1e-6)
    assert resolve_mean_std("imagenet")[0] == (0.485, 0.456, 0.406)
    with pytest.raises(ValueError, match="unknown normalisation"):
        resolve_mean_std("nope")
    with pytest.raises(ValueError, match="unknown transform kind"):
        build_transform("video")


def test_uint8_transform_normalised_in_collate_equals_float_path() -> None:
    img = Image.effect_mandelbrot((70, 50), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    for mean_std in ("inception", "imagenet"):
        f = build_transform("eval", 32, mean_std=mean_std)
        u = build_transform("eval", 32, mean_std=mean_std, output="uint8")
        assert u(img).dtype == torch.uint8 and u(img).shape == (3, 32, 32)
        batch = Collator(mean_std=mean_std)([{"image": u(img)}, {"image": u(img)}])["image"]
        assert batch.dtype == torch.float32
        torch.testing.assert_close(batch, torch.stack([f(img), f(img)]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not available"):
        build_transform("imagenet_eval", 32, output="uint8")


def test_worker_batches_arrive_in_shared_memory(demo, tokenizer) -> None:
    cfg = PretrainDataConfig(
        pair_shards=demo.val_pairs,
        weights={"pair": 1},
        batch_size=4,
        image_size=32,
        patch_size=16,
        num_workers=1,
        samples_per_epoch=8,
        shuffle=0,
    )
    batch = next(iter(PretrainData(cfg, tokenizer=tokenizer).loader()))
    assert batch["pair"]["image"].dtype == torch.float32 and batch["pair"]["image"].is_shared()


def test_each_epoch_reads_the_shards_in_a_new_order(demo, tokenizer) -> None:
    cfg = PretrainDataConfig(
        text_shards=demo.pretrain_texts,
        weights={"text": 1},
        batch_size=500,
        max_len=8,
        num_workers=1,
        shuffle=1,
        mlm_ratio_text=0,
    )
    loader = PretrainData(cfg, tokenizer=tokenizer).loader()
    # shuffle=1: no sample buffer, so a batch is one whole shard; the shard order is what moves.
    epochs = [[b["text"]["key"][0] for b in loader] for _ in range(2)]
    assert len(epochs[0]) == 8 and sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


def test_collator_keeps_only_keys_every_sample_has() -> None:
    samples = [{"image": torch.zeros(3, 4, 4), "label": 1}, {"image": torch.zeros(3, 4, 4)}]
    assert set(Collator()(samples)) == {"image"}


def test_uint8_images_for_normalising_on_the_device(demo, tokenizer) -> None:
    from vlmoe.data.transforms import normalize_batch

    cfg = PretrainDataConfig(
        pair_shards=demo.val_pairs,
        weights={"pair": 1},
        batch_size=4,
        image_size=32,
        patch_size=16,
        num_workers=0,
        samples_per_epoch=4,
        shuffle=0,
        normalize_images=False,
    )
    images = next(iter(PretrainData(cfg, tokenizer=tokenizer).loader()))["pair"]["image"]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    x = normalize_batch(images, "inception")
    assert x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0


def test_validation_images_are_deterministic_whole_image_resizes(demo, tokenizer) -> None:
    """augment=False (the validation loader): the same pixels every pass; augment=True differs."""
    cfg = PretrainDataConfig(
        image_shards=demo.pretrain_images,
        weights={"image": 1.0},
        batch_size=4,
        image_size=32,
        patch_size=8,
        min_mask_patches=4,
        num_workers=0,
        shuffle=0,
        samples_per_epoch=8,
        augment=False,
        normalize_images=False,
    )
    passes = [[b["image"]["image"] for b in PretrainData(cfg, tokenizer=tokenizer).loader()] for _ in range(2)]
    for a, b in zip(*passes):
        assert torch.equal(a, b)
    train = [b["image"]["image"] for b in PretrainData(PretrainDataConfig(**{**cfg.__dict__, "augment": True}),
                                                       tokenizer=tokenizer).loader()]
    assert any(not torch.equal(a, b) for a, b in zip(passes[0], train))
