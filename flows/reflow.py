"""The ReFlow pipeline as a Prefect flow: teacher -> pairs (sharded fan-out) -> reflow fine-tune -> evaluate.

Every task is a thin call into `reflow_core.pipeline` (config and paths in, artifact URLs / plain dicts out) that
reports to the stage's MLflow child run through `flows.tracking`. Stages are idempotent in reflow_core (finished
work is detected from the artifacts and skipped, partial work resumes), so re-running the flow with the same
`root` and `run` resumes a failed pipeline: finished stages and pair shards are skipped, training continues from
its latest checkpoint, and MLflow logging continues in the same parent run.

    from flows.reflow import reflow
    reflow(preset="toy2d", root="./runs", run="demo", overrides={"teacher.train.steps": 500})
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.tracking import MlflowTracker, resolve_tracking_uri, ui_command
from reflow_core import pipeline, storage
from reflow_core.callbacks import ConsoleCallback, MultiCallback, NullCallback
from reflow_core.config import PipelineConfig, load_preset

STAGES = ("teacher", "pairs", "reflow", "evaluate")


# ---------------------------------------------------------------------------------------------------------------
# tasks: each is one reflow_core call plus its MLflow bookkeeping. Results are plain data; caching is off because
# idempotency lives in the artifacts (a Prefect cache would hide a deleted or changed artifact).


def _run_stage(tracker: MlflowTracker, stage: str, done: bool, call: Callable[[Any], Any],
               after: Callable[[Any, str], None] | None = None) -> Any:
    """Run one stage against its child run: FINISHED on success, FAILED (and re-raised) on error.

    `after(output, run_id)` logs the stage's results into the child run before it is closed. A stage already
    finished on disk is still called (reflow_core skips it and returns its output) but with a silent callback, so
    the child run's history is not touched beyond a `reflow.skipped` tag.
    """
    callback = tracker.stage_callback(stage)
    try:
        # MLflow gets every event; a terminal also gets a progress bar (tqdm stays silent when not a TTY)
        out = call(NullCallback() if done else MultiCallback(callback, ConsoleCallback(disable=None)))
        if after is not None and not done:
            after(out, callback.run_id)
    except BaseException:
        tracker.finish(stage, "FAILED")
        raise
    tracker.set_tags(callback.run_id, {"reflow.skipped": str(done).lower()})
    tracker.finish(stage, "FINISHED")
    return out


@task(name="train-teacher", cache_policy=NO_CACHE)
def train_teacher_task(cfg: PipelineConfig, paths: pipeline.RunPaths, tracker: MlflowTracker) -> str:
    ckpt = _run_stage(tracker, "teacher", paths.stage_done("teacher"),
                      lambda cb: pipeline.train_teacher(cfg, paths, callback=cb))
    tracker.set_tags(tracker.parent_run_id(), {"reflow.teacher_checkpoint": ckpt})
    return ckpt


@task(name="plan-pairs", cache_policy=NO_CACHE)
def pair_shards_task(cfg: PipelineConfig, paths: pipeline.RunPaths, teacher_ckpt: str,
                     tracker: MlflowTracker) -> list[int]:
    pending = [int(k) for k in pipeline.pair_shards(cfg, paths, teacher_ckpt)]
    tracker.set_tags(tracker.child_run_id("pairs"), {"reflow.pending_shards": len(pending),
                                                     "reflow.teacher_checkpoint": teacher_ckpt})
    return pending


@task(name="simulate-shard", task_run_name="simulate-shard-{shard}", retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE)
def simulate_shard_task(cfg: PipelineConfig, paths: pipeline.RunPaths, teacher_ckpt: str, shard: int,
                        tracker: MlflowTracker) -> dict:
    callback = tracker.stage_callback("pairs")  # shared by all shards: one child run for the stage
    result = pipeline.simulate_pair_shard(cfg, paths, teacher_ckpt, shard, callback=callback)
    if "rows" in result:  # reflow_core logs pairs_per_s and shard_seconds itself
        tracker.log_metrics(callback.run_id, {"shard_rows": result["rows"]}, step=shard)
    callback.flush()  # in a Dask worker process nobody else flushes this process's buffer
    return {"shard": shard, **result}


def pair_task_runner(cfg: PipelineConfig):
    """(task runner, context for the submissions) of the pair-shard fan-out: `pairs.workers` threads, or with
    engine='dask' a DaskTaskRunner (prefect-dask): a LocalCluster of `workers` processes with one thread each, or
    the cluster at `pairs.dask_address`, where each shard asks for one `GPU` resource when CUDA is available
    (start workers with `dask worker ADDRESS --nthreads 1 --resources GPU=1`, one per GPU)."""
    pc = cfg.pairs
    if pc.engine == "threads":
        return ThreadPoolTaskRunner(max_workers=pc.workers), contextlib.nullcontext()
    try:
        import dask
        from prefect_dask import DaskTaskRunner
    except ImportError as e:
        raise ImportError("pairs.engine='dask' needs prefect-dask: pip install -e '.[dask]'") from e
    if pc.dask_address:
        import torch
        gpu = dask.annotate(resources={"GPU": 1}) if torch.cuda.is_available() else contextlib.nullcontext()
        return DaskTaskRunner(address=pc.dask_address), gpu
    return DaskTaskRunner(cluster_kwargs={"n_workers": pc.workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None}), contextlib.nullcontext()


@task(name="finish-pairs", cache_policy=NO_CACHE)
def finish_pairs_task(cfg: PipelineConfig, paths: pipeline.RunPaths, tracker: MlflowTracker,
                      shard_results: list[dict]) -> str:
    def after(url: str, run_id: str) -> None:
        done = [r for r in shard_results if not r.get("skipped")]
        tracker.log_metrics(run_id, {"shards_simulated": len(done),
                                     "rows_simulated": sum(r.get("rows", 0) for r in done),
                                     "simulation_seconds": sum(r.get("seconds", 0.0) for r in done)})
        tracker.set_tags(run_id, {"reflow.pairs_url": url})

    # the shard hashes are checked once, before training reads the pairs (reflow_finetune)
    return _run_stage(tracker, "pairs", False, lambda cb: pipeline.finish_pairs(cfg, paths, verify=False), after)


@task(name="reflow-finetune", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def reflow_finetune_task(cfg: PipelineConfig, paths: pipeline.RunPaths, teacher_ckpt: str,
                         tracker: MlflowTracker) -> str:
    ckpt = _run_stage(tracker, "reflow", paths.stage_done("reflow"),
                      lambda cb: pipeline.reflow_finetune(cfg, paths, teacher_ckpt, callback=cb))
    tracker.set_tags(tracker.parent_run_id(), {"reflow.reflow_checkpoint": ckpt})
    return ckpt


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, paths: pipeline.RunPaths, teacher_ckpt: str, reflow_ckpt: str,
                  tracker: MlflowTracker, force: bool = False) -> list[dict]:
    # reflow_core logs each row as metrics (step = NFE) and metrics.json + plots as artifacts through the callback.
    # Finished means metrics.json was written with the current eval settings; `force` recomputes anyway.
    done = not force and paths.stage_done("evaluate")

    def call(cb):
        if done:
            return storage.read_json(paths.metrics_json)["rows"]
        return pipeline.evaluate(cfg, paths, teacher_ckpt, reflow_ckpt, callback=cb)

    return _run_stage(tracker, "evaluate", done, call)


# ---------------------------------------------------------------------------------------------------------------
# flow


def _selected(stages: list[str] | None) -> list[str]:
    if not stages:
        return list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    return [s for s in STAGES if s in stages]


@flow(name="reflow", log_prints=True, task_runner=ThreadPoolTaskRunner())
def reflow(
    preset: str = "toy2d",
    overrides: dict[str, Any] | None = None,
    root: str = "./runs",
    run: str | None = None,
    new: bool = False,
    stages: list[str] | None = None,
    teacher_checkpoint: str | None = None,
    redo_stages: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a ReFlow pipeline.

    Args:
        preset: preset name (deployments/presets/NAME.yaml) or a YAML path.
        overrides: dotted-key overrides, e.g. {"teacher.train.steps": 500, "pairs.n_pairs": 4000}.
        root: fsspec root of all runs (`./runs`, `s3://bucket/reflow`).
        run: run name under the root; re-use it to resume. None: a new name is generated.
        new: refuse to reuse an existing run directory (a fresh run).
        stages: run only these stages (the others must already be finished under this run).
        teacher_checkpoint: start from this teacher checkpoint instead of training one.
        redo_stages: delete these stages' artifacts (and those of every later stage) before running, so they are
            redone (e.g. ["pairs"] after a corrupt pair store); their MLflow child runs are reused.
    """
    logger = get_run_logger()
    selected = _selected(stages)
    needed = STAGES[: max(STAGES.index(s) for s in selected) + 1]  # stages whose outputs the selection uses
    overrides = dict(overrides or {})
    if teacher_checkpoint:
        overrides["teacher.checkpoint"] = teacher_checkpoint
    cfg = load_preset(preset, overrides)  # a ConfigError fails the flow here, before any work
    paths = pipeline.prepare_run(cfg, root, run, new=new)
    for stage in _selected(redo_stages) if redo_stages else []:
        logger.info("redo: removed %s", pipeline.reset_stage(paths, stage))

    upstream = [s for s in needed if s not in selected and not (s == "teacher" and cfg.teacher.checkpoint)]
    missing = [s for s in upstream if not paths.stage_done(s)]
    if missing:
        raise ValueError(f"stage(s) {missing} are needed by {selected} but have not finished under {paths.dir}; "
                         "add them to `stages`")

    uri = resolve_tracking_uri(cfg.tracking.mlflow_uri, root)
    params = cfg.model_dump(mode="json")
    tracker = MlflowTracker(uri, cfg.tracking.experiment, paths.dir, run_name=paths.run, params=params)
    parent = tracker.parent_run_id()
    tracker.log_params(parent, params)
    tracker.set_tags(parent, {"reflow.preset": preset, "reflow.run_dir": paths.dir,
                              "reflow.stages": ",".join(selected)})
    logger.info("run %s at %s; MLflow parent run %s in %s", paths.run, paths.dir, parent, uri)

    teacher_ckpt = pairs_url = reflow_ckpt = None
    rows: list[dict] = []
    try:
        if cfg.teacher.checkpoint:
            teacher_ckpt = cfg.teacher.checkpoint
            logger.info("teacher: using the given checkpoint %s", teacher_ckpt)
        else:  # a finished teacher is skipped inside the task
            teacher_ckpt = train_teacher_task(cfg, paths, tracker)

        if "pairs" in needed:
            if paths.stage_done("pairs"):
                pairs_url = paths.pairs_url
            else:
                pending = pair_shards_task(cfg, paths, teacher_ckpt, tracker)
                logger.info("pairs: %d pending shard(s), %d at a time", len(pending), cfg.pairs.workers)
                results: list[dict] = []
                if pending:
                    # sized by the config: at most cfg.pairs.workers shards in flight (threads or Dask workers)
                    runner, annotations = pair_task_runner(cfg)
                    with runner, annotations:
                        futures = runner.map(simulate_shard_task, {
                            "cfg": unmapped(cfg), "paths": unmapped(paths),
                            "teacher_ckpt": unmapped(teacher_ckpt), "shard": pending,
                            "tracker": unmapped(tracker)})
                        results = futures.result()  # raises the first failed shard (after its retries)
                pairs_url = finish_pairs_task(cfg, paths, tracker, results)
            logger.info("pairs: %s", pairs_url)

        if "reflow" in needed:  # a finished reflow model is skipped inside the task
            reflow_ckpt = reflow_finetune_task(cfg, paths, teacher_ckpt, tracker)

        if "evaluate" in selected:  # asked for by name: recompute even if metrics.json is current
            rows = evaluate_task(cfg, paths, teacher_ckpt, reflow_ckpt, tracker, force=stages is not None)
        elif storage.exists(paths.metrics_json):
            rows = storage.read_json(paths.metrics_json)["rows"]
    except BaseException:
        tracker.finish_open("FAILED")
        raise
    tracker.finish(None, "FINISHED")

    ui = ui_command(uri)
    print(f"run directory:  {paths.dir}")
    print(f"metrics:        {paths.metrics_json}")
    print(f"MLflow run:     {parent} (experiment {cfg.tracking.experiment!r}, store {uri})")
    print(f"MLflow UI:      {ui}")
    return {"run": paths.run, "run_dir": paths.dir, "metrics_json": paths.metrics_json, "metrics": rows,
            "teacher_checkpoint": teacher_ckpt, "reflow_checkpoint": reflow_ckpt,
            "mlflow_run_id": parent, "mlflow_tracking_uri": uri, "ui": ui}


if __name__ == "__main__":
    reflow()
