"""``vlmoe study``: the papers' comparison end to end - Dense vs X-MoE vs MH-MoE (and HMoE, Stratified
MoE) - from masked multimodal pretraining to every finetuning task, over several seeds.

    vlmoe study --jobs 2                                 # dense, xmoe, mhmoe x seeds 0 1 2 x every task
    vlmoe study --variants dense,xmoe,mhmoe,hmoe,stratified --seeds 0,1,2 --out runs/study
    vlmoe study --accelerator gpu --precision bf16-mixed  # the same study on a GPU
    vlmoe study --report-only                            # tables + plot from the results stored so far

For each seed, each variant is pretrained on the demo data (``vlmoe pretrain``), its routing measured on
the demo test images and captions (``vlmoe analyze routing``), and the pretraining checkpoint finetuned
and evaluated on VQAv2, NLVR2, COCO captioning, image classification, retrieval and detection
(``vlmoe finetune TASK``), each job a subprocess with the study's budget (:data:`vlmoe.study.BUDGETS`). Every
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
import sys
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from vlmoe.study import BUDGETS, DEFAULT_VARIANTS, TASKS, VARIANTS

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
    from vlmoe.study import plan, run_study, write_report

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
