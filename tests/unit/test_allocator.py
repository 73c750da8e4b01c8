"""A worker gives freed memory back to the system (`services.common.allocator`).

Each case runs in a fresh interpreter, whose allocator has seen nothing yet: 64 blocks of 1 MiB,
each followed by a small object that stays, after one large block was freed (which makes
glibc take the later blocks from its heap). The blocks are then freed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.common import allocator

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from services.common import allocator

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

if sys.argv[1] == "tune":
    allocator.tune()
warm = bytearray(4 << 20)
del warm
big, small = [], []
for _ in range(64):
    big.append(bytearray(1 << 20))
    small.append(bytes(600) + b"x")
held = rss_mib()
big.clear()
if sys.argv[1] == "give_back":
    allocator.give_back()
print(held - rss_mib())
"""

glibc = pytest.mark.skipif(
    allocator._libc() is None, reason="glibc's mallopt / malloc_trim are not there"
)


def given_back_mib(mode: str) -> float:
    """MiB of the 64 freed that left the process's resident memory."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return float(done.stdout)


@glibc
def test_untuned_heap_keeps_what_was_freed() -> None:
    # what the two below are measured against: the freed blocks stay resident
    assert given_back_mib("none") < 16


@glibc
def test_tuned_allocator_returns_large_blocks_when_freed() -> None:
    assert given_back_mib("tune") > 56


@glibc
def test_give_back_returns_the_heap_free_pages() -> None:
    assert given_back_mib("give_back") > 56
