"""Compiled programs against the process's memory-map limit.

On the CPU every XLA kernel of a live compiled program holds about three memory maps, so a generation
program costs ~2,000 of them (one prompt bucket's prefill) and a process may hold at most `vm.max_map_count`
(65,530 by default on Linux). A long-lived process that meets many methods and prompt lengths (a server, a
notebook) compiles past that limit, and the next compile dies inside LLVM ("Cannot allocate memory").
Before it compiles something new, generation calls `make_room()`: near the limit, every compiled program is
freed (they recompile when next used), with a warning that names the cause."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional

import jax

# free at this share of the limit: the largest program (BLT-D's first admission: prefill, insert and
# advance together) needs ~15% of the default limit
FREE_AT = 0.75
# reading the map count costs ~1 ms per 1,000 maps: look at most this often (the 25% left holds several
# compiles of seconds each, more than fit between two looks)
CHECK_EVERY_S = 2.0
_last_check = -float("inf")
frees = 0  # how many times programs were freed in this process (callers that track what they compiled reset)
_gave_up = False  # freeing did not bring the maps below FREE_AT: they are not the programs'; never free again


class CompiledProgramsFreed(UserWarning):
    """The process neared vm.max_map_count; its compiled programs were freed and will recompile."""


def map_usage() -> Optional[tuple[int, int]]:
    """(memory maps in use, vm.max_map_count), or None where the system does not say (not Linux)."""
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps", "rb") as f:
            used = f.read().count(b"\n")
    except (OSError, ValueError):
        return None
    return used, limit


def make_room(free_at: float = FREE_AT) -> bool:
    """Free every compiled program if the process uses `free_at` of its memory maps or more; True if it did."""
    global frees, _gave_up, _last_check
    if _gave_up or time.monotonic() - _last_check < CHECK_EVERY_S:
        return False
    _last_check = time.monotonic()
    usage = map_usage()
    if usage is None or usage[0] < free_at * usage[1]:
        return False
    jax.clear_caches()
    frees += 1
    after = map_usage() or (0, usage[1])
    if after[0] >= free_at * after[1]:
        _gave_up = True  # freeing again would only recompile everything, again and again
        warnings.warn(f"{usage[0]} of this process's {usage[1]} memory maps (vm.max_map_count) are in use and "
                      f"freeing the compiled programs left {after[0]}: something else holds them; raise "
                      f"vm.max_map_count, or compiling may fail", CompiledProgramsFreed, stacklevel=2)
    else:
        warnings.warn(f"{usage[0]} of this process's {usage[1]} memory maps (vm.max_map_count) were in use, most "
                      f"by compiled programs: they were freed ({after[0]} left) and recompile when next needed (a "
                      f"larger vm.max_map_count avoids the recompiles)", CompiledProgramsFreed, stacklevel=2)
    return True
