"""Where a pairs stage's shards run: a thread pool in the flow's process, or Dask (a local cluster or a remote one)."""
from __future__ import annotations

import contextlib

from prefect.task_runners import ThreadPoolTaskRunner

from reflow_core import host
from flows.params import Orchestration


def pair_task_runner(orch: Orchestration, workers: int):
    """(task runner, context for the submissions) of the pair-shard fan-out: `workers` (pairs.workers) threads, or
    with engine='dask' a DaskTaskRunner (prefect-dask): a LocalCluster of `workers` processes with one thread each,
    or the cluster at `dask_address`, where each shard asks for one `GPU` resource when CUDA is available
    (start workers with `dask worker ADDRESS --nthreads 1 --resources GPU=1`, one per GPU)."""
    if orch.engine == "threads":
        return ThreadPoolTaskRunner(max_workers=workers), contextlib.nullcontext()
    try:
        import dask
        from prefect_dask import DaskTaskRunner
    except ImportError as e:
        raise ImportError("pairs.engine='dask' needs prefect-dask: pip install -e '.[dask]'") from e
    if orch.dask_address:
        import torch
        gpu = dask.annotate(resources={"GPU": 1}) if torch.cuda.is_available() else contextlib.nullcontext()
        return DaskTaskRunner(address=orch.dask_address), gpu
    threads = str(host.threads_for(workers))  # each worker process its share of the cores, not all of them
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None,
                                          "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}), \
        contextlib.nullcontext()
