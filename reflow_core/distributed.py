"""Multi-GPU training with DDP under torchrun, and the launcher the pipeline uses when a stage asks for nproc > 1.

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

from .host import steady_malloc, threads_for, worker_threads


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
