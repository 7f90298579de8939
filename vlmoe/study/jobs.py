"""The study's jobs: one (variant, seed, task) each, a ``vlmoe`` subprocess with the study's budget, its
result stored atomically as JSON and skipped on a rerun (see :mod:`vlmoe.study`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .variants import VARIANTS, variant_config

__all__ = ["BUDGETS", "METRICS", "REPORTED", "TASKS", "Job", "collect", "plan", "read_result", "run_job", "run_study"]

RESULT_VERSION = 1


def _finetune_specs() -> dict[str, Any]:
    """The registered finetuning tasks that have a study budget (:mod:`vlmoe.tasks.registry`)."""
    from vlmoe.tasks.registry import tasks

    return {n: s for n, s in tasks().items() if s.study_metrics and s.study_budgets}


_SPECS = _finetune_specs()
# the pretraining loss terms reported besides the total (masked language / image modeling per stream)
PRETRAIN_TERMS = ("mlm_text", "mlm_pair", "mim_image", "mim_pair")
TASKS = ("pretrain", "routing", *_SPECS)

# task -> (metric keys kept from <run>/predictions/val_metrics.json, the headline metric); the finetuning
# tasks' come from their specs
METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    **{n: (s.study_metrics, s.metric) for n, s in _SPECS.items()},
    "pretrain": (("val_loss", "samples_per_s"), "val_loss"),
    "routing": (("activation_ratio", "load_entropy"), "activation_ratio"),
}

# what the report shows per task: the metrics above, and the pretraining's loss terms where a run logs them
REPORTED: dict[str, tuple[str, ...]] = {
    **{t: keys for t, (keys, _) in METRICS.items()},
    "pretrain": ("val_loss", *(f"val_{t}" for t in PRETRAIN_TERMS), "samples_per_s"),
}

_QUIET = ["--trainer.enable_progress_bar=false", "--data.num_workers=1"]
# The study's budget per task: the demo recipes, shortened so that 3 variants x 3 seeds fit in about
# two hours of a 2-core CPU (the finetuning tasks' from their specs). ``smoke``: a few steps each (tests).
_OWN_BUDGETS: dict[str, dict[str, list[str]]] = {
    "demo": {
        "pretrain": ["--trainer.max_steps=300", "--trainer.val_check_interval=300", "--trainer.limit_val_batches=8",
                     "--checkpoint.every_n_train_steps=300"],
        "routing": ["--batches=2"],
    },
    "smoke": {
        "pretrain": ["--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
                     "--checkpoint.every_n_train_steps=3"],
        "routing": ["--batches=1", "--batch-size=8", "--samples=1"],
    },
}
BUDGETS: dict[str, dict[str, list[str]]] = {
    b: {**own, **{n: s.study_budgets[b] for n, s in _SPECS.items() if b in s.study_budgets}}
    for b, own in _OWN_BUDGETS.items()
}


@dataclass
class Job:
    """One (variant, seed, task) of the study: the command it runs and where its result goes."""

    variant: str
    seed: int
    task: str
    argv: list[str]
    run_dir: Path
    result: Path
    needs: list[Path] = field(default_factory=list)

    @property
    def key(self) -> str:
        """A digest of what defines the job's result (its options); a stored result with another key is redone."""
        text = json.dumps({"v": RESULT_VERSION, "argv": self.argv}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return f"{self.variant} seed {self.seed} {self.task}"


def plan(out: Path, variants: Sequence[str], seeds: Sequence[int], tasks: Sequence[str], budget: str,
         accelerator: str = "cpu", precision: str = "32-true") -> list[Job]:
    """Every job of the study in run order: seeds outermost (one whole seed first), then variants, then
    pretraining, routing and the finetuning tasks."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown study task(s) {unknown}; choose from {', '.join(TASKS)}")
    for v in variants:
        variant_config(v)
    trainer = [f"--trainer.accelerator={accelerator}", f"--trainer.precision={precision}"]
    jobs: list[Job] = []
    for seed in seeds:
        for v in variants:
            _, preset, overrides = VARIANTS[v]
            base = out / "runs" / v / f"seed{seed}"
            ckpt = base / "pretrain" / "checkpoints" / "last.ckpt"
            res = out / "results" / v / f"seed{seed}"
            for task in TASKS:  # in TASKS order; pretraining first
                if task not in tasks and not (task == "pretrain" and set(tasks) - {"pretrain"}):
                    continue
                b = BUDGETS[budget].get(task, [])
                run = base / task
                if task == "pretrain":
                    argv = ["pretrain", f"--model.model={preset}", f"--model.model_overrides={json.dumps(overrides)}",
                            f"--run_dir={run}", f"--seed_everything={seed}", *trainer, *_QUIET, *b]
                    needs = []
                elif task == "routing":
                    argv = ["analyze", "routing", "--model", str(ckpt), "--name", v, "--out", str(run),
                            "--overwrite", "--group-by", "none", *b]
                    needs = [ckpt]
                else:
                    argv = ["finetune", task, f"--model.init_checkpoint={ckpt}", f"--run_dir={run}",
                            f"--seed_everything={seed}", f"--data.seed={seed}", *trainer, *_QUIET, *b]
                    needs = [ckpt]
                jobs.append(Job(v, seed, task, argv, run, res / f"{task}.json", needs))
    return jobs


# ---------------------------------------------------------------------------------------------- results
def read_result(job: Job) -> dict[str, Any] | None:
    """The stored result of a job, or None when it must be (re)done: missing, unreadable, incomplete,
    or made with other options (the reason is printed)."""
    p = job.result
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"vlmoe study: {p} is unreadable ({type(e).__name__}); redoing {job}", flush=True)
        return None
    keys, _ = METRICS[job.task]
    ok = (isinstance(data, dict) and data.get("version") == RESULT_VERSION and isinstance(data.get("metrics"), dict)
          and all(isinstance(data["metrics"].get(k), int | float) for k in keys))
    if not ok:
        print(f"vlmoe study: {p} is incomplete; redoing {job}", flush=True)
        return None
    if data.get("key") != job.key:
        print(f"vlmoe study: {p} was made with other options; redoing {job}", flush=True)
        return None
    return data


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def collect(job: Job) -> dict[str, Any]:
    """The metrics a finished job left in its run folder."""
    if job.task == "pretrain":
        logs = sorted(job.run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
        if not logs:
            raise FileNotFoundError(f"{job.run_dir}/logs: no metrics.csv from the pretraining run")
        rows = _csv_rows(logs[-1])
        val = [r for r in rows if r.get("val/loss")]
        if not val:
            raise ValueError(f"{logs[-1]}: no val/loss row (the pretraining run did not validate)")
        out: dict[str, Any] = {"val_loss": float(val[-1]["val/loss"])}
        out.update({f"val_{term}": float(val[-1][f"val/{term}"]) for term in PRETRAIN_TERMS
                    if val[-1].get(f"val/{term}")})
        speed = [float(r["perf/samples_per_s"]) for r in rows if r.get("perf/samples_per_s")]
        out["samples_per_s"] = sum(speed[1:]) / len(speed[1:]) if len(speed) > 1 else (speed[0] if speed else 0.0)
        return out
    if job.task == "routing":
        rep = json.loads((job.run_dir / "report.json").read_text())[job.variant]
        out = {"activation_ratio": 0.0, "load_entropy": 0.0, "per_layer": {}}
        if rep["summary"]:
            s = rep["summary"].get("pairs") or next(iter(rep["summary"].values()))
            out.update(activation_ratio=s["activation_ratio"], load_entropy=s["load_entropy"])
            for stream, layers in rep["streams"].items():
                for name, layer in layers.items():
                    row = {k: layer[k] for k in ("activation_ratio", "load_entropy") if k in layer}
                    for k in ("activated_params_per_token", "mean_passes", "distinct_experts_per_token"):
                        if k in layer:
                            row[k] = layer[k]
                    out["per_layer"][f"{stream}/{name}"] = row
        else:
            out.update(activation_ratio=float("nan"), load_entropy=float("nan"))
        return out
    path = job.run_dir / "predictions" / "val_metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the finetuning run wrote no validation metrics")
    m = json.loads(path.read_text())
    keys, _ = METRICS[job.task]
    missing = [k for k in keys if k not in m]
    if missing:
        raise KeyError(f"{path}: no {missing}")
    return {k: float(m[k]) for k in keys}


def _store(job: Job, metrics: dict[str, Any], wall_s: float) -> None:
    from vlmoe.io import atomic_write_text

    job.result.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": RESULT_VERSION, "key": job.key, "variant": job.variant, "seed": job.seed, "task": job.task,
            "metrics": metrics, "wall_s": round(wall_s, 1), "command": ["vlmoe", *job.argv]}
    atomic_write_text(job.result, json.dumps(data, indent=1, allow_nan=True))


def run_job(job: Job, log: Path, threads: int | None = None) -> None:
    """Run one job as a subprocess (``python -m vlmoe.cli ...``), its output written to ``log``
    (``threads``: its intra-op threads, ``OMP_NUM_THREADS``)."""
    if job.run_dir.exists():  # a job killed in flight left a partial run folder: start it afresh
        shutil.rmtree(job.run_dir)
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as f:
        f.write(f"=== {job}: vlmoe {' '.join(job.argv)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "vlmoe.cli", *job.argv], stdout=f, stderr=subprocess.STDOUT,
                              env=env)
    if proc.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{job} failed (exit {proc.returncode}); the end of {log}:\n" + "\n".join(tail))


def run_study(jobs: Sequence[Job], out: Path, max_jobs: int | None = None, workers: int = 1,
              runner: Callable[..., None] = run_job) -> dict[str, int]:
    """Run every job without a valid stored result, ``workers`` at a time: per seed first its
    pretraining jobs, then the jobs that start from their checkpoints (a job whose checkpoint is missing
    because its pretraining failed is skipped and counted). ``max_jobs``: stop after that many."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    counts = {"ran": 0, "done": 0, "skipped": 0, "failed": 0}
    todo = []
    for job in jobs:
        if read_result(job) is not None:
            counts["skipped"] += 1
        else:
            todo.append(job)
    todo = todo[:max_jobs] if max_jobs is not None else todo
    lock = threading.Lock()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // workers) if workers > 1 else None

    def one(job: Job) -> None:
        missing = [p for p in job.needs if not p.exists()]
        if missing:
            with lock:
                print(f"vlmoe study: skipping {job}: {missing[0]} does not exist", flush=True)
                counts["failed"] += 1
            return
        with lock:
            print(f"vlmoe study: {job} ...", flush=True)
        t0 = time.perf_counter()
        try:
            runner(job, out / "logs" / f"{job.variant}_seed{job.seed}_{job.task}.log", threads)
            metrics = collect(job)
        except (RuntimeError, FileNotFoundError, KeyError, ValueError) as e:
            with lock:
                print(f"vlmoe study: {e}", flush=True)
                counts["failed"] += 1
                counts["ran"] += 1
            return
        wall = time.perf_counter() - t0
        _store(job, metrics, wall)
        _, head = METRICS[job.task]
        with lock:
            counts["ran"] += 1
            counts["done"] += 1
            print(f"vlmoe study: {job}: {head} = {metrics[head]:.4g} ({wall:.0f} s)", flush=True)

    waves: list[list[Job]] = []
    for seed in dict.fromkeys(j.seed for j in todo):
        for first in (True, False):
            wave = [j for j in todo if j.seed == seed and (j.task == "pretrain") == first]
            if wave:
                waves.append(wave)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for wave in waves:
            list(pool.map(one, wave))
    return counts


# ---------------------------------------------------------------------------------------------- statistics
