"""A finished run's results where users look: MLflow (headline metrics, evaluation runs, the final models logged and
registered as `<preset>-<model>`) and the flow run's Prefect artifacts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import report, serving
from flows.tracking_queue import Tracker
from flows.tracking_store import ui_hint
from reflow_core import stages, storage
from reflow_core.config import PipelineConfig


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(cfg: PipelineConfig, rundir: stages.RunDir, preset: str, walk: list[stages.Stage],
                 outputs: dict[str, stages.StageOutput], wall: dict[str, float], tracker: Tracker,
                 evaluated: bool) -> dict[str, Any]:
    """The results where users look: MLflow (headline metrics on the parent, one evaluation run per model, the final
    models logged as pyfunc samplers into theirs and registered as `<preset>-<model>`, see serving.py) and the flow
    run's Prefect artifacts. Idempotent: a model already logged from the same checkpoint is not logged again. The
    MLflow work runs where the tracker's store is (`tracker.call`: the tracking process of `reflow run`)."""
    ev = outputs["evaluate"]
    stored = storage.read_json(ev.urls["metrics"])
    rows, metric = ev.info["rows"], stored["metric"]
    parent = tracker.parent_run_id()  # (a queued tracker's name for it: resolved below, for the views)
    if evaluated or not tracker.has_metric(parent, f"{metric}."):
        eval_runs = tracker.log_results(rows, metric, wall)
    else:  # a no-op resume: logged by the flow run that evaluated
        eval_runs = tracker.eval_run_ids(list(dict.fromkeys(r["model"] for r in rows)))
    registered: dict[str, str] = {}
    for model in sorted(stages.final_models(walk) & set(eval_runs)):
        ckpt, name = stored["checkpoints"][model], model_registry_name(preset, model)
        head = serving.headline(rows, metric, model)
        version = tracker.call(serving.log_sampler, eval_runs[model], ckpt, rundir.config_json, name, head,
                               serving.version_description(preset, model, rundir.run, head))
        if version:
            registered[name] = version
    if registered:
        tracker.set_tags(parent, {"reflow.registered_models": ", ".join(f"{k}/{v}" for k, v in registered.items())})
    images = sorted(_pngs(stages.find(walk, "evaluate").writes))
    results = report.RunResults(preset, rundir.run, rundir.dir, rows, metric, images, tracker.tracking_uri,
                                tracker.experiment, tracker.experiment_id, tracker.resolve(parent), registered)
    try:
        artifacts = report.publish(results, ui_hint(tracker.tracking_uri, rundir.root))
    except Exception as e:  # an artifact is a view of results already stored: never fail a finished pipeline on it
        get_run_logger().warning("could not create the Prefect artifacts: %s", e)
        artifacts = {}
    return {"registered": registered, "eval_runs": eval_runs, "artifacts": {k: str(v) for k, v in artifacts.items()},
            "metric": metric}


def model_registry_name(preset: str, model: str) -> str:
    """`<preset>-<model>` (toy2d-reflow, digits_distill-distilled); a preset given as a file path by its stem."""
    return f"{Path(preset).stem}-{model}"


def _pngs(url: str) -> list[str]:
    fs, path = storage.fs_and_path(url)
    return [storage.join(url, p.rsplit("/", 1)[-1]) for p in fs.glob(path.rstrip("/") + "/*.png")]
