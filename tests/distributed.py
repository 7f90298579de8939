"""Test bodies on a gloo process group in spawned workers, torn down so that no gloo thread outlives it.

A gloo worker thread that is still alive when the interpreter finalizes can destroy a finished work
item holding Python tensors; it then takes the GIL during finalization and the process aborts
("terminate called without an active exception") after every assertion has passed. The threads are
joined by ``destroy_process_group`` only when nothing references the group any more, so the body runs
in its own frame (its modules, which hold the group, are freed when it returns) and the teardown
checks that the threads are gone.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

import torch.distributed as dist


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux; empty where /proc is missing)."""
    task = "/proc/self/task"
    if not os.path.isdir(task):
        return []
    names = []
    for tid in os.listdir(task):
        try:
            with open(os.path.join(task, tid, "comm")) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while listing
            continue
    return sorted(n for n in names if "gloo" in n)


def run_on_gloo(rank: int, body: Callable[..., None], world: int, init_file: str, *args) -> None:
    """``mp.spawn`` target: ``body(rank, world, *args)`` on a gloo group of ``world`` ranks."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        gc.collect()
        dist.destroy_process_group()
    gc.collect()
    left = gloo_threads()
    assert not left, f"rank {rank}: gloo threads {left} outlive destroy_process_group (the group is still referenced)"
