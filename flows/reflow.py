"""The ReFlow pipeline as a Prefect flow: it walks the run's plan of stage instances (`reflow_core.stages.plan`),
one task per stage, and fans each pairs stage out as one task per shard.

    teacher -> pairs -> reflow [-> pairs-2 -> reflow-2 ...] -> evaluate

The flow walks the plan through `reflow_core.stages.walk`, as the local runner does. Every task (`flows.tasks`;
retry policy `flows.retry`, shard runners `flows.runners`) is a thin call into `reflow_core.stages` (config and
stage in, artifact URLs / plain dicts out) that reports to the stage's MLflow child run through `flows.tracking`
(its writes queued off the flow's path by `flows.tracking_queue`); `flows.publish` logs and registers the results,
`flows.root` finds the run root. Stages are idempotent in
reflow_core (finished work is detected from the artifacts and skipped, partial work resumes), so re-running the
flow with the same `root` and `run` resumes a failed pipeline: finished stages and pair shards are skipped,
training continues from its latest checkpoint, and MLflow logging continues in the same parent run.

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
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger, runtime
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows import FLOW_NAME, report, with_teacher_checkpoint
from flows.params import ConfigOverrides, Orchestration, deployment_preset, orchestration, override_dict
from flows.publish import publish_task
from flows.resume import DEFAULT_MAX_ATTEMPTS, attempt_name, check_attempt, label_flow_run
from flows.root import resolve_root
from flows.progress import drain_progress
from flows.tasks import stage_tasks
from flows.tracking import source_tags
from flows.tracking_queue import Tracker, open_tracker
from flows.tracking_store import resolve_tracking_uri, ui_hint
from reflow_core import host, lease
from reflow_core.config import PipelineConfig
from reflow_core.preset import load_preset, preset_names
from reflow_core.stages import (RUN_NAME, Context, RunDir, StageOutput, Step, begin, check_stage_names, describe,
                                prepare_run, suffix, walk)


def _preload() -> None:
    """Import what every flow run imports on its way, in a thread, from this module's import on: `reflow run` goes
    on to wait for its Prefect API server, whose start-up takes longer than this process's imports. fastapi's JSON
    encoder (Prefect's flow-run creation, ~0.3 s) and torch._dynamo (the first optimizer a training stage makes,
    ~1.2 s)."""
    try:
        import fastapi.encoders  # noqa: F401
        import torch._dynamo  # noqa: F401
    except Exception:  # noqa: BLE001 - imported again where needed, with its error there
        pass


threading.Thread(target=_preload, name="reflow-preload", daemon=True).start()

PresetName = Literal[tuple(preset_names())]  # the shipped presets: the deployment form shows a drop-down
PresetFile = Annotated[str, Field(pattern=r"^[^\x00]+\.ya?ml$", description="a .yaml file under $REFLOW_PRESET_DIR")]
RunName = Annotated[str, Field(pattern=f"^(?:{RUN_NAME.pattern})$", description="one path component under the root")]
StageName = Annotated[str, Field(pattern=r"^[a-z]+(-[a-z]+)?(-[0-9]+)?$", description="a stage of `reflow plan`")]


def _flow_run_name() -> str:
    """`{preset}-{run}` (the run defaults to the config's name, which is the preset's)."""
    p = runtime.flow_run.parameters
    preset = Path(str(p.get("preset") or "toy2d")).stem
    ov = override_dict(p.get("overrides"))
    return attempt_name(f"{preset}-{p.get('run') or ov.get('name') or preset}", int(p.get("attempt") or 1))


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
    attempt: Annotated[int, Field(ge=1)] = 1,
    max_attempts: Annotated[int, Field(ge=1, le=100)] = DEFAULT_MAX_ATTEMPTS,
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
        new: when the run directory exists with a different configuration, a fresh suffixed run (<run>-2, ...)
            instead of a refusal; with the same configuration the run resumes either way.
        stages: run only these stage instances (e.g. ["reflow-2", "evaluate"]); the stages they read from must
            already be finished under this run. A selected evaluate is recomputed even if metrics.json is current.
        teacher_checkpoint: start from this teacher checkpoint instead of training one.
        redo_stages: delete these stages' artifacts (and those of every later stage) before running, so they are
            redone (e.g. ["pairs"] after a corrupt pair store); their MLflow child runs are reused.
        attempt: which attempt at this run this flow run is; set by the deployment's resume trigger, which re-runs
            a Crashed flow run with attempt + 1 (`flows.resume`). Leave it at 1.
        max_attempts: the most attempts the resume trigger makes at one run (the first included); an attempt past
            it fails at once, saying why.
    """
    logger = get_run_logger()
    host.steady_malloc()  # malloc thresholds for tensor work in this process (reflow_core.host)
    # over a deployment whoever starts a run picks `preset`: a shipped name or a file under $REFLOW_PRESET_DIR only
    # (the CLI, whose caller may read any file, allows any path); a ConfigError fails the flow before any I/O
    preset_source = deployment_preset(preset)
    # cross-field checks: a ConfigError fails the flow here, before any work
    given = with_teacher_checkpoint(override_dict(overrides), teacher_checkpoint)
    cfg, orch = load_preset(preset_source, given), orchestration(preset_source, given)
    check_stage_names(cfg, (stages or []) + (redo_stages or []))
    check_attempt(attempt, max_attempts, run or cfg.name)
    root, root_source = resolve_root(root)
    flow_run_id = str(runtime.flow_run.id or "")
    owner = flow_run_id or lease.local_owner()
    requested = RunDir.of(root, run or cfg.name)
    with lease.hold(requested.dir, owner, is_stale=_holder_ended,
                    info={"flow_run_id": flow_run_id, "flow_run_name": runtime.flow_run.name or ""}):
        return _run(cfg, orch, preset, root, root_source, run, new, stages, redo_stages, attempt, logger)


def _run(cfg: PipelineConfig, orch: Orchestration, preset: str, root: str, root_source: str, run: str | None,
         new: bool, stages: list[str] | None, redo_stages: list[str] | None, attempt: int, logger) -> dict[str, Any]:
    rundir = prepare_run(cfg, root, run, new=new)
    label_flow_run(rundir.run, attempt, logger)
    sched, removed = begin(cfg, rundir, redo_stages or (), stages)
    if removed:
        logger.info("redo: removed %s", removed)

    uri = resolve_tracking_uri(orch.mlflow_uri, root)
    params = {**cfg.model_dump(mode="json"), "orchestration": orch.model_dump(mode="json")}
    # the MLflow writes run in order on the tracking process `reflow run` started (else on a thread); the flow waits
    # only for the answers it uses (run ids) and, at the end, for every write (flows/tracking_queue.py)
    tracker = open_tracker(uri, orch.experiment, rundir.dir, run_name=rundir.run, params=params)
    try:
        return _track(cfg, orch, preset, root, root_source, rundir, sched, uri, params, tracker, attempt, logger)
    finally:
        drain_progress()  # the progress artifacts' last updates (flows/progress.py)
        with contextlib.suppress(Exception):
            tracker.close()  # (on success closed already, raising what failed; here after a failure)


def _track(cfg: PipelineConfig, orch: Orchestration, preset: str, root: str, root_source: str, rundir: RunDir,
           sched, uri: str, params: dict[str, Any], tracker: Tracker, attempt: int, logger) -> dict[str, Any]:
    parent = tracker.parent_run_id()
    tracker.log_params(parent, params)
    tags = {"reflow.preset": preset, "reflow.run_dir": rundir.dir,
            "reflow.stages": ",".join(s.name for s in sched.chosen),
            **source_tags()}
    if runtime.flow_run.id:
        tags.update({"reflow.prefect_flow_run_id": runtime.flow_run.id,
                     "reflow.prefect_flow_run": runtime.flow_run.name,
                     "reflow.prefect_flow_run_url": runtime.flow_run.ui_url or "", "reflow.attempt": str(attempt),
                     f"reflow.prefect_flow_run_id.attempt{attempt}": runtime.flow_run.id})
    tracker.set_tags(parent, tags)
    logger.info("run %s at %s (root from %s)", rundir.run, rundir.dir, root_source)
    # (said once the run exists: the flow goes on meanwhile)
    tracker.when_opened(parent, lambda run_id: logger.info("MLflow parent run %s in %s", run_id, uri))
    logger.info("plan:\n%s", describe(sched.stages, rundir.dir))

    wall: dict[str, float] = {}

    def execute(step: Step) -> StageOutput:  # one stage instance as tasks; the wall time of those with work to do
        t0 = time.perf_counter()
        out = stage_tasks(cfg, orch, rundir, step, tracker, logger)
        if not step.done:
            wall[step.stage.name] = time.perf_counter() - t0
        return out

    monitor = tracker.system_metrics(parent) if orch.system_metrics else contextlib.nullcontext()
    try:
        with monitor:
            outputs = walk(Context(cfg, rundir), sched, execute)
        published = (publish_task(cfg, rundir, preset, sched.stages, outputs, wall, tracker, "evaluate" in wall)
                     if "evaluate" in outputs else {"registered": {}, "metric": None})
    except BaseException:
        tracker.finish_open("FAILED")
        raise
    tracker.finish(None, "FINISHED")
    parent, experiment_id = tracker.resolve(parent), tracker.experiment_id
    tracker.close()  # every write in the store (a failed one raised here) before the run reports where it is

    metrics_json = outputs["evaluate"].urls["metrics"] if "evaluate" in outputs else None
    rows = outputs["evaluate"].info["rows"] if "evaluate" in outputs else []
    models = {name: o.urls["model"] for name, o in outputs.items() if "model" in o.urls}
    ui = ui_hint(uri, root)
    if rows:
        print(report.summary_table(rows, published["metric"]))
    print(f"run directory:  {rundir.dir}")
    print(f"metrics:        {metrics_json}")
    print(f"MLflow run:     {parent} (experiment {orch.experiment!r}, store {uri})")
    for name, version in published["registered"].items():
        print(f"model:          models:/{name}/{version}")
    print(f"MLflow UI:      {ui}")
    return {"run": rundir.run, "run_dir": rundir.dir, "metrics_json": metrics_json or rundir.url("eval", "metrics.json"),
            "metrics": rows, "metric": published["metric"], "checkpoints": models,
            "teacher_checkpoint": models.get("teacher"),
            "reflow_checkpoint": models.get(f"reflow{suffix(cfg.reflow.rounds)}") if cfg.reflow.rounds else None,
            "registered_models": published["registered"], "mlflow_run_id": parent, "mlflow_tracking_uri": uri,
            "mlflow_experiment_id": experiment_id, "ui": ui}


if __name__ == "__main__":
    reflow()
