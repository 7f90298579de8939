"""``vlmoe pretrain``: the command as users type it (argument handling, a short real run, resume)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from vlmoe.cli import COMMANDS
from vlmoe.cli import main as vlmoe_main
from vlmoe.tasks.pretrain.cli import main


def _run_args(shards: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        f"--data.pair_shards={shards['train_pairs']}",
        f"--data.image_shards={shards['train_images']}",
        f"--data.text_shards={shards['train_texts']}",
        f"--data.val_pair_shards={shards['val_pairs']}",
        f"--data.val_image_shards={shards['val_images']}",
        f"--data.val_text_shards={shards['val_texts']}",
        "--model.model=tiny_mhmoe",  # the tests' size (the demo's own model is demo_xmoe, 64 px)
        "--data.mim_ratio_pair=null",  # BEiT-3's masking of the pairs' images too (the demo sees them whole)
        "--data.batch_size=6",
        "--data.max_len=16",
        "--data.num_workers=0",
        "--data.samples_per_epoch=24",
        "--data.val_samples=12",
        "--trainer.limit_val_batches=2",
        "--trainer.val_check_interval=3",
        "--trainer.log_every_n_steps=1",
        "--trainer.callbacks=[]",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--run_dir={out}",
        "--checkpoint.every_n_train_steps=3",
        "--model.stats_every=2",
        *extra,
    ]


def test_registered_in_the_vlmoe_command(capsys) -> None:
    assert COMMANDS["pretrain"][0] == "vlmoe.tasks.pretrain.cli"
    vlmoe_main(["--help"])
    assert "pretrain" in capsys.readouterr().out


def test_print_config_without_subcommand_is_fit(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "model: demo_xmoe" in out and "norm_per_patch: false" in out
    assert "pair_shards: demo" in out and "every_n_train_steps: 200" in out


def test_short_run_logs_checkpoints_and_says_where(shards, tmp_path, capsys) -> None:
    main(["fit", *_run_args(shards, tmp_path, "--trainer.max_steps=5")])
    out = capsys.readouterr().out
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step=000005.ckpt"]
    assert f"checkpoint (step 5): {tmp_path}/checkpoints/" in out
    with open(next((tmp_path / "logs").glob("version_*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    cols = set(rows[0])
    for name in ("loss", "loss/mlm_text", "loss/mim_image", "loss/mlm_pair", "loss/mim_pair", "aux/balance",
                 "perf/samples_per_s", "perf/tokens_per_s", "val/loss"):
        assert name in cols, name
    # routing statistics every 2 steps, per MoE layer and modality
    routing = [c for c in cols if c.startswith("routing/blocks.")]
    assert {c.rsplit("/", 1)[1] for c in routing} == {"activation_ratio", "load_entropy", "load_cv", "dropped"}
    assert any(r["routing/mean/activation_ratio"] for r in rows)
    assert (tmp_path / "tb").is_dir()  # TensorBoard logs next to the CSV ones
    assert list((tmp_path / "logs").glob("version_*/config.yaml"))  # the resolved config, to rerun
    # `vlmoe export` takes the training checkpoint to a model-only safetensors export
    from vlmoe.models import load_pretrained

    vlmoe_main(["export", str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "export"), "--strict"])
    model = load_pretrained(tmp_path / "export")
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert model.config.name == "tiny_mhmoe"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["state_dict"][f"model.{k}"]), k


def test_resume_from_last_continues_the_step_count(shards, tmp_path, capsys) -> None:
    main(["fit", *_run_args(shards, tmp_path, "--trainer.max_steps=3")])
    main(["fit", *_run_args(shards, tmp_path, "--trainer.max_steps=6"), "--ckpt_path=last"])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 6
    assert state["lr_schedulers"][0]["last_epoch"] == 6  # the schedule resumed, not restarted


def _callbacks(*specs: tuple[str, dict]) -> str:
    import json

    return "--trainer.callbacks=" + json.dumps(
        [{"class_path": f"tests.tasks.helpers.{name}", "init_args": args} for name, args in specs]
    )


def test_resume_after_kill_gives_the_uninterrupted_next_step_loss(shards, tmp_path) -> None:
    """A run killed (SIGKILL) after its step-4 checkpoint, resumed with ``--ckpt_path last``, takes
    step 4 with the same loss as a run that was never interrupted."""
    import os
    import subprocess
    import sys

    from tests.tasks.helpers import read_losses
    from vlmoe.data import masking

    common = [
        "--trainer.max_steps=8", "--trainer.limit_val_batches=0", "--checkpoint.every_n_train_steps=4",
        "--data.resume=skip", "--data.scale=[1.0, 1.0]",
    ]
    # uninterrupted reference
    ref = tmp_path / "ref"
    masking._rng_cache.clear()  # mask RNG as a fresh process has it
    main(["fit", *_run_args(shards, ref, *common), _callbacks(("LossRecorder", {"path": str(tmp_path / "ref.txt")}))])
    # killed at step 6, two steps after its last checkpoint
    run = tmp_path / "run"
    args = _run_args(shards, run, *common)
    args.append(_callbacks(("LossRecorder", {"path": str(tmp_path / "run1.txt")}), ("KillAt", {"step": 6})))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "vlmoe.cli", "pretrain", "fit", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(read_losses(tmp_path / "run1.txt")) == list(range(6))
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4  # the checkpoint before the kill is intact
    # resume in a fresh state
    masking._rng_cache.clear()
    main(["fit", *_run_args(shards, run, *common), "--ckpt_path=last",
          _callbacks(("LossRecorder", {"path": str(tmp_path / "run2.txt")}))])
    want, got = read_losses(tmp_path / "ref.txt"), read_losses(tmp_path / "run2.txt")
    assert sorted(got) == [4, 5, 6, 7]  # the step count continues
    assert got[4] == want[4], (got, want)
    assert got[7] == pytest.approx(want[7], rel=1e-5)


@pytest.mark.distributed
def test_two_process_ddp_on_cpu(shards, tmp_path) -> None:
    """2 ranks (gloo): disjoint shards per rank, the same number of steps, replicas equal at the end."""
    import os
    import subprocess
    import sys

    args = _run_args(shards, tmp_path, "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
                     "--trainer.accelerator=cpu", "--trainer.devices=2",
                     "--trainer.strategy=ddp_find_unused_parameters_true",
                     "--data.val_pair_shards=null", "--data.val_image_shards=null", "--data.val_text_shards=null")
    args.append(_callbacks(("RecordRank", {"path": str(tmp_path / "rank")})))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, "-m", "vlmoe.cli", "pretrain", "fit", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = []
    for r in (0, 1):
        lines = (tmp_path / f"rank.rank{r}").read_text().splitlines()
        keys = [set(line.split()[1:]) for line in lines if line.startswith("keys")]
        params = [line.split() for line in lines if line.startswith("params")]
        ranks.append((keys, float(params[0][1]), int(params[0][3])))
    (keys0, p0, s0), (keys1, p1, s1) = ranks
    assert s0 == s1 == 4 and len(keys0) == len(keys1) == 4 and all(keys0) and all(keys1)
    # each rank reads its own shard of every stream: no sample is seen by both
    assert not set().union(*keys0) & set().union(*keys1)
    assert p0 == pytest.approx(p1, rel=1e-6)  # gradients were averaged: the replicas did not drift
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 4


@pytest.mark.distributed
def test_ddp_nonfinite_loss_on_one_rank_stops_every_rank(shards, tmp_path) -> None:
    """A NaN on rank 1 alone: both ranks stop at that step with the error (no rank left waiting)."""
    import os
    import subprocess
    import sys

    args = _run_args(shards, tmp_path, "--trainer.max_steps=6", "--trainer.limit_val_batches=0",
                     "--trainer.accelerator=cpu", "--trainer.devices=2",
                     "--trainer.strategy=ddp_find_unused_parameters_true", "--checkpoint.every_n_train_steps=2",
                     "--data.val_pair_shards=null", "--data.val_image_shards=null", "--data.val_text_shards=null")
    args.append(_callbacks(("PoisonRank", {"rank": 1, "step": 3})))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, "-m", "vlmoe.cli", "pretrain", "fit", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    err = proc.stderr
    assert "non-finite loss at train step 3: loss/mim_pair=nan, loss/mim_image=nan" in err, err[-3000:]
    assert "non-finite loss at train step 3 on another rank (this is rank 0)" in err
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2  # the last good checkpoint, untouched


@pytest.mark.distributed
def test_expert_parallel_matches_ddp_and_checkpoints_every_expert(shards, tmp_path) -> None:
    """Experts sharded over 2 gloo ranks train like plain DDP; the checkpoint holds all experts and
    resumes, and it exports as a complete model."""
    import os
    import subprocess
    import sys

    from tests.tasks.helpers import read_losses

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)

    def launch(out: Path, steps: int, *extra: str) -> None:
        args = _run_args(shards, out, f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
                         "--trainer.accelerator=cpu", "--trainer.devices=2",
                         "--trainer.strategy=ddp_find_unused_parameters_true", "--checkpoint.every_n_train_steps=2",
                         "--data.val_pair_shards=null", "--data.val_image_shards=null",
                         "--data.val_text_shards=null", "--model.model=tiny_moe", "--data.scale=[1.0, 1.0]",
                         "--data.shuffle=0", *extra)
        args.append(_callbacks(("LossRecorder", {"path": str(out / "loss")})))
        proc = subprocess.run([sys.executable, "-m", "vlmoe.cli", "pretrain", "fit", *args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(tmp_path / "ddp", 4)
    launch(tmp_path / "ep", 4, "--model.expert_parallel=true")
    for r in (0, 1):
        want = read_losses(tmp_path / "ddp" / f"loss.rank{r}")
        got = read_losses(tmp_path / "ep" / f"loss.rank{r}")
        assert sorted(got) == [0, 1, 2, 3]
        for step in got:
            # the same run up to rounding (clipping each rank by its local norm drifted 5e-6 by step 2)
            assert got[step] == pytest.approx(want[step], rel=1e-6), (r, step, got, want)
    state = torch.load(tmp_path / "ep" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    w1 = state["state_dict"]["model.backbone.blocks.0.mlp.vision.experts.w1"]
    assert w1.shape[0] == 4  # all 4 experts, not rank 0's 2
    moments = [s["exp_avg"] for s in state["optimizer_states"][0]["state"].values() if s["exp_avg"].shape == w1.shape]
    assert moments and all(m.abs().sum() > 0 for m in moments)  # both ranks' expert moments, gathered
    vlmoe_main(["export", str(tmp_path / "ep" / "checkpoints" / "last.ckpt"), str(tmp_path / "export"), "--strict"])
    launch(tmp_path / "ep", 6, "--model.expert_parallel=true", "--ckpt_path=last")
    state = torch.load(tmp_path / "ep" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert sorted(read_losses(tmp_path / "ep" / "loss.rank1")) == [0, 1, 2, 3, 4, 5]
    # the resumed steps train as resumed DDP does (the gathered moments are contiguous, whatever the
    # layout of the weights they belong to: the optimizer must not pair their elements by memory position)
    launch(tmp_path / "ddp", 6, "--ckpt_path=last")
    for r in (0, 1):
        want = read_losses(tmp_path / "ddp" / f"loss.rank{r}")
        got = read_losses(tmp_path / "ep" / f"loss.rank{r}")
        for step in (4, 5):
            assert got[step] == pytest.approx(want[step], rel=1e-6), (r, step, got, want)


# ---------------------------------------------------------------------------------------------- issue: no silent
# wrong results, no lost data
def test_init_checkpoint_from_a_pretraining_run_loads_every_weight(shards, tmp_path) -> None:
    from vlmoe.tasks import PretrainTask

    main(["fit", *_run_args(shards, tmp_path / "a", "--trainer.max_steps=3", "--model.model=tiny_moe")])
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    task = PretrainTask("tiny_moe", vocab_size=state["model.backbone.text_embed.token_embed.weight"].shape[0],
                        init_checkpoint=str(ckpt))
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, state[f"model.{k}"]), k
    # through the CLI: a fresh run starts from those weights (its first loss is the checkpoint's level)
    cli = main(["fit", *_run_args(shards, tmp_path / "b", "--trainer.max_steps=1", "--model.model=tiny_moe",
                                  f"--model.init_checkpoint={ckpt}")])
    assert cli.trainer.global_step == 1


def test_ckpt_path_file_keeps_the_users_options_and_names_the_differences(shards, tmp_path, capsys) -> None:
    main(["fit", *_run_args(shards, tmp_path, "--trainer.max_steps=3", "--model.lr=0.002")])
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    cli = main(["fit", *_run_args(shards, tmp_path, "--trainer.max_steps=4", "--model.mlm_weight=0.5"),
                f"--ckpt_path={ckpt}"])
    err = capsys.readouterr().err
    assert "model.lr: 0.001 (checkpoint: 0.002)" in err and "model.mlm_weight: 0.5 (checkpoint: 1.0)" in err
    assert cli.model.mlm_weight == 0.5 and cli.model.lr == 0.001  # what --print_config shows is what runs
    assert cli.trainer.global_step == 4


def test_ckpt_path_last_without_a_checkpoint_names_the_folder(shards, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path last: no last\*\.ckpt in .*typo/checkpoints"):
        main(["fit", *_run_args(shards, tmp_path / "typo", "--trainer.max_steps=3"), "--ckpt_path=last"])


def test_resuming_another_preset_says_which_preset_the_checkpoint_holds(shards, tmp_path) -> None:
    main(["fit", *_run_args(shards, tmp_path, "--trainer.max_steps=3")])
    with pytest.raises(ValueError, match=r"holds a 'tiny_mhmoe' model but this run builds a 'tiny_moe' model"):
        main(["fit", *_run_args(shards, tmp_path, "--trainer.max_steps=6", "--model.model=tiny_moe"),
              "--ckpt_path=last"])


def test_a_kill_during_a_checkpoint_write_leaves_nothing_behind(shards, tmp_path) -> None:
    """kill -9 while the step-4 checkpoint is being written: the step-2 checkpoint stays whole, the
    partial temporary is cleaned when the run is resumed, and training continues from step 2."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    args = _run_args(shards, run, "--trainer.max_steps=6", "--trainer.limit_val_batches=0",
                     "--checkpoint.every_n_train_steps=2")
    args.append(_callbacks(("KillDuringCheckpointWrite", {"step": 4})))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "vlmoe.cli", "pretrain", "fit", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = run / "checkpoints"
    stale = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert stale and all(p.name.startswith(".") for p in stale)  # the torn write, under a hidden name
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    main(["fit", *_run_args(shards, run, "--trainer.max_steps=6", "--trainer.limit_val_batches=0",
                            "--checkpoint.every_n_train_steps=2"), "--ckpt_path=last"])
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 6


def _user_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        vlmoe_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("vlmoe pretrain: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def test_user_errors_are_one_line_naming_the_option_or_file(shards, tmp_path, capsys) -> None:
    run = ["pretrain", *_run_args(shards, tmp_path / "r", "--trainer.max_steps=1")]
    msg = _user_error(capsys, [*run, "--model.model=tiny_mhmo"])
    assert "model.model: unknown model preset 'tiny_mhmo'" in msg
    msg = _user_error(capsys, [*run, "--data.image_shards=/nowhere/images-{000000..000003}.tar"])
    assert msg.startswith("vlmoe pretrain: data.image_shards: shard pattern") and "/nowhere/" in msg
    msg = _user_error(capsys, [*run, "--data.batch_size=2"])
    assert "data.batch_size=2 is smaller than the number of streams (3: pair, image, text)" in msg
    msg = _user_error(capsys, [*run, '--data.weights={"pair": 1, "imgae": 1}'])
    assert "data.weights: unknown stream(s) ['imgae']" in msg
    msg = _user_error(capsys, [*run, '--data.weights={"pair": 1, "image": 1}'])
    assert "no weight for the text stream" in msg and "data.text_shards" in msg
    vqkd = '--model.mim_target={"class_path": "vlmoe.tasks.pretrain.VQKDTarget", "init_args": {"checkpoint": "w.pth"}}'
    msg = _user_error(capsys, [*run, vqkd])
    assert "VQKDTarget checkpoint (the VQ-KD tokenizer weights) w.pth: no such file" in msg
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    msg = _user_error(capsys, [*run, f"--run_dir={blocker}/run"])
    assert f"--run_dir {blocker}/run: cannot write there" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: [1,\n")
    assert f"--config {bad}: not valid YAML (line 3, column 1)" in _user_error(capsys, [*run, "--config", str(bad)])
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x80\x02not really a checkpoint" * 50)
    assert f"{junk}: not a checkpoint or corrupt" in _user_error(capsys, [*run, f"--model.init_checkpoint={junk}"])


def test_help_shows_the_training_options(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model.lr" in out and "--data.pair_shards" in out and "--trainer.max_steps" in out
    assert "brace pattern" in out  # the shard options have help text


def test_a_run_says_what_it_skipped_and_nothing_that_does_not_apply(shards, tmp_path) -> None:
    """A shard with an undecodable image: the run ends with a summary per reason and logs the counts;
    the output has none of Lightning's lines that do not apply to a CPU run on vlmoe's streams."""
    import os
    import subprocess
    import sys

    from vlmoe.data.shards import ShardWriter

    bad = tmp_path / "pairs"
    good = [p for p in sorted(Path(shards["train_pairs"]).parent.glob("*.tar"))]
    import tarfile

    with ShardWriter(bad / "bad-%06d.tar", maxcount=100) as sink:
        with tarfile.open(good[0]) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}
        keys = sorted({n.split(".")[0] for n in members})
        for i, k in enumerate(keys):
            jpg = members[f"{k}.jpg"] if i % 3 else b"\xff\xd8 this is no jpeg"  # every third is broken
            sink.write({"__key__": k, "jpg": jpg, "txt": members[f"{k}.txt"]})
    args = _run_args(shards, tmp_path / "run", "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
                     f"--data.pair_shards={bad}", "--trainer.enable_model_summary=true", "--data.shuffle=0")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "vlmoe.cli", "pretrain", "fit", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "skipped samples: pair: corrupt_image=" in proc.stdout, text
    for noise in ("GPU available: False", "TPU available: False", "💡 Tip", "litlogger", "has `__len__` defined",
                  "FLOPs", "LeafSpec"):
        assert noise not in text, noise
    assert "parameters:" in proc.stdout and "MoE: 4 layers" in proc.stdout  # vlmoe's model summary
    with open(next((tmp_path / "run" / "logs").glob("version_*/metrics.csv"))) as f:
        cols = set(next(csv.reader(f)))
    assert "data/skipped/pair/corrupt_image" in cols


# ---------------------------------------------------------------------------------------------- checkpoints
# written before heads left the backbone
def _as_legacy(path: Path, out: Path) -> None:
    """Rewrite a checkpoint into the layout of earlier vlmoe versions: the backbone under ``model.``,
    the heads under ``model.heads.{mlm,mim}.proj``, the heads listed in ``vlmoe_config``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    names = {"model.backbone.": "model.", "model.mlm_head.": "model.heads.mlm.proj.",
             "model.mim_head.": "model.heads.mim.proj."}
    sd = {}
    for k, v in ckpt["state_dict"].items():
        for a, b in names.items():
            if k.startswith(a):
                k = b + k[len(a):]
                break
        sd[k] = v
    ckpt["state_dict"] = sd
    task = ckpt.pop("vlmoe_task")
    ckpt.pop("vlmoe_preprocess", None)
    ckpt["vlmoe_config"] = {**ckpt["vlmoe_config"], "heads": ["mlm", "mim"], "codebook_size": task["codebook_size"]}
    ckpt["vlmoe_config"].pop("modalities")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)


def test_checkpoints_of_earlier_versions_resume_and_export(shards, tmp_path) -> None:
    main(["fit", *_run_args(shards, tmp_path, "--trainer.max_steps=3")])
    folder = tmp_path / "checkpoints"
    vlmoe_main(["export", str(folder / "step=000003.ckpt"), str(tmp_path / "e")])
    for name in ("last.ckpt", "step=000003.ckpt"):  # as an earlier version would have written them
        _as_legacy(folder / name, folder / name)
    legacy = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert "model.heads.mlm.proj.weight" in legacy["state_dict"] and "vlmoe_task" not in legacy
    # the legacy file exports (heads included) to the same model
    from vlmoe.models import VLMoEForPretraining, load_pretrained

    vlmoe_main(["export", str(folder / "step=000003.ckpt"), str(tmp_path / "e_old"), "--strict"])
    a, b = load_pretrained(tmp_path / "e"), load_pretrained(tmp_path / "e_old")
    assert type(b) is VLMoEForPretraining
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # and resumes: weights, optimizer state and schedule restored, the step count continues
    cli = main(["fit", *_run_args(shards, tmp_path, "--trainer.max_steps=5"), "--ckpt_path=last"])
    assert cli.trainer.global_step == 5
    state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 5 and state["lr_schedulers"][0]["last_epoch"] == 5
    assert "model.mlm_head.weight" in state["state_dict"] and state["vlmoe_task"]["type"] == "pretraining"


def test_a_legacy_pooler_is_restored_so_the_optimizer_state_fits(make_task) -> None:
    """Earlier tiny presets carried a pooler in the pretraining model: resuming such a checkpoint adds
    it back before the optimizer is built, so the optimizer state matches parameter for parameter."""
    task = make_task("dense")
    sd = {f"model.{k.removeprefix('backbone.')}": v for k, v in task.model.state_dict().items()}
    pooler = {"norm.weight": torch.ones(64), "norm.bias": torch.zeros(64),
              "dense.weight": torch.randn(64, 64), "dense.bias": torch.zeros(64)}
    sd.update({f"model.heads.pooler.{k}": v for k, v in pooler.items()})
    ckpt = {"state_dict": sd, "vlmoe_config": task.config.to_dict()}
    task.on_load_checkpoint(ckpt)
    assert task.model.pooler is not None
    task.load_state_dict(ckpt["state_dict"])  # strict, as Lightning loads it
    assert torch.equal(task.model.pooler.dense.weight, pooler["dense.weight"])
