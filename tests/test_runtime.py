"""Process-level runtime settings: the ``vlmoe`` command asks PyTorch for huge pages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# In a fresh interpreter: import the CLI module (what the `vlmoe` command does first), then allocate a
# 64 MiB tensor and report the setting and how much of the process's anonymous memory is on huge pages.
_PROBE = """
import os, vlmoe.cli, torch
t = torch.ones(16 * 2**20)
huge = sum(int(line.split()[1]) for line in open("/proc/self/smaps") if line.startswith("AnonHugePages:"))
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge)
"""


def _probe(env_value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    setting, huge_kib = out.stdout.split()
    return setting, int(huge_kib)


def _thp_mode() -> str | None:
    p = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not p.exists():
        return None
    return p.read_text().split("[")[1].split("]")[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_cli_requests_huge_pages_and_keeps_the_users_choice():
    setting, huge = _probe(None)
    assert setting == "1"
    off_setting, off_huge = _probe("0")
    assert off_setting == "0"  # the user's choice wins
    if _thp_mode() == "madvise":
        # the 64 MiB tensor lands on 2 MiB pages only when PyTorch was asked (madvise mode: nothing else
        # in the process gets huge pages)
        assert huge >= 32 * 1024, f"only {huge} KiB on huge pages"
        assert off_huge < 32 * 1024
    elif _thp_mode() == "never":
        assert huge == 0
