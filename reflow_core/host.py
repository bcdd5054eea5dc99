"""The host process's resources for torch work: how many cores it was given, its intra-op threads, and the
allocator. Used by both runners (the CLI, the flow), Dask shard tasks, torchrun ranks and the pair sampler's
readers.
"""
from __future__ import annotations

import os

import torch


# --- threads ---------------------------------------------------------------------------------------------------------
# The rule (docs/performance.md, "Threads"): a process sets its torch intra-op threads from the cores it was *given*,
# never from all the cores of the machine. N worker processes sharing a machine (torchrun ranks, a Dask LocalCluster's
# workers) each get cores // N; a process that runs alone keeps all of them. Otherwise every process starts a thread
# per core, N x cores threads fight for the cores, and each one runs slower than a single process would.
# Independent runs that meet on one host (not started together by one launcher) share its cores through the
# registry of `cores.py`, which leaves a count set here (OMP_NUM_THREADS exported) as it is.


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity mask, e.g. a container's or taskset's), else cpu_count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_for(workers: int = 1, cores: int | None = None) -> int:
    """Intra-op threads for one of `workers` processes sharing `cores` (default: this process's cores): at least 1."""
    return max(1, (cores if cores is not None else available_cores()) // max(1, int(workers)))


def worker_threads(cores: int | None = None, *, workers: int = 1) -> int:
    """Set this process's torch intra-op threads from the cores it was given and return the count.

    cores: the cores given to this process (None: its share of `available_cores()` among `workers` processes started
    together on the machine). Also sets OMP_NUM_THREADS/MKL_NUM_THREADS for processes it starts. Call it first thing
    in a worker process (a Dask worker's task, a torchrun rank); calling it again with the same count is free."""
    n = max(1, int(cores)) if cores is not None else threads_for(workers)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    return n


# --- the allocator -----------------------------------------------------------------------------------------------------
# glibc's malloc serves a block above its mmap threshold (128 KB at start, raised on the fly up to 32 MB) with a fresh
# mmap, and hands freed heap tops above its trim threshold back to the OS. A loop that allocates and frees the same
# MB-sized activations every step can then pay page faults (the kernel zeroing fresh pages) on every one of them, in
# phases that depend on what else the process happens to hold. On the 2-core box that made toy2d pair shards take
# 2.3-2.7 s instead of 1.7-2.0 s, and a batch-5000 MLP forward 13-16 ms instead of 8 (docs/performance.md).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit: blocks up to this come from the heap
TRIM_THRESHOLD = 512 << 20  # up to this much freed heap is kept for reuse rather than returned to the OS


def steady_malloc() -> bool:
    """Fix glibc malloc's mmap and trim thresholds for a tensor workload (MMAP_THRESHOLD, TRIM_THRESHOLD), so
    activations freed and allocated again every step reuse heap memory. True if set. Not applied (False) off glibc,
    under an LD_PRELOADed allocator (jemalloc, tcmalloc), or when MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
    are in the environment (the user's own choice). The cost: up to TRIM_THRESHOLD of freed memory stays with the
    process. Call it early in a process that runs torch work (the CLI, the flow, a Dask or torchrun worker);
    repeated calls are free."""
    import ctypes

    try:
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        glibc = False
    if not glibc or os.environ.get("LD_PRELOAD") \
            or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
