"""``vlmoe study``: the papers' comparison end to end - Dense vs X-MoE vs MH-MoE (and HMoE, Stratified
MoE) - from masked multimodal pretraining to every finetuning task, over several seeds.

    vlmoe study --jobs 2                                 # dense, xmoe, mhmoe x seeds 0 1 2 x every task
    vlmoe study --variants dense,xmoe,mhmoe,hmoe,stratified --seeds 0,1,2 --out runs/study
    vlmoe study --accelerator gpu --precision bf16-mixed  # the same study on a GPU
    vlmoe study --report-only                            # tables + plot from the results stored so far

For each seed, each variant is pretrained on the demo data (``vlmoe pretrain``), its routing measured on
the demo test images and captions (``vlmoe analyze routing``), and the pretraining checkpoint finetuned
and evaluated on VQAv2, NLVR2, COCO captioning, image classification, retrieval and detection
(``vlmoe finetune TASK``), each job a subprocess with the study's budget (:data:`BUDGETS`). Every
finished (variant, seed, task) result is stored as JSON (``<out>/results/<variant>/seed<S>/<task>.json``,
written atomically with the job's options); a rerun skips it. A killed study loses at most the job in
flight; a result file that is unreadable, incomplete or made with other options is redone.

Variants at FFN FLOP parity (:func:`vlmoe.models.flops.ffn_flops_per_token`, the rule):
the MoE variants match a top-2 X-MoE layer with experts as wide as the dense model's FFN (``tiny_moe``:
4 experts of width 128, top-2): MH-MoE by the follow-up paper's ``d_mh = d_ffn - d/k`` (96), HMoE by a
mean expert width of 128 (arithmetic sizes 96..160, top-2), Stratified MoE by expert width x expected
passes under uniform routing (strata [2, 2], top-1: 1.5 passes, width 171); the dense model's FFN is
twice as wide (256) so that it spends the same FFN FLOPs per token. All five are within 5 % of each
other (routers included). The papers' dense baselines are narrower (not FLOP-matched); so is the
``dense_narrow`` variant (width 128), which is not in the default set.

The report (``<out>/study.md``, ``summary.json``, ``study.png``) gives per task the mean +- standard
deviation over seeds of each variant, and for each MoE variant against Dense Welch's two-sided t-test:
a difference is called one only when p < 0.05; otherwise it is "not resolved at this scale".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUDGETS",
    "METRICS",
    "TASKS",
    "VARIANTS",
    "Job",
    "aggregate",
    "main",
    "run_study",
    "variant_config",
    "welch_t_test",
]

RESULT_VERSION = 1

# name -> (label, preset, model overrides)
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "dense": ("Dense (FFN 256)", "tiny", {"mlp_dim": 256}),
    "xmoe": ("X-MoE", "tiny_moe", {"moe": {"router": "xmoe"}}),
    "mhmoe": ("MH-MoE", "tiny_mhmoe", {}),
    "hmoe": ("HMoE", "tiny_moe", {"moe": {"expert_sizes": [96, 117, 139, 160], "balance_loss": "p_penalty",
                                          "balance_coef": 0.01, "entropy_coef": 0.0,
                                          "ffn_layernorm": False}}),
    "stratified": ("Stratified MoE", "tiny_moe", {"moe": {"top_k": 1, "strata": [2, 2], "ffn_dim": 171}}),
    "dense_narrow": ("Dense (FFN 128)", "tiny", {}),
}
DEFAULT_VARIANTS = ("dense", "xmoe", "mhmoe")

def _finetune_specs() -> dict[str, Any]:
    """The registered finetuning tasks that have a study budget (:mod:`vlmoe.tasks.registry`)."""
    from .registry import tasks

    return {n: s for n, s in tasks().items() if s.study_metrics and s.study_budgets}


_SPECS = _finetune_specs()
TASKS = ("pretrain", "routing", *_SPECS)

# task -> (metric keys kept from <run>/predictions/val_metrics.json, the headline metric); the finetuning
# tasks' come from their specs
METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    **{n: (s.study_metrics, s.metric) for n, s in _SPECS.items()},
    "pretrain": (("val_loss", "samples_per_s"), "val_loss"),
    "routing": (("activation_ratio", "load_entropy"), "activation_ratio"),
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


def variant_config(name: str) -> Any:
    """The backbone config of a study variant."""
    from vlmoe.models import VLMoEConfig

    if name not in VARIANTS:
        raise ValueError(f"unknown study variant {name!r}; choose from {', '.join(VARIANTS)}")
    _, preset, overrides = VARIANTS[name]
    return VLMoEConfig.from_name(preset, **overrides)


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
        out.update({k.replace("val/", "val_"): float(v) for k, v in val[-1].items()
                    if k.startswith("val/loss/") and v})
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
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Welch's two-sample t-test (unequal variances), two-sided: ``{"t", "df", "p"}``. Fewer than two
    values on a side, or no spread at all, gives ``p = nan`` (not testable)."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return {"t": float("nan"), "df": float("nan"), "p": float("nan")}
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    se2 = va / na + vb / nb
    if se2 == 0:
        return {"t": float("nan"), "df": float("nan"), "p": float("nan") if ma == mb else 0.0}
    t = (ma - mb) / math.sqrt(se2)
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    p = _betainc(df / 2, 0.5, df / (df + t * t))  # P(|T| >= |t|) for Student's t with df degrees of freedom
    return {"t": t, "df": df, "p": p}


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if not n:
        return float("nan"), float("nan")
    m = sum(xs) / n
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0


def aggregate(results: Sequence[dict[str, Any]], reference: str = "dense", alpha: float = 0.05) -> dict[str, Any]:
    """Per task, metric and variant the values over seeds, their mean and sample standard deviation, and
    for every other variant Welch's test against ``reference`` on the same metric."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in results:
        for k, v in r["metrics"].items():
            if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v)):
                table.setdefault(r["task"], {}).setdefault(k, {}).setdefault(r["variant"], []).append(float(v))
    out: dict[str, Any] = {}
    for task, metrics in table.items():
        out[task] = {}
        for metric, by_variant in metrics.items():
            rows = {}
            for variant, xs in by_variant.items():
                m, s = _mean_std(xs)
                rows[variant] = {"values": xs, "mean": m, "std": s, "n": len(xs)}
            ref = by_variant.get(reference)
            for variant, row in rows.items():
                if ref is None or variant == reference:
                    continue
                test = welch_t_test(by_variant[variant], ref)
                resolved = not math.isnan(test["p"]) and test["p"] < alpha
                row["vs_reference"] = {**test, "difference": row["mean"] - rows[reference]["mean"],
                                       "resolved": resolved}
            out[task][metric] = rows
    return out


# ---------------------------------------------------------------------------------------------- report
def flop_table(variants: Sequence[str]) -> dict[str, dict[str, float]]:
    """FFN FLOPs and activated FFN parameters per token of each variant, from its config."""
    from vlmoe.models.flops import ffn_flops_per_token

    out = {}
    for v in variants:
        cfg = variant_config(v)
        f = ffn_flops_per_token(cfg)
        out[v] = {"ffn_flops_per_token": f["mean"], "activated_ffn_params_per_token": f["mean"] / 2}
    return out


def _fmt(row: dict[str, Any], scale: float) -> str:
    return f"{row['mean'] * scale:.2f} ± {row['std'] * scale:.2f}"


# metric -> (shown name, scale)
_SHOW = {"accuracy": ("accuracy (%)", 100), "top1": ("top-1 (%)", 100), "CIDEr": ("CIDEr", 100),
         "Bleu_4": ("BLEU-4", 100), "bbox_AP": ("box AP", 100), "segm_AP": ("mask AP", 100),
         "average_score": ("mean R@1/5/10 (%)", 100), "val_loss": ("val loss", 1),
         "samples_per_s": ("samples/s", 1), "activation_ratio": ("activation ratio", 1),
         "load_entropy": ("load entropy", 1)}


def write_report(out: Path, jobs: Sequence[Job], variants: Sequence[str]) -> dict[str, Any]:
    """``summary.json``, ``study.md`` and ``study.png`` from the stored results."""
    from vlmoe.io import atomic_write_text

    stored = {str(j): r for j in jobs if (r := read_result(j)) is not None}
    results = list(stored.values())
    agg = aggregate(results, reference="dense" if "dense" in variants else variants[0])
    flops = flop_table(variants)
    seeds = sorted({r["seed"] for r in results})
    labels = {v: VARIANTS[v][0] for v in variants}
    lines = [f"Seeds: {', '.join(map(str, seeds)) or 'none yet'}; {len(results)} of {len(jobs)} jobs done. "
             "Mean ± sample standard deviation over seeds; Welch's two-sided t-test of each variant against "
             f"{labels.get('dense', variants[0])} (p < 0.05 = resolved, marked *).", "",
             "| variant | FFN FLOPs / token (per block) | activated FFN params / token |", "|---|---:|---:|"]
    for v in variants:
        lines.append(f"| {labels[v]} | {flops[v]['ffn_flops_per_token']:,.0f} | "
                     f"{flops[v]['activated_ffn_params_per_token']:,.0f} |")
    lines.append("")
    header = "| task | metric | " + " | ".join(labels[v] for v in variants) + " |"
    lines += [header, "|---|---|" + "---:|" * len(variants)]
    for task in TASKS:
        if task not in agg:
            continue
        for metric in METRICS[task][0]:
            rows = agg[task].get(metric)
            if not rows:
                continue
            name, scale = _SHOW.get(metric, (metric, 100 if task not in ("pretrain", "routing") else 1))
            cells = []
            for v in variants:
                r = rows.get(v)
                if r is None:
                    cells.append("-")
                    continue
                cell = _fmt(r, scale) + (f" (n={r['n']})" if r["n"] != len(seeds) else "")
                vs = r.get("vs_reference")
                if vs is not None:
                    cell += f" ({'*' if vs['resolved'] else ''}p={vs['p']:.2f})" if not math.isnan(vs["p"]) else ""
                cells.append(cell)
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    per_layer = _routing_per_layer(results, variants)
    if per_layer:
        layers = sorted({name for v in per_layer.values() for name in v})
        lines += ["", "Routing per MoE layer on the demo test images and captions (pairs stream; mean over seeds): "
                  "activation ratio (tau = 0.1) / load entropy; HMoE and Stratified MoE: the expert parameters a "
                  "routed token activates (measured: HMoE's router may prefer small experts; a homogeneous top-2 "
                  "expert pair holds 33,664) and Stratified MoE's mean expert passes per token.", "",
                  "| variant | " + " | ".join(n.replace("pairs/", "").replace("blocks.", "b").replace(".mlp", "")
                                           for n in layers) + " |",
                  "|---|" + "---|" * len(layers)]
        for v in variants:
            if v not in per_layer:
                continue
            cells = []
            for n in layers:
                r = per_layer[v].get(n)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{r['activation_ratio']:.2f} / {r['load_entropy']:.2f}"
                ragged = VARIANTS[v][2].get("moe", {}).keys() & {"expert_sizes", "strata"}
                if "activated_params_per_token" in r and ragged:
                    cell += f", {r['activated_params_per_token']:,.0f} params"
                if "mean_passes" in r:
                    cell += f", {r['mean_passes']:.2f} passes"
                cells.append(cell)
            lines.append(f"| {labels[v]} | " + " | ".join(cells) + " |")
    summary = {"seeds": seeds, "variants": variants, "flops": flops, "aggregate": agg, "jobs": len(jobs),
               "routing_per_layer": per_layer,
               "done": len(results), "wall_s": {k: r["wall_s"] for k, r in stored.items()}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, allow_nan=True))
    atomic_write_text(out / "study.md", "\n".join(lines) + "\n")
    if agg:
        _plot(agg, variants, labels, out / "study.png")
    return summary


def _routing_per_layer(results: Sequence[dict[str, Any]], variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per variant and pairs-stream MoE layer, the routing numbers of the routing jobs, averaged over seeds."""
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in results:
        if r["task"] != "routing" or r["variant"] not in variants:
            continue
        for name, row in r["metrics"].get("per_layer", {}).items():
            if not name.startswith("pairs/"):
                continue
            for k, v in row.items():
                acc.setdefault(r["variant"], {}).setdefault(name, {}).setdefault(k, []).append(float(v))
    return {v: {n: {k: sum(xs) / len(xs) for k, xs in row.items()} for n, row in layers.items()}
            for v, layers in acc.items()}


def _plot(agg: dict[str, Any], variants: Sequence[str], labels: dict[str, str], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmoe.io import atomic_write

    panels = [(t, METRICS[t][1]) for t in TASKS if t in agg and METRICS[t][1] in agg[t]]
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (task, metric) in zip(axes.flat, panels):
        name, scale = _SHOW.get(metric, (metric, 1))
        got = [v for v in variants if v in agg[task][metric]]
        means = [agg[task][metric][v]["mean"] * scale for v in got]
        stds = [agg[task][metric][v]["std"] * scale for v in got]
        ax.bar(range(len(got)), means, yerr=stds, capsize=3, color=[f"C{variants.index(v)}" for v in got])
        for i, v in enumerate(got):
            xs = [x * scale for x in agg[task][metric][v]["values"]]
            ax.plot([i] * len(xs), xs, "k.", ms=3)
        ax.set_xticks(range(len(got)), [labels[v] for v in got], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{task}: {name}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("vlmoe study: mean ± std over seeds (dots: seeds)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_write(path, overwrite=True) as f:
        f.write(buf.getvalue())


# ---------------------------------------------------------------------------------------------- CLI
def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmoe study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study", help="where runs, results and the report go")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--budget", default="demo", choices=sorted(BUDGETS), help="steps per job (smoke: a few)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator of every job (cpu, gpu, auto)")
    p.add_argument("--precision", default="32-true", help="Lightning precision of every job (bf16-mixed, ...)")
    p.add_argument("--jobs", type=int, default=1,
                   help="jobs at a time (CPU: each gets cores / jobs threads; the tiny demo models run faster as "
                        "two single-threaded jobs than as one on two threads)")
    p.add_argument("--max-jobs", type=int, help="stop after this many jobs (the rest run on the next call)")
    p.add_argument("--report-only", action="store_true", help="write the report from the stored results")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    variants, tasks = _csv(args.variants), _csv(args.tasks)
    try:
        seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    out = Path(args.out)
    jobs = plan(out, variants, seeds, tasks, args.budget, args.accelerator, args.precision)
    if not args.report_only:
        counts = run_study(jobs, out, args.max_jobs, workers=args.jobs)
        print(f"vlmoe study: {counts['done']} jobs done, {counts['skipped']} already stored, "
              f"{counts['failed']} failed", flush=True)
    summary = write_report(out, jobs, variants)
    print((out / "study.md").read_text())
    print(f"-> {out / 'study.md'}, {out / 'summary.json'}" + (f", {out / 'study.png'}" if summary["aggregate"] else ""))
    return summary
