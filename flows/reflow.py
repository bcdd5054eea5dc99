"""The ReFlow pipeline as a Prefect flow: it walks the run's plan of stage instances (`reflow_core.stages.plan`),
one task per stage, and fans each pairs stage out as one task per shard.

    teacher -> pairs -> reflow [-> pairs-2 -> reflow-2 ...] -> evaluate

Every task is a thin call into `reflow_core.stages` (config and stage in, artifact URLs / plain dicts out) that
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
from reflow_core import stages as st
from reflow_core.callbacks import ConsoleCallback, MultiCallback, NullCallback
from reflow_core.config import PipelineConfig, deployment_preset, load_preset


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


def _ctx(cfg: PipelineConfig, paths: st.RunPaths, callback=None) -> st.Context:
    return st.Context(cfg, paths, callback or NullCallback())


@task(name="stage", task_run_name="{stage.name}", cache_policy=NO_CACHE)
def stage_task(cfg: PipelineConfig, paths: st.RunPaths, stage: st.Stage, inputs: dict[str, st.StageOutput],
               tracker: MlflowTracker) -> st.StageOutput:
    """One stage instance (teacher, reflow-r, evaluate, ...): its module's `run`, against its MLflow child run."""
    mod = st.module(stage)
    done = mod.done(stage, _ctx(cfg, paths))
    out = _run_stage(tracker, stage.name, done, lambda cb: mod.run(stage, _ctx(cfg, paths, cb), inputs))
    if "model" in out.urls:
        tracker.set_tags(tracker.parent_run_id(), {f"reflow.{stage.name}_checkpoint": out.urls["model"]})
    return out


@task(name="plan-pairs", task_run_name="plan-{stage.name}", cache_policy=NO_CACHE)
def pair_shards_task(cfg: PipelineConfig, paths: st.RunPaths, stage: st.Stage, inputs: dict[str, st.StageOutput],
                     tracker: MlflowTracker) -> list[int]:
    pending = [int(k) for k in st.pairs.pending(stage, _ctx(cfg, paths), inputs)]
    tracker.set_tags(tracker.child_run_id(stage.name), {"reflow.pending_shards": len(pending),
                                                        "reflow.model_checkpoint": inputs["model"].urls["model"]})
    return pending


@task(name="simulate-shard", task_run_name="{stage.name}-shard-{shard}", retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE)
def simulate_shard_task(cfg: PipelineConfig, paths: st.RunPaths, stage: st.Stage, inputs: dict[str, st.StageOutput],
                        shard: int, tracker: MlflowTracker) -> dict:
    callback = tracker.stage_callback(stage.name)  # shared by all shards: one child run for the stage
    result = st.pairs.simulate(stage, _ctx(cfg, paths, callback), inputs, shard)
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


@task(name="finish-pairs", task_run_name="finish-{stage.name}", cache_policy=NO_CACHE)
def finish_pairs_task(cfg: PipelineConfig, paths: st.RunPaths, stage: st.Stage, tracker: MlflowTracker,
                      shard_results: list[dict]) -> st.StageOutput:
    def after(out: st.StageOutput, run_id: str) -> None:
        done = [r for r in shard_results if not r.get("skipped")]
        tracker.log_metrics(run_id, {"shards_simulated": len(done),
                                     "rows_simulated": sum(r.get("rows", 0) for r in done),
                                     "simulation_seconds": sum(r.get("seconds", 0.0) for r in done)})
        tracker.set_tags(run_id, {"reflow.pairs_url": out.urls["pairs"]})

    # the shard hashes are checked once, before training reads the pairs (the reflow stage)
    return _run_stage(tracker, stage.name, False, lambda cb: st.pairs.finish(stage, _ctx(cfg, paths, cb)), after)


def _walk_stage(cfg: PipelineConfig, paths: st.RunPaths, stage: st.Stage, inputs: dict[str, st.StageOutput],
                tracker: MlflowTracker, logger) -> st.StageOutput:
    """One stage instance of the plan as tasks: a pairs stage with work to do as plan, one task per pending shard
    (at most pairs.workers in flight) and finish; any other stage (or finished pairs) as one stage task."""
    if stage.kind != "pairs" or st.pairs.done(stage, _ctx(cfg, paths)):
        return stage_task(cfg, paths, stage, inputs, tracker)
    pending = pair_shards_task(cfg, paths, stage, inputs, tracker)
    logger.info("%s: %d pending shard(s), %d at a time", stage.name, len(pending), cfg.pairs.workers)
    results: list[dict] = []
    if pending:
        runner, annotations = pair_task_runner(cfg)
        with runner, annotations:
            futures = runner.map(simulate_shard_task, {
                "cfg": unmapped(cfg), "paths": unmapped(paths), "stage": unmapped(stage),
                "inputs": unmapped(inputs), "shard": pending, "tracker": unmapped(tracker)})
            results = futures.result()  # raises the first failed shard (after its retries)
    return finish_pairs_task(cfg, paths, stage, tracker, results)


# ---------------------------------------------------------------------------------------------------------------
# flow


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
    """Run (or resume) a ReFlow pipeline: walk the plan of the config's stage instances (`reflow plan`).

    Args:
        preset: preset name (reflow_core/presets/NAME.yaml) or a YAML path under $REFLOW_PRESET_DIR (any path
            when called by `reflow run`; see docs/reliability.md, threat model).
        overrides: dotted-key overrides, e.g. {"teacher.train.steps": 500, "pairs.n_pairs": 4000}.
        root: fsspec root of all runs (`./runs`, `s3://bucket/reflow`).
        run: run name under the root; re-use it to resume. None: the preset's name.
        new: refuse to reuse an existing run directory (a fresh run).
        stages: run only these stage instances (e.g. ["reflow-2", "evaluate"]); the stages they read from must
            already be finished under this run. A selected evaluate is recomputed even if metrics.json is current.
        teacher_checkpoint: start from this teacher checkpoint instead of training one.
        redo_stages: delete these stages' artifacts (and those of every later stage) before running, so they are
            redone (e.g. ["pairs"] after a corrupt pair store); their MLflow child runs are reused.
    """
    logger = get_run_logger()
    # over a deployment whoever starts a run picks `preset`: a shipped name or a file under $REFLOW_PRESET_DIR only
    # (the CLI, whose caller may read any file, allows any path); a ConfigError fails the flow before any I/O
    preset_source = deployment_preset(preset)
    overrides = dict(overrides or {})
    if teacher_checkpoint:
        overrides["teacher.checkpoint"] = teacher_checkpoint
    cfg = load_preset(preset_source, overrides)  # a ConfigError fails the flow here, before any work
    names = st.stage_names(cfg)
    for s in (stages or []) + (redo_stages or []):
        if s not in names:
            raise ValueError(f"unknown stage {s!r}; this run's stages are {names}")
    paths = st.prepare_run(cfg, root, run, new=new)
    walk, chosen, removed = st.begin(cfg, paths, redo_stages or (), stages)
    if removed:
        logger.info("redo: removed %s", removed)

    uri = resolve_tracking_uri(cfg.tracking.mlflow_uri, root)
    params = cfg.model_dump(mode="json")
    tracker = MlflowTracker(uri, cfg.tracking.experiment, paths.dir, run_name=paths.run, params=params)
    parent = tracker.parent_run_id()
    tracker.log_params(parent, params)
    tracker.set_tags(parent, {"reflow.preset": preset, "reflow.run_dir": paths.dir,
                              "reflow.stages": ",".join(s.name for s in chosen)})
    logger.info("run %s at %s; MLflow parent run %s in %s", paths.run, paths.dir, parent, uri)
    logger.info("plan:\n%s", st.describe(walk, paths.dir))

    outputs: dict[str, st.StageOutput] = {}
    try:
        for s in walk:
            outputs[s.name] = _walk_stage(cfg, paths, s, st.inputs_of(s, outputs), tracker, logger)
    except BaseException:
        tracker.finish_open("FAILED")
        raise
    tracker.finish(None, "FINISHED")

    metrics_json = st.evaluate.metrics_url(st.find(walk, "evaluate")) if "evaluate" in outputs else None
    rows = outputs["evaluate"].info["rows"] if "evaluate" in outputs else []
    models = {name: o.urls["model"] for name, o in outputs.items() if "model" in o.urls}
    ui = ui_command(uri)
    print(f"run directory:  {paths.dir}")
    print(f"metrics:        {metrics_json}")
    print(f"MLflow run:     {parent} (experiment {cfg.tracking.experiment!r}, store {uri})")
    print(f"MLflow UI:      {ui}")
    return {"run": paths.run, "run_dir": paths.dir, "metrics_json": metrics_json or paths.metrics_json,
            "metrics": rows, "checkpoints": models, "teacher_checkpoint": models.get("teacher"),
            "reflow_checkpoint": models.get(f"reflow{st.suffix(cfg.reflow.rounds)}"),
            "mlflow_run_id": parent, "mlflow_tracking_uri": uri, "ui": ui}


if __name__ == "__main__":
    reflow()
