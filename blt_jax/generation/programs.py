"""Compiled programs against the process's memory-map limit.

On the CPU every XLA kernel of a live compiled program holds about three memory maps, so a generation
program costs ~2,000 of them (one prompt bucket's prefill) and a process may hold at most `vm.max_map_count`
(65,530 by default on Linux). A long-lived process that meets many methods and prompt lengths (a server, a
notebook) compiles past that limit, and the next compile dies inside LLVM ("Cannot allocate memory").
Before it compiles something new, generation calls `make_room()`: near the limit, every compiled program is
freed (they recompile when next used), with a warning that names the cause.

Also here: the CPU's matmul kernels, chosen by the rows a generation program's passes carry (`jit_by_rows`)."""

from __future__ import annotations

import functools
import inspect
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

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


# ---- the CPU's matmul kernels, by the rows of a pass ------------------------------------------------------

# XLA:CPU runs dots through YNNPACK by default. At one or two rows (batch-1 `ar` decoding: matrix-vector
# products) that is as fast as Eigen's kernels or faster; from four rows on, Eigen's are faster (a batch-8 `ar`
# step 1.3x, batch 32 1.25x; at batch 1, passes over a block or a draft: BLT-D-8 1.13x, BLT-DV 1.15x, BLT-S
# k=8 1.18x per byte, on the 2-vCPU VM: `advance_per_step` of experiments/step_scaling.py, run with and without
# XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=). So a generation program whose passes carry at least
# EIGEN_DOTS_FROM_ROWS rows (batch x positions per pass) is compiled with YNNPACK's fusions off.
EIGEN_DOTS_FROM_ROWS = 4
MANY_ROWS_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


class JitByRows:
    """`jax.jit(fn, **jit_kwargs)`, compiled with MANY_ROWS_CPU_OPTIONS on the CPU when `rows(arguments)` (the
    call's arguments by name) is EIGEN_DOTS_FROM_ROWS or more. Rows come from static shapes and static
    arguments, so each compiled shape still has one set of kernels."""

    def __init__(self, fn: Callable, rows: Callable[[dict], int], **jit_kwargs):
        self._few = jax.jit(fn, **jit_kwargs)
        self._many = jax.jit(fn, compiler_options=MANY_ROWS_CPU_OPTIONS, **jit_kwargs)
        self._rows = rows
        self._signature = inspect.signature(fn)
        functools.update_wrapper(self, fn)

    def _for(self, args: tuple, kwargs: dict):
        if jax.default_backend() != "cpu":
            return self._few
        many = self._rows(self._signature.bind(*args, **kwargs).arguments) >= EIGEN_DOTS_FROM_ROWS
        return self._many if many else self._few

    def __call__(self, *args, **kwargs) -> Any:
        return self._for(args, kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._for(args, kwargs).lower(*args, **kwargs)

    def _cache_size(self) -> int:
        return self._few._cache_size() + self._many._cache_size()


def jit_by_rows(rows: Callable[[dict], int], **jit_kwargs) -> Callable[[Callable], JitByRows]:
    """Decorator form of `JitByRows`."""
    return lambda fn: JitByRows(fn, rows, **jit_kwargs)
