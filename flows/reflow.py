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

from typing import Any, Callable

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.tracking import MlflowTracker, resolve_tracking_uri, ui_command
from reflow_core import pipeline, storage
from reflow_core.callbacks import NullCallback
from reflow_core.config import PipelineConfig, load_preset

STAGES = ("teacher", "pairs", "reflow", "evaluate")


# ---------------------------------------------------------------------------------------------------------------
# tasks: each is one reflow_core call plus its MLflow bookkeeping. Results are plain data; caching is off because
# idempotency lives in the artifacts (a Prefect cache would hide a deleted or changed artifact).


def _run_stage(tracker: MlflowTracker, stage: str, done: bool, call: Callable[[Any], Any]) -> Any:
    """Run one stage against its child run: FINISHED on success, FAILED (and re-raised) on error.

    A stage already finished on disk is still called (reflow_core skips it and returns its output) but with a
    silent callback, so the child run's history is not touched beyond a `reflow.skipped` tag.
    """
    if done:
        out = call(NullCallback())
        run_id = tracker.child_run_id(stage)
        tracker.set_tags(run_id, {"reflow.skipped": "true"})
        tracker.finish(stage, "FINISHED")
        return out
    callback = tracker.stage_callback(stage)
    try:
        out = call(callback)
    except BaseException:
        tracker.finish(stage, "FAILED")
        raise
    tracker.set_tags(callback.run_id, {"reflow.skipped": "false"})
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
    pending = list(pipeline.pair_shards(cfg, paths, teacher_ckpt))
    run_id = tracker.child_run_id("pairs")
    tracker.set_tags(run_id, {"reflow.pending_shards": len(pending), "reflow.teacher_checkpoint": teacher_ckpt})
    return pending


@task(name="simulate-shard", task_run_name="simulate-shard-{shard}", retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE)
def simulate_shard_task(cfg: PipelineConfig, paths: pipeline.RunPaths, teacher_ckpt: str, shard: int,
                        tracker: MlflowTracker) -> dict:
    callback = tracker.stage_callback("pairs")
    result = pipeline.simulate_pair_shard(cfg, paths, teacher_ckpt, shard, callback=callback)
    if not result.get("skipped"):
        tracker.log_metrics(callback.run_id, {f"shard_{k}": v for k, v in result.items() if k != "shard"},
                            step=shard)
    return {"shard": shard, **result}


@task(name="finish-pairs", cache_policy=NO_CACHE)
def finish_pairs_task(cfg: PipelineConfig, paths: pipeline.RunPaths, tracker: MlflowTracker,
                      shard_results: list[dict]) -> str:
    done = [r for r in shard_results if not r.get("skipped")]
    url = _run_stage(tracker, "pairs", False, lambda cb: pipeline.finish_pairs(cfg, paths))
    if done:
        run_id = tracker.child_run_id("pairs")
        rows = sum(r.get("rows", 0) for r in done)
        seconds = sum(r.get("seconds", 0.0) for r in done)
        tracker.log_metrics(run_id, {"rows_simulated": rows, "shard_seconds_total": seconds,
                                     "shards_simulated": len(done)})
        tracker.finish("pairs", "FINISHED")
    return url


@task(name="reflow-finetune", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def reflow_finetune_task(cfg: PipelineConfig, paths: pipeline.RunPaths, teacher_ckpt: str,
                         tracker: MlflowTracker) -> str:
    ckpt = _run_stage(tracker, "reflow", paths.stage_done("reflow"),
                      lambda cb: pipeline.reflow_finetune(cfg, paths, teacher_ckpt, callback=cb))
    tracker.set_tags(tracker.parent_run_id(), {"reflow.reflow_checkpoint": ckpt})
    return ckpt


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, paths: pipeline.RunPaths, teacher_ckpt: str, reflow_ckpt: str,
                  tracker: MlflowTracker) -> list[dict]:
    # evaluate always recomputes (it is cheap and its settings are not part of the run's identity)
    rows = _run_stage(tracker, "evaluate", False,
                      lambda cb: pipeline.evaluate(cfg, paths, teacher_ckpt, reflow_ckpt, callback=cb))
    run_id = tracker.child_run_id("evaluate")
    for row in rows:
        # one curve per (model, solver, metric) with NFE as the step: MLflow plots quality against NFE
        prefix = f"{row.get('model')}.{row.get('solver')}"
        tracker.log_metrics(run_id, {f"{prefix}.{k}": v for k, v in row.items()
                                     if k not in ("model", "solver", "nfe")}, step=int(row.get("nfe", 0)))
    if storage.exists(paths.metrics_json):
        tracker.log_artifact(run_id, paths.metrics_json)
    tracker.finish("evaluate", "FINISHED")
    return rows


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
    """
    logger = get_run_logger()
    selected = _selected(stages)
    overrides = dict(overrides or {})
    if teacher_checkpoint:
        overrides["teacher.checkpoint"] = teacher_checkpoint
    cfg = load_preset(preset, overrides)  # a ConfigError fails the flow here, before any work
    paths = pipeline.prepare_run(cfg, root, run, new=new)

    for stage in STAGES:
        if stage not in selected and stage != "evaluate" and not (stage == "teacher" and cfg.teacher.checkpoint):
            if not paths.stage_done(stage):
                raise ValueError(f"stage {stage!r} is not selected and has not finished under {paths.dir}; "
                                 f"include it in `stages`")

    uri = resolve_tracking_uri(cfg.tracking.mlflow_uri, root)
    tracker = MlflowTracker(uri, cfg.tracking.experiment, paths.dir, run_name=paths.run)
    parent = tracker.parent_run_id()
    tracker.log_params(parent, cfg.model_dump(mode="json"))
    tracker.set_tags(parent, {"reflow.preset": preset, "reflow.run_dir": paths.dir,
                              "reflow.stages": ",".join(selected)})
    logger.info("run %s: %s (MLflow parent run %s at %s)", paths.run, paths.dir, parent, uri)

    try:
        # teacher
        if cfg.teacher.checkpoint:
            teacher_ckpt = cfg.teacher.checkpoint
            logger.info("using the given teacher checkpoint %s", teacher_ckpt)
        else:
            teacher_ckpt = train_teacher_task(cfg, paths, tracker)

        # pairs: one task per pending shard, at most cfg.pairs.workers at a time
        if "pairs" in selected and not paths.stage_done("pairs"):
            pending = pair_shards_task(cfg, paths, teacher_ckpt, tracker)
            logger.info("pairs: %d pending shard(s), %d worker(s)", len(pending), cfg.pairs.workers)
            results: list[dict] = []
            if pending:
                with ThreadPoolTaskRunner(max_workers=cfg.pairs.workers) as runner:
                    futures = runner.map(simulate_shard_task, {
                        "cfg": unmapped(cfg), "paths": unmapped(paths), "teacher_ckpt": unmapped(teacher_ckpt),
                        "shard": pending, "tracker": unmapped(tracker)})
                    results = futures.result()  # raises the first shard failure (after its retries)
            pairs_url = finish_pairs_task(cfg, paths, tracker, results)
        else:
            pairs_url = paths.pairs_url
        logger.info("pairs: %s", pairs_url)

        # reflow fine-tune (a finished stage is skipped inside the task)
        reflow_ckpt = reflow_finetune_task(cfg, paths, teacher_ckpt, tracker)

        # evaluate
        if "evaluate" in selected:
            rows = evaluate_task(cfg, paths, teacher_ckpt, reflow_ckpt, tracker)
        else:
            rows = storage.read_json(paths.metrics_json) if storage.exists(paths.metrics_json) else []
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
