"""Files of one process among those sharing a disk: slot `n` of a name is `<name>-<n>.lock`,
held (`flock`) for the life of the process that claims it. Processes on one directory take
different slots; a slot nobody holds was a process's that stopped or died (the kernel drops its
lock), and a process started again takes the first free one, so it finds what such a process
left beside the lock."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

MAX_SLOTS = 64


def claim_slot(directory: Path, name: str) -> tuple[Path, IO[bytes]]:
    """The first slot of `name` under `directory` no other process holds, as the path of its
    files without a suffix (`<directory>/<name>-<n>`), and its lock, held until closed."""
    directory.mkdir(parents=True, exist_ok=True)
    for slot in range(MAX_SLOTS):
        lock = (directory / f"{name}-{slot}.lock").open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        return directory / f"{name}-{slot}", lock
    raise RuntimeError(f"{MAX_SLOTS} processes hold a slot of {name} under {directory}")
