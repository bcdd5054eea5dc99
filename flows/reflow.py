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

The parameters are typed (preset from the shipped list, overrides typed and bounded per config field, run and stage
names by pattern), so a deployment's form shows them and a Prefect server refuses a bad value when the run is
created, before any worker picks it up. A flow run holds its run directory's lease (`reflow_core.lease`) while it
walks: a second flow run on the same `<root>/<run>` is refused with the holder named. It ends with the results in
MLflow (headline metrics on the parent run, one evaluation run per model, the models logged and registered) and on
the flow run's page (Prefect artifacts: metric table, summary with the sample grids and plots, MLflow link).
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal
from uuid import UUID

from prefect import flow, get_run_logger, runtime, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows import FLOW_NAME, report, serving
from flows.tracking import MlflowTracker, TrackingFileError, local_path, resolve_tracking_uri, source_tags, ui_command
from reflow_core import host, lease, storage
from reflow_core import stages as st
from reflow_core.callbacks import ConsoleCallback, MultiCallback, NullCallback
from reflow_core.checkpoint import CheckpointError
from reflow_core.config import (ConfigError, ConfigOverrides, PipelineConfig, deployment_preset, load_preset,
                                override_dict, preset_names)
from reflow_core.pairs import PairStoreCorrupt, PairStoreMismatch


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


# Errors a retry cannot fix: a bad config or changed identity (ConfigError), a corrupt store, checkpoint or tracking
# file, a run directory held by another runner, and programming errors. Anything else (a dropped S3 connection, a
# pre-empted GPU, an OOM kill of a subprocess) is retried; the retry resumes from the artifacts.
DETERMINISTIC = (ConfigError, PairStoreMismatch, PairStoreCorrupt, CheckpointError, TrackingFileError, lease.RunInUse,
                 ValueError, TypeError, KeyError, AttributeError, AssertionError, NotImplementedError)


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry unless the failure is deterministic (`DETERMINISTIC`)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result could not be read back: judge the error that says so
        exc = e
    return not isinstance(exc, DETERMINISTIC)


@task(name="stage", task_run_name="{stage.name}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_transient)
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
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def simulate_shard_task(cfg: PipelineConfig, paths: st.RunPaths, stage: st.Stage, inputs: dict[str, st.StageOutput],
                        shard: int, tracker: MlflowTracker) -> dict:
    if cfg.pairs.engine == "dask":  # a Dask worker process: its torch threads from its share of the cores
        host.worker_threads(workers=1 if cfg.pairs.dask_address else cfg.pairs.workers)
        host.steady_malloc()
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
    threads = str(host.threads_for(pc.workers))  # each worker process its share of the cores, not all of them
    return DaskTaskRunner(cluster_kwargs={"n_workers": pc.workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None,
                                          "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}), \
        contextlib.nullcontext()


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
                tracker: MlflowTracker, logger, done: bool) -> st.StageOutput:
    """One stage instance of the plan as tasks: a pairs stage with work to do as plan, one task per pending shard
    (at most pairs.workers in flight) and finish; any other stage (or finished pairs) as one stage task. done: the
    stage's artifacts said it was finished when the walk reached it."""
    if stage.kind != "pairs" or done:
        return stage_task(cfg, paths, stage, inputs, tracker)
    pending = pair_shards_task(cfg, paths, stage, inputs, tracker)
    logger.info("%s: %d pending shard(s), %d at a time", stage.name, len(pending), cfg.pairs.workers)
    results: list[dict] = []
    if pending and cfg.pairs.engine == "threads" and cfg.pairs.workers == 1:
        # one at a time, in this thread, a task run each: a pool thread would run torch with an OpenMP team of its
        # own next to this thread's, and libgomp cuts spin-waits short once a process's OpenMP threads outnumber
        # its cores (about a third slower shards on the 2-core box; docs/performance.md, "Threads")
        results = [simulate_shard_task(cfg, paths, stage, inputs, k, tracker) for k in pending]
    elif pending:
        runner, annotations = pair_task_runner(cfg)
        with runner, annotations:
            futures = runner.map(simulate_shard_task, {
                "cfg": unmapped(cfg), "paths": unmapped(paths), "stage": unmapped(stage),
                "inputs": unmapped(inputs), "shard": pending, "tracker": unmapped(tracker)})
            results = futures.result()  # raises the first failed shard (after its retries)
    return finish_pairs_task(cfg, paths, stage, tracker, results)


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(cfg: PipelineConfig, paths: st.RunPaths, preset: str, walk: list[st.Stage],
                 outputs: dict[str, st.StageOutput], wall: dict[str, float], tracker: MlflowTracker,
                 evaluated: bool) -> dict[str, Any]:
    """The results where users look: MLflow (headline metrics on the parent, one evaluation run per model, the final
    models logged as pyfunc samplers into theirs and registered as `<preset>-<model>`, flows/serving.py) and the flow run's Prefect
    artifacts. Idempotent: a model already logged from the same checkpoint is not logged again."""
    ev = outputs["evaluate"]
    stored = storage.read_json(ev.urls["metrics"])
    rows, metric = ev.info["rows"], stored["metric"]
    parent = tracker.parent_run_id()
    if evaluated or not _has_headline(tracker, parent, metric):
        eval_runs = tracker.log_results(rows, metric, wall)
    else:  # a no-op resume: logged by the flow run that evaluated
        eval_runs = tracker.eval_run_ids(list(dict.fromkeys(r["model"] for r in rows)))
    registered: dict[str, str] = {}
    for model in sorted(registered_models(walk) & set(eval_runs)):
        ckpt, name, head = stored["checkpoints"][model], model_registry_name(preset, model), \
            serving.headline(rows, metric, model)
        version = serving.log_sampler(tracker, eval_runs[model], ckpt, paths.config_json, name, head,
                                      serving.version_description(preset, model, paths.run, head))
        if version:
            registered[name] = version
    if registered:
        tracker.set_tags(parent, {"reflow.registered_models": ", ".join(f"{k}/{v}" for k, v in registered.items())})
    images = sorted(_pngs(st.find(walk, "evaluate").writes))
    results = report.RunResults(preset, paths.run, paths.dir, rows, metric, images, tracker.tracking_uri,
                                tracker.experiment, tracker.experiment_id, parent, registered)
    try:
        artifacts = report.publish(results, ui_command(tracker.tracking_uri))
    except Exception as e:  # an artifact is a view of results already stored: never fail a finished pipeline on it
        get_run_logger().warning("could not create the Prefect artifacts: %s", e)
        artifacts = {}
    return {"registered": registered, "eval_runs": eval_runs, "artifacts": {k: str(v) for k, v in artifacts.items()},
            "metric": metric}


def _has_headline(tracker: MlflowTracker, run_id: str, metric: str) -> bool:
    return any(k.startswith(f"{metric}.") for k in tracker.client.get_run(run_id).data.metrics)


def _pngs(url: str) -> list[str]:
    fs, path = storage.fs_and_path(url)
    return [storage.join(url, p.rsplit("/", 1)[-1]) for p in fs.glob(path.rstrip("/") + "/*.png")]


def registered_models(walk: list[st.Stage]) -> set[str]:
    """The models a run registers: its last reflow round and its one-step student, the ones a user deploys."""
    reflows = [s.model for s in walk if s.kind == "reflow"]
    return set(reflows[-1:]) | {s.model for s in walk if s.kind == "distill"}


def model_registry_name(preset: str, model: str) -> str:
    """`<preset>-<model>` (toy2d-reflow, digits_distill-distilled); a preset given as a file path by its stem."""
    return f"{Path(preset).stem}-{model}"


# ---------------------------------------------------------------------------------------------------------------
# flow

ROOT_VARIABLE = "reflow_root"  # `prefect variable set reflow_root s3://bucket/reflow`: the team's root, set once
ROOT_ENV = "REFLOW_ROOT"  # or per worker (a process pool's job_variables.env, a Kubernetes job template)

PresetName = Literal[tuple(preset_names())]  # the shipped presets: the deployment form shows a drop-down
PresetFile = Annotated[str, Field(pattern=r"^[^\x00]+\.ya?ml$", description="a .yaml file under $REFLOW_PRESET_DIR")]
RunName = Annotated[str, Field(pattern=f"^(?:{st.RUN_NAME.pattern})$", description="one path component under the root")]
StageName = Annotated[str, Field(pattern=r"^[a-z]+(-[a-z]+)?(-[0-9]+)?$", description="a stage of `reflow plan`")]


def resolve_root(root: str | None) -> tuple[str, str]:
    """(root, where it came from): the `root` parameter, else the Prefect variable `reflow_root`, else $REFLOW_ROOT;
    never a worker's working directory by default. A local root is made absolute (logged, so a resume can name
    it)."""
    source = "the root parameter"
    if not root:
        from prefect.variables import Variable

        root, source = Variable.get(ROOT_VARIABLE, default=None), f"the Prefect variable {ROOT_VARIABLE}"
        if not root:
            root, source = os.environ.get(ROOT_ENV), f"${ROOT_ENV}"
    if not root or not isinstance(root, str):
        raise ConfigError(f"no run root: pass root=..., or set the team's root once with `prefect variable set "
                          f"{ROOT_VARIABLE} s3://bucket/reflow` (or ${ROOT_ENV} on every worker); a worker's "
                          "working directory is never used by default, so a run resumed on another worker finds "
                          "its artifacts")
    if storage.is_local(root):
        root = str(local_path(root))
    return root, source


def _flow_run_name() -> str:
    """`{preset}-{run}` (the run defaults to the config's name, which is the preset's)."""
    p = runtime.flow_run.parameters
    preset = Path(str(p.get("preset") or "toy2d")).stem
    ov = override_dict(p.get("overrides"))
    return f"{preset}-{p.get('run') or ov.get('name') or preset}"


def _holder_ended(holder: dict) -> bool:
    """A run directory's lease is stale when the flow run holding it has ended (cancelled, crashed, failed) on this
    Prefect API; a holder this API does not know (another server, a CLI run) is judged by its heartbeat alone."""
    fr_id = holder.get("flow_run_id")
    if not fr_id:
        return False
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(UUID(fr_id))
    except Exception:
        return False
    return fr.state is not None and fr.state.is_final()


@flow(name=FLOW_NAME, flow_run_name=_flow_run_name, log_prints=True, task_runner=ThreadPoolTaskRunner())
def reflow(
    preset: PresetName | PresetFile = "toy2d",
    overrides: ConfigOverrides | None = None,
    root: str | None = None,
    run: RunName | None = None,
    new: bool = False,
    stages: list[StageName] | None = None,
    teacher_checkpoint: str | None = None,
    redo_stages: list[StageName] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a ReFlow pipeline: walk the plan of the config's stage instances (`reflow plan`).

    Args:
        preset: a shipped preset (`reflow presets`), or a YAML path under $REFLOW_PRESET_DIR (any path when called
            by `reflow run`; see docs/reliability.md, threat model).
        overrides: config fields to change, by dotted key, e.g. {"teacher.train.steps": 500, "pairs.n_pairs": 4000};
            each is typed and bounded like the field it sets.
        root: fsspec root of all runs (`/data/runs`, `s3://bucket/reflow`). Empty: the Prefect variable
            `reflow_root`, else $REFLOW_ROOT (docs/cloud.md).
        run: run name under the root; re-use it to resume. Empty: the config's name (the preset's).
        new: refuse to reuse an existing run directory (a fresh run).
        stages: run only these stage instances (e.g. ["reflow-2", "evaluate"]); the stages they read from must
            already be finished under this run. A selected evaluate is recomputed even if metrics.json is current.
        teacher_checkpoint: start from this teacher checkpoint instead of training one.
        redo_stages: delete these stages' artifacts (and those of every later stage) before running, so they are
            redone (e.g. ["pairs"] after a corrupt pair store); their MLflow child runs are reused.
    """
    logger = get_run_logger()
    host.steady_malloc()  # malloc thresholds for tensor work in this process (reflow_core.host)
    # over a deployment whoever starts a run picks `preset`: a shipped name or a file under $REFLOW_PRESET_DIR only
    # (the CLI, whose caller may read any file, allows any path); a ConfigError fails the flow before any I/O
    preset_source = deployment_preset(preset)
    ov = override_dict(overrides)
    if teacher_checkpoint:
        ov["teacher.checkpoint"] = teacher_checkpoint
    cfg = load_preset(preset_source, ov)  # cross-field checks: a ConfigError fails the flow here, before any work
    names = st.stage_names(cfg)
    for s in (stages or []) + (redo_stages or []):
        if s not in names:
            raise ConfigError(f"unknown stage {s!r}; this run's stages are {names}")
    root, root_source = resolve_root(root)
    flow_run_id = str(runtime.flow_run.id or "")
    owner = flow_run_id or lease.local_owner()
    requested = st.RunPaths.of(root, run or cfg.name)
    with lease.hold(requested.dir, owner, is_stale=_holder_ended,
                    info={"flow_run_id": flow_run_id, "flow_run_name": runtime.flow_run.name or ""}):
        return _run(cfg, preset, root, root_source, run, new, stages, redo_stages, logger)


def _run(cfg: PipelineConfig, preset: str, root: str, root_source: str, run: str | None, new: bool,
         stages: list[str] | None, redo_stages: list[str] | None, logger) -> dict[str, Any]:
    paths = st.prepare_run(cfg, root, run, new=new)
    walk, chosen, removed = st.begin(cfg, paths, redo_stages or (), stages)
    if removed:
        logger.info("redo: removed %s", removed)

    uri = resolve_tracking_uri(cfg.tracking.mlflow_uri, root)
    params = cfg.model_dump(mode="json")
    tracker = MlflowTracker(uri, cfg.tracking.experiment, paths.dir, run_name=paths.run, params=params)
    parent = tracker.parent_run_id()
    tracker.log_params(parent, params)
    tags = {"reflow.preset": preset, "reflow.run_dir": paths.dir, "reflow.stages": ",".join(s.name for s in chosen),
            **source_tags()}
    if runtime.flow_run.id:
        tags.update({"reflow.prefect_flow_run_id": runtime.flow_run.id,
                     "reflow.prefect_flow_run": runtime.flow_run.name,
                     "reflow.prefect_flow_run_url": runtime.flow_run.ui_url or ""})
    tracker.set_tags(parent, tags)
    logger.info("run %s at %s (root from %s); MLflow parent run %s in %s", paths.run, paths.dir, root_source, parent,
                uri)
    logger.info("plan:\n%s", st.describe(walk, paths.dir))

    outputs: dict[str, st.StageOutput] = {}
    wall: dict[str, float] = {}
    try:
        for s in walk:
            t0, was_done = time.perf_counter(), st.module(s).done(s, _ctx(cfg, paths))
            outputs[s.name] = _walk_stage(cfg, paths, s, st.inputs_of(s, outputs), tracker, logger, was_done)
            if not was_done:
                wall[s.name] = time.perf_counter() - t0
        published = (publish_task(cfg, paths, preset, walk, outputs, wall, tracker, "evaluate" in wall)
                     if "evaluate" in outputs else {"registered": {}, "metric": None})
    except BaseException:
        tracker.finish_open("FAILED")
        raise
    tracker.finish(None, "FINISHED")

    metrics_json = st.evaluate.metrics_url(st.find(walk, "evaluate")) if "evaluate" in outputs else None
    rows = outputs["evaluate"].info["rows"] if "evaluate" in outputs else []
    models = {name: o.urls["model"] for name, o in outputs.items() if "model" in o.urls}
    ui = ui_command(uri)
    if rows:
        print(report.summary_table(rows, published["metric"]))
    print(f"run directory:  {paths.dir}")
    print(f"metrics:        {metrics_json}")
    print(f"MLflow run:     {parent} (experiment {cfg.tracking.experiment!r}, store {uri})")
    for name, version in published["registered"].items():
        print(f"model:          models:/{name}/{version}")
    print(f"MLflow UI:      {ui}")
    return {"run": paths.run, "run_dir": paths.dir, "metrics_json": metrics_json or paths.metrics_json,
            "metrics": rows, "metric": published["metric"], "checkpoints": models,
            "teacher_checkpoint": models.get("teacher"),
            "reflow_checkpoint": models.get(f"reflow{st.suffix(cfg.reflow.rounds)}"),
            "registered_models": published["registered"], "mlflow_run_id": parent, "mlflow_tracking_uri": uri,
            "mlflow_experiment_id": tracker.experiment_id, "ui": ui}


if __name__ == "__main__":
    reflow()
