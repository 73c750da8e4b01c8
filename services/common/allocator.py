"""The C allocator of a worker process (glibc's malloc): memory freed is given back to the system.

Most of a busy worker's resident memory is not its live Python objects but what glibc keeps after
they are freed. Every object over 512 bytes (a state's encoded bytes, an event's JSON) and every
buffer (a fetch response of several MiB) comes from malloc. Left to itself, glibc raises its
mmap threshold to the largest block freed so far (up to 32 MiB), so after the first large fetch
such buffers come from the heap too, and the heap's free pages go back to the system only at
its top, which the smaller blocks allocated after them hold in place. A burst of input then
leaves the process at its peak for good.

- `tune()` fixes the mmap threshold, so a buffer of `MMAP_THRESHOLD` bytes or more is mapped on
  its own and unmapped when freed, and allows `ARENAS` arenas at most;
- `give_back()` (`malloc_trim(0)`) returns every free page of the heap, wherever it lies.

`start()` does both for a process of `motcua run` (every service, sandbox and dev tool): it tunes
the allocator first thing, then gives back every `GIVE_BACK_SECONDS` from a thread of its own, so
a process restoring its state or serving HTTP only is covered as well as a consumer (the C call
runs without the GIL).

Elsewhere than glibc (no `mallopt` / `malloc_trim` in the C library) both do nothing.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from functools import cache

# mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 128 * 1024  # glibc's default, kept instead of raised
ARENAS = 2
GIVE_BACK_SECONDS = 10.0  # how often a worker calls `give_back`


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def tune() -> bool:
    """Fix the mmap threshold and the number of arenas; False where that is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(_M_ARENA_MAX, ARENAS)
    return True


def give_back() -> None:
    """Return the heap's free pages to the system."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def start() -> bool:
    """Tune the allocator and give back every `GIVE_BACK_SECONDS` for the life of the process;
    False (and nothing done) where that is not glibc."""
    if not tune():
        return False

    def giving_back() -> None:
        while True:  # a daemon thread: it ends with the process
            time.sleep(GIVE_BACK_SECONDS)
            give_back()

    threading.Thread(target=giving_back, name="allocator-give-back", daemon=True).start()
    return True
