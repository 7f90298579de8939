"""``vlmoe finetune TASK``: the command as users type it (demo defaults, recipes, DDP metrics, resume,
bad input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmoe.cli import main as vlmoe_main
from vlmoe.tasks.finetune.cli import TASKS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shards) -> Path:
    """A short ``vlmoe pretrain`` run (the demo's model, tiny data): its last.ckpt."""
    from tests.test_cli_pretrain import _run_args
    from vlmoe.tasks.pretrain.cli import main as pretrain

    out = tmp_path_factory.mktemp("pre")
    pretrain(["fit", *_run_args(shards, out, "--trainer.max_steps=2", "--trainer.limit_val_batches=0")])
    return out / "checkpoints" / "last.ckpt"


def _args(demo, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        f"--data.demo_dir={demo.root}",
        f"--model.init_checkpoint={ckpt}",
        "--data.num_workers=0",
        "--data.batch_size=8",
        "--data.val_batch_size=64",
        "--data.limit_train_samples=32",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        f"--run_dir={out}",
        *extra,
    ]


def test_registered_and_lists_its_tasks(capsys) -> None:
    vlmoe_main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert all(t in out for t in ("vqav2", "nlvr2", "imagenet", "captioning", "retrieval", "detection", "segmentation"))
    with pytest.raises(SystemExit) as e:
        vlmoe_main(["finetune", "vqa3"])
    known = "['captioning', 'detection', 'imagenet', 'nlvr2', 'retrieval', 'segmentation', 'vqav2']"
    assert e.value.code == 2 and f"unknown finetuning task 'vqa3'; choose from {known}" in \
        capsys.readouterr().err


@pytest.mark.parametrize("task", list(TASKS))
def test_short_run_then_validate_the_checkpoint(task, demo, pretrained, tmp_path) -> None:
    """A fit that logs the task metric and keeps the best checkpoint, then `validate --ckpt_path` on it
    gives the same metric."""
    metric = f"val/{TASKS[task].metric}"
    args = _args(demo, tmp_path, pretrained, "--trainer.max_steps=2", "--trainer.limit_val_batches=2",
                 "--trainer.val_check_interval=2")
    cli = main([task, "fit", *args])
    fitted = float(cli.trainer.callback_metrics[metric])
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("step=") for n in ckpts), ckpts
    assert (tmp_path / "predictions" / "val_metrics.json").is_file()
    again = main([task, "validate", *args, f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"])
    assert float(again.trainer.callback_metrics[metric]) == pytest.approx(fitted)


def test_finetuned_vqa_exports_with_its_answers_and_preprocessing(demo, pretrained, tmp_path) -> None:
    from vlmoe.models import VLMoEForVQA, load_pretrained

    main(["vqav2", "fit", *_args(demo, tmp_path, pretrained, "--trainer.max_steps=1", "--trainer.limit_val_batches=0")])
    vlmoe_main(["export", str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "export"), "--strict"])
    model = load_pretrained(tmp_path / "export")
    assert type(model) is VLMoEForVQA and len(model.answers) == 13 and "circle" in model.answers
    assert model.preprocess["image_size"] == 64 and model.preprocess["tokenizer"] == "clip"
    assert model.preprocess["mean"] == [0.5, 0.5, 0.5] and model.config.img_size == 64


def test_finetuned_captioner_exports_and_generates_again(demo, pretrained, tmp_path) -> None:
    import torch

    from vlmoe.data import build_tokenizer
    from vlmoe.models import VLMoEForCaptioning, load_pretrained

    main(["captioning", "fit", *_args(demo, tmp_path, pretrained, "--trainer.max_steps=1",
                                      "--trainer.limit_val_batches=0")])
    vlmoe_main(["export", str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "export"), "--strict"])
    model = load_pretrained(tmp_path / "export")
    tok = build_tokenizer(model.preprocess["tokenizer"])
    assert type(model) is VLMoEForCaptioning and (model.bos_id, model.eos_id, model.mask_id) == (
        tok.bos_id, tok.eos_id, tok.mask_id)
    size = model.preprocess["image_size"]
    out = model.eval().generate(torch.randn(2, 3, size, size), max_len=8, num_beams=2)
    assert len(out.tokens) == 2 and all(len(t) <= 7 for t in out.tokens)


def test_captioning_writes_coco_results_and_the_toolkits_metrics(demo, pretrained, tmp_path) -> None:
    args = _args(demo, tmp_path, pretrained, "--trainer.limit_val_batches=1", "--data.val_batch_size=10",
                 "--model.num_beams=1")
    main(["captioning", "validate", *args])
    results = json.loads((tmp_path / "predictions" / "val_captions.json").read_text())
    metrics = json.loads((tmp_path / "predictions" / "val_metrics.json").read_text())
    assert len(results) == 10 and set(results[0]) == {"image_id", "caption"}
    assert {"Bleu_4", "ROUGE_L", "CIDEr", "coverage"} <= set(metrics) and metrics["coverage"] == 10 / 500


def test_ddp_metric_equals_the_single_process_metric(demo, pretrained, tmp_path) -> None:
    """2 gloo ranks: the distributed sampler pads the split with duplicates; the evaluator gathers and
    deduplicates by question id, so the metric equals one process's on the same model."""
    base = _args(demo, tmp_path / "one", pretrained, "--trainer.limit_val_batches=null", "--data.val_batch_size=125")
    main(["vqav2", "validate", *base])
    want = json.loads((tmp_path / "one" / "predictions" / "val_metrics.json").read_text())
    args = _args(demo, tmp_path / "two", pretrained, "--trainer.limit_val_batches=null", "--data.val_batch_size=125",
                 "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "-m", "vlmoe.cli", "finetune", "vqav2", "validate", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "two" / "predictions" / "val_metrics.json").read_text())
    assert got["num_questions"] == 9673 and got["coverage"] == 1.0  # 9,673 = 2 x 4,837 - 1 duplicate
    assert want["num_questions"] == 9673
    for k, v in want.items():
        if k != "step":
            assert got[k] == v, k  # the same records scored: bit-identical


def test_resume_mid_epoch_matches_the_uninterrupted_run_step_for_step(demo, pretrained, tmp_path) -> None:
    """Killed (SIGKILL) mid-epoch and resumed with ``--ckpt_path last``: every later step has the loss of
    the uninterrupted run and every epoch its 4 batches (of 8 samples; a 14-step run, the checkpoint at
    step 6 is in the middle of epoch 1)."""
    from tests.tasks.helpers import read_epochs, read_losses
    from tests.test_cli_pretrain import _callbacks

    common = ["--trainer.max_steps=14", "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0",
              "--checkpoint.every_n_train_steps=3",
              "--checkpoint.monitor=null", "--data.seed=3"]
    ref = _args(demo, tmp_path / "ref", pretrained, *common)
    main(["nlvr2", "fit", *ref, _callbacks(("LossRecorder", {"path": str(tmp_path / "ref.txt")}))])
    run = _args(demo, tmp_path / "run", pretrained, *common)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kill = _callbacks(("LossRecorder", {"path": str(tmp_path / "run1.txt")}), ("KillAt", {"step": 8}))
    cmd = [sys.executable, "-m", "vlmoe.cli", "finetune", "nlvr2", "fit", *run, kill]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    main(["nlvr2", "fit", *run, "--ckpt_path=last", _callbacks(("LossRecorder", {"path": str(tmp_path / "run2.txt")}))])
    want, got = read_losses(tmp_path / "ref.txt"), read_losses(tmp_path / "run2.txt")
    assert sorted(got) == list(range(6, 14)), got
    assert all(got[s] == want[s] for s in got), (got, want)
    epochs = read_epochs(tmp_path / "ref.txt")
    assert [epochs[s] for s in range(14)] == [s // 4 for s in range(14)]
    assert read_epochs(tmp_path / "run2.txt") == {s: epochs[s] for s in range(6, 14)}


def test_a_max_steps_run_ends_scored_with_its_checkpoint_and_validate_names_its_step(demo, pretrained, tmp_path,
                                                                                     capsys) -> None:
    """``--trainer.max_steps`` ending mid-epoch (3 of 4 batches): the run still validates at its last step,
    prints and writes its metrics, keeps the best checkpoint; ``validate`` of that checkpoint reports
    step 3, not the trainer's 0."""
    args = _args(demo, tmp_path, pretrained, "--trainer.max_steps=3", "--trainer.limit_val_batches=2")
    main(["nlvr2", "fit", *args])
    assert "val (step 3, " in capsys.readouterr().out
    assert json.loads((tmp_path / "predictions" / "val_metrics.json").read_text())["step"] == 3
    best = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step=000003-accuracy=")]
    assert len(best) == 1, sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    (tmp_path / "predictions" / "val_metrics.json").unlink()
    main(["nlvr2", "validate", *args, f"--ckpt_path={tmp_path / 'checkpoints' / best[0]}"])
    assert json.loads((tmp_path / "predictions" / "val_metrics.json").read_text())["step"] == 3


def test_periodic_checkpoints_are_written_before_the_first_validation(demo, pretrained, tmp_path) -> None:
    """Killed at step 3 of a run that validates only at its epoch's end (step 4): --checkpoint
    .every_n_train_steps 2 has left last.ckpt at step 2, though no metric exists yet to rank it by."""
    import torch

    from tests.test_cli_pretrain import _callbacks

    args = _args(demo, tmp_path, pretrained, "--trainer.max_steps=8", "--checkpoint.every_n_train_steps=2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vlmoe.cli", "finetune", "nlvr2", "fit", *args, _callbacks(("KillAt", {"step": 3}))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_unreadable_training_images_are_skipped_and_counted_up_to_a_limit(demo, pretrained, tmp_path, capsys) -> None:
    """A 0-byte image and a text file named .jpg among the first training questions' images: the run
    trains, replaces those samples by readable ones and reports them; over --data.max_skipped_samples
    the run stops with one line naming the file."""
    import shutil

    from vlmoe.data.vqav2 import coco_image_path

    root = tmp_path / "coco"
    shutil.copytree(demo.coco_images / "train2014", root / "train2014")
    questions = json.loads(demo.vqa_train_questions.read_text())["questions"][:32]
    ids = sorted({q["image_id"] for q in questions})[:2]
    bad = [coco_image_path(root, "train2014", i) for i in ids]
    bad[0].write_bytes(b"")
    bad[1].write_text("not an image")
    skipped = sum(q["image_id"] in ids for q in questions)
    args = _args(demo, tmp_path / "r", pretrained, "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
                 f"--data.image_root={root}")
    main(["vqav2", "fit", *args])
    assert f"skipped samples: train: corrupt_image={skipped}" in capsys.readouterr().out
    msg = _user_error(capsys, ["finetune", "vqav2", *args, "--data.max_skipped_samples=1", "--run_dir",
                               str(tmp_path / "r2")])
    assert "more than data.max_skipped_samples=1 unreadable samples (corrupt_image=2)" in msg
    assert "cannot decode image" in msg and str(root / "train2014") in msg


def _user_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        vlmoe_main(argv)
    assert e.value.code == 2, capsys.readouterr().err
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    return err[-1]


def test_bad_input_gets_one_line_naming_the_file(demo, pretrained, tmp_path, capsys, monkeypatch) -> None:
    import shutil

    args = _args(demo, tmp_path / "r", pretrained, "--trainer.max_steps=1")
    # a question whose image is missing
    root = tmp_path / "coco"
    shutil.copytree(demo.coco_images / "val2014", root / "val2014")
    shutil.copytree(demo.coco_images / "train2014", root / "train2014")
    victim = sorted((root / "val2014").iterdir())[7]
    victim.unlink()
    msg = _user_error(capsys, ["finetune", "vqav2", "validate", *args, f"--data.image_root={root}"])
    assert f"image not found: {victim}" in msg and "v2_OpenEnded_mscoco_val2014_questions.json: question_id" in msg
    # annotations that do not match the questions
    msg = _user_error(capsys, ["finetune", "vqav2", *args, f"--data.train_annotations={demo.vqa_val_annotations}"])
    assert "no annotation for" in msg and "v2_mscoco_val2014_annotations.json" in msg
    # an NLVR2 label that is neither True nor False
    bad = tmp_path / "dev.json"
    lines = demo.nlvr2_dev.read_text().splitlines()
    row = json.loads(lines[1]) | {"label": "maybe"}
    bad.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    msg = _user_error(capsys, ["finetune", "nlvr2", *args, f"--data.val={bad}"])
    assert "dev.json: line 2: label must be 'True' or 'False', got 'maybe'" in msg
    # an image folder with no images
    empty = tmp_path / "empty" / "cls"
    empty.mkdir(parents=True)
    msg = _user_error(capsys, ["finetune", "imagenet", *args, f"--data.train={empty.parent}"])
    assert "no images" in msg and str(empty.parent) in msg
    # no demo pretraining checkpoint
    monkeypatch.chdir(tmp_path)
    msg = _user_error(capsys, ["finetune", "vqav2", *args, "--model.init_checkpoint=demo"])
    assert "no demo pretraining checkpoint" in msg and "vlmoe pretrain" in msg


def test_a_checkpoint_of_another_answer_vocabulary_is_refused(demo, pretrained, tmp_path) -> None:
    """Resuming / scoring a VQA checkpoint with another dataset's vocabulary names the head shapes."""
    args = _args(demo, tmp_path, pretrained, "--trainer.max_steps=1", "--trainer.limit_val_batches=0")
    main(["vqav2", "fit", *args])
    vocab = tmp_path / "answers.txt"
    vocab.write_text("\n".join(json.dumps({"answer": a, "label": i}) for i, a in enumerate(["yes", "no", "blue"])))
    with pytest.raises(ValueError, match=r"head\.3\.weight: \(13, 128\) in the checkpoint, \(3, 128\) here"):
        main(["vqav2", "validate", *args, f"--data.answer_vocab={vocab}",
              f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"])


def test_an_error_in_a_dataloader_worker_is_one_line_too() -> None:
    from vlmoe.cli import _message

    err = FileNotFoundError("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                            "call last):\n  File \"x.py\", line 1\nFileNotFoundError: image not found: /a/b.jpg")
    assert _message(err) == "image not found: /a/b.jpg"


def test_vocabularies_and_checkpoints_that_cannot_serve_the_task_get_one_line(demo, pretrained, tmp_path,
                                                                                capsys) -> None:
    args = _args(demo, tmp_path / "r", pretrained, "--trainer.max_steps=1", "--trainer.limit_val_batches=0")
    # an answer vocabulary of another dataset: no training question is answerable
    vocab = tmp_path / "answers.txt"
    vocab.write_text("\n".join(json.dumps({"answer": a, "label": i}) for i, a in enumerate(["dog", "cat", "car"])))
    msg = _user_error(capsys, ["finetune", "vqav2", *args, f"--data.answer_vocab={vocab}"])
    assert "none of the 38575 questions has an answer in the answer vocabulary" in msg and str(vocab) in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    msg = _user_error(capsys, ["finetune", "vqav2", *args, f"--data.answer_vocab={empty}"])
    assert msg.endswith(f"{empty}: an empty answer vocabulary")
    # fewer training samples than one batch
    msg = _user_error(capsys, ["finetune", "nlvr2", *args, "--data.limit_train_samples=3"])
    assert "the training split has 3 samples, fewer than one batch (data.batch_size=8)" in msg
    # a detection model: no text branch for VQA; and its checkpoint does not resume a VQA run
    main(["detection", "fit", *_args(demo, tmp_path / "det", pretrained, "--trainer.max_steps=1",
                                     "--trainer.limit_val_batches=0", "--data.batch_size=2")])
    det = tmp_path / "det" / "checkpoints" / "last.ckpt"
    msg = _user_error(capsys, ["finetune", "vqav2", *args, f"--model.init_checkpoint={det}"])
    assert f"model.init_checkpoint {det}: a vision-only backbone (modalities ['vision']), but VQATask reads text" in msg
    msg = _user_error(capsys, ["finetune", "vqav2", *args, f"--ckpt_path={det}"])
    assert "holds a 'tiny_mhmoe' detection model but this run builds a 'tiny_mhmoe' vqa model" in msg
