"""Worker processes: their torch threads and allocator settings, multi-GPU training with DDP under torchrun, and
the launcher the pipeline uses when a stage asks for nproc > 1.

Inside a torchrun worker (WORLD_SIZE > 1 in the environment) `train.train`:
  * joins the process group (`init_from_env`: NCCL on CUDA, gloo on CPU) and trains on cuda:LOCAL_RANK;
  * draws rank r's batch for step s as `batches(s * world_size + r)` (see `batch_key`), so ranks see disjoint
    batches and the stream is a function of (step, rank) alone: a resumed run sees the same data;
  * wraps the net in DistributedDataParallel (gradients averaged, so weights stay identical across ranks);
  * writes checkpoints and reports metrics from rank 0 only, with a barrier after every checkpoint.
`batch_size` is per process: the global batch is nproc * batch_size.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist


# --- threads ---------------------------------------------------------------------------------------------------------
# The rule (docs/performance.md, "Threads"): a process sets its torch intra-op threads from the cores it was *given*,
# never from all the cores of the machine. N worker processes sharing a machine (torchrun ranks, a Dask LocalCluster's
# workers) each get cores // N; a process that runs alone keeps all of them. Otherwise every process starts a thread
# per core, N x cores threads fight for the cores, and each one runs slower than a single process would.


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


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    """True inside a torchrun worker of a multi-process job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_info() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_info().rank


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    A no-op returning DistInfo() outside torchrun. Backend: NCCL when CUDA is available, else gloo."""
    info = env_info()
    if not info.enabled:
        return info
    if not dist.is_initialized():
        steady_malloc()
        # the rank's share of the machine's cores (torchrun runs LOCAL_WORLD_SIZE ranks here); an explicit
        # OMP_NUM_THREADS (launch_torchrun sets one) was already applied by torch at start-up and is kept
        if "OMP_NUM_THREADS" not in os.environ:
            worker_threads(workers=int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, init_method="env://")
    return info


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each rank's device: cuda:LOCAL_RANK when training on CUDA, the given device otherwise."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def batch_key(step: int, info: DistInfo) -> int:
    """The argument to `batches(...)` for (step, rank): step itself in one process (unchanged behaviour), else
    step * world_size + rank, which is distinct for every (step, rank), so ranks' batches are disjoint draws."""
    return step * info.world_size + info.rank if info.enabled else step


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_finite(loss: torch.Tensor, info: DistInfo) -> bool:
    """Whether the loss is finite on *every* rank (ranks must agree to skip a step, or DDP's all-reduce hangs)."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if info.enabled and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def wrap_ddp(net: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    if not info.enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- launcher --------------------------------------------------------------------------------------------------------

class LaunchError(RuntimeError):
    """A torchrun job that exited non-zero; the message holds the tail of its output."""


def launch_torchrun(nproc: int, stage: str, config_json: str, run_dir: str, ckpt_dir: str, *,
                    timeout: float | None = None, extra_env: dict | None = None) -> str:
    """Run one training stage instance of the run's plan (teacher, reflow, reflow-2, ...) as `python -m
    torch.distributed.run --standalone --nproc_per_node N -m reflow_core.stage_main ...` and return the latest
    checkpoint URL under `ckpt_dir` (the stage's artifact).

    config_json: a path/URL of a PipelineConfig JSON file, or the JSON text itself (written to a temp file).
    run_dir: <root>/<run>; the stage finds its inputs there (the stages it reads must be finished)."""
    from . import checkpoint

    tmp = None
    if config_json.lstrip().startswith("{"):
        tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        tmp.write(config_json)
        tmp.close()
        config_json = tmp.name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "reflow_core.stage_main", "--stage", stage, "--config", config_json, "--run-dir", run_dir]
    env = os.environ.copy() | (extra_env or {})
    # each rank gets its share of this process's cores (not 1, not all of them); the caller's value wins
    env.setdefault("OMP_NUM_THREADS", str(threads_for(nproc)))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise LaunchError(f"torchrun ({nproc} processes, stage {stage}) exited with {proc.returncode}:\n{tail}")
    url = checkpoint.latest(ckpt_dir)
    if url is None:
        raise LaunchError(f"torchrun stage {stage} finished but wrote no checkpoint under {ckpt_dir}")
    return url
