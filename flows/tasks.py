"""The flow's tasks: each is one reflow_core stage call plus its MLflow bookkeeping, and `stage_tasks` turns one
stage instance of the walk into them (a sharded stage as plan, one task per pending shard, finish).

Results are plain data; caching is off because idempotency lives in the artifacts (a Prefect cache would hide a
deleted or changed artifact).
"""
from __future__ import annotations

from typing import Any, Callable

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.params import Orchestration
from flows.progress import PrefectProgress
from flows.retry import retry_transient
from flows.runners import pair_task_runner
from flows.tracking_queue import Tracker
from reflow_core import host, stages
from reflow_core.callbacks import ConsoleCallback, MultiCallback, NullCallback
from reflow_core.config import PipelineConfig


def run_stage(tracker: Tracker, stage: str, done: bool, call: Callable[[Any], Any],
              after: Callable[[Any, str], None] | None = None, progress: bool = True) -> Any:
    """Run one stage against its child run: FINISHED on success, FAILED (and re-raised) on error.

    `after(output, run_id)` logs the stage's results into the child run before it is closed. A stage already
    finished on disk is still called (reflow_core skips it and returns its output) but with a silent callback, so
    the child run's history is not touched beyond a `reflow.skipped` tag. `progress`: keep the stage's progress
    artifact (off for a pairs stage's finish, whose artifact counts the shards).
    """
    callback = tracker.stage_callback(stage)
    try:
        # MLflow gets every event; the flow run a progress artifact and log lines; a terminal also gets a progress bar
        # (tqdm stays silent when not a TTY)
        shown = [PrefectProgress(stage)] if progress else []
        out = call(NullCallback() if done else MultiCallback(callback, *shown, ConsoleCallback(disable=None)))
        if after is not None and not done:
            after(out, callback.run_id)
    except BaseException:
        tracker.finish(stage, "FAILED")
        raise
    tracker.set_tags(callback.run_id, {"reflow.skipped": str(done).lower()})
    tracker.finish(stage, "FINISHED")
    return out


def _ctx(cfg: PipelineConfig, rundir: stages.RunDir, callback=None) -> stages.Context:
    return stages.Context(cfg, rundir, callback or NullCallback())


@task(name="stage", task_run_name="{stage.name}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_transient)
def stage_task(cfg: PipelineConfig, rundir: stages.RunDir, stage: stages.Stage, inputs: dict[str, stages.StageOutput],
               tracker: Tracker, done: bool) -> stages.StageOutput:
    """One stage instance (teacher, reflow-r, evaluate, ...): its kind's `run`, against its MLflow child run. done:
    what the walk found when it reached the stage."""
    kind = stages.module(stage)
    out = run_stage(tracker, stage.name, done, lambda cb: kind.run(stage, _ctx(cfg, rundir, cb), inputs))
    if "model" in out.urls:
        tracker.set_tags(tracker.parent_run_id(), {f"reflow.{stage.name}_checkpoint": out.urls["model"]})
    return out


@task(name="plan-pairs", task_run_name="plan-{stage.name}", cache_policy=NO_CACHE)
def pair_shards_task(cfg: PipelineConfig, rundir: stages.RunDir, stage: stages.Stage,
                     inputs: dict[str, stages.StageOutput], tracker: Tracker) -> list[int]:
    pending = [int(k) for k in stages.sharded(stage).pending(stage, _ctx(cfg, rundir), inputs)]
    tracker.set_tags(tracker.child_run_id(stage.name), {"reflow.pending_shards": len(pending),
                                                        "reflow.model_checkpoint": inputs["model"].urls["model"]})
    return pending


@task(name="simulate-shard", task_run_name="{stage.name}-shard-{shard}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def simulate_shard_task(cfg: PipelineConfig, orch: Orchestration, rundir: stages.RunDir, stage: stages.Stage,
                        inputs: dict[str, stages.StageOutput], shard: int, tracker: Tracker) -> dict:
    if orch.engine == "dask":  # a Dask worker process: its torch threads from its share of the cores
        host.worker_threads(workers=1 if orch.dask_address else cfg.pairs.workers)
        host.steady_malloc()
    callback = tracker.stage_callback(stage.name)  # shared by all shards: one child run for the stage
    result = stages.sharded(stage).simulate(stage, _ctx(cfg, rundir, callback), inputs, shard)
    if "rows" in result:  # reflow_core logs pairs_per_s and shard_seconds itself
        tracker.log_metrics(callback.run_id, {"shard_rows": result["rows"]}, step=shard)
    callback.flush()  # in a Dask worker process nobody else flushes this process's buffer
    return {"shard": shard, **result}


@task(name="finish-pairs", task_run_name="finish-{stage.name}", cache_policy=NO_CACHE)
def finish_pairs_task(cfg: PipelineConfig, rundir: stages.RunDir, stage: stages.Stage, tracker: Tracker,
                      shard_results: list[dict]) -> stages.StageOutput:
    def after(out: stages.StageOutput, run_id: str) -> None:
        done = [r for r in shard_results if not r.get("skipped")]
        tracker.log_metrics(run_id, {"shards_simulated": len(done),
                                     "rows_simulated": sum(r.get("rows", 0) for r in done),
                                     "simulation_seconds": sum(r.get("seconds", 0.0) for r in done)})
        tracker.set_tags(run_id, {"reflow.pairs_url": out.urls["pairs"]})

    # the shard hashes are checked once, before training reads the pairs (the reflow stage)
    kind = stages.sharded(stage)
    return run_stage(tracker, stage.name, False, lambda cb: kind.finish(stage, _ctx(cfg, rundir, cb)), after,
                     progress=False)


def stage_tasks(cfg: PipelineConfig, orch: Orchestration, rundir: stages.RunDir, step: stages.Step,
                tracker: Tracker, logger) -> stages.StageOutput:
    """One stage instance of the walk as tasks: a sharded stage (pairs) with work to do as plan, one task per
    pending shard (at most pairs.workers in flight) and finish; any other stage (or a finished sharded one) as one
    stage task."""
    stage, inputs = step.stage, step.inputs
    if step.done or stages.sharded(stage) is None:
        return stage_task(cfg, rundir, stage, inputs, tracker, step.done)
    pending = pair_shards_task(cfg, rundir, stage, inputs, tracker)
    logger.info("%s: %d pending shard(s), %d at a time", stage.name, len(pending), cfg.pairs.workers)
    results: list[dict] = []
    progress = PrefectProgress(stage.name, unit="shards")  # the stage's shards done, on the flow run's page
    if pending:
        progress.on_progress(stage.name, 0, len(pending))
    if pending and orch.engine == "threads" and cfg.pairs.workers == 1:
        # one at a time, in this thread, a task run each: a pool thread would run torch with an OpenMP team of its
        # own next to this thread's, and libgomp cuts spin-waits short once a process's OpenMP threads outnumber
        # its cores (about a third slower shards on the 2-core box; docs/performance.md, "Threads")
        for i, k in enumerate(pending):
            results.append(simulate_shard_task(cfg, orch, rundir, stage, inputs, k, tracker))
            progress.on_progress(stage.name, i + 1, len(pending))
    elif pending:
        runner, annotations = pair_task_runner(orch, cfg.pairs.workers)
        with runner, annotations:
            futures = runner.map(simulate_shard_task, {
                "cfg": unmapped(cfg), "orch": unmapped(orch), "rundir": unmapped(rundir), "stage": unmapped(stage),
                "inputs": unmapped(inputs), "shard": pending, "tracker": unmapped(tracker)})
            for i, _ in enumerate(as_completed(futures)):
                progress.on_progress(stage.name, i + 1, len(pending))
            results = futures.result()  # raises the first failed shard (after its retries)
    return finish_pairs_task(cfg, rundir, stage, tracker, results)
