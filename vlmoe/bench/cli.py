"""``vlmoe bench <what> ...``: dispatch to the benchmark modules."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "moe": "vlmoe.bench.moe",
    "data": "vlmoe.bench.data",
    "model": "vlmoe.bench.model",
    "finetune": "vlmoe.bench.finetune",
    "decode": "vlmoe.bench.decode",
    "detection": "vlmoe.bench.detection",
    "predict": "vlmoe.bench.predict",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vlmoe bench {" + ",".join(BENCHMARKS) + "} [options]   (vlmoe bench moe --help)")
        return
    what = argv[0]
    if what not in BENCHMARKS:
        raise SystemExit(f"vlmoe bench: unknown benchmark {what!r}; choose from {sorted(BENCHMARKS)}")
    importlib.import_module(BENCHMARKS[what]).main(argv[1:])
