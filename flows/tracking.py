"""MLflow tracking for a pipeline run: one parent run per pipeline run, one child run per stage.

With `tracking_store.py` (where the store is), `serving.py` (the logged model) and `sampler_model.py` (its pyfunc), the
only modules that import mlflow. It talks to the store through an explicit `mlflow.MlflowClient` (no fluent
`mlflow.start_run` global state), so Prefect tasks running in threads can log to their own stage's run concurrently.

Resume: the parent run id is kept at `<run dir>/mlflow_run.json`, so a re-run of the same pipeline run logs into
the same parent run; a stage's child run is found again by its tags (`mlflow.parentRunId`, `reflow.stage`).

mlflow is imported when a tracker first talks to the store, not with this module: the flow process of `reflow run`
leaves MLflow to its tracking process (`flows.tracking_process`) and never imports it.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

import fsspec

from flows.stage_metrics import MlflowStageCallback, headline_metrics, metric_rows, per_model_metrics
from flows.tracking_store import RUN_FILE, read_run_file
from reflow_core import storage

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "reflow.stage"
_SECRET = re.compile(r"secret|key|token|password|credential", re.IGNORECASE)
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")  # mlflow.entities.RunStatus


def run_status(status: str) -> str:
    """`status` as MLflow spells it (upper case); a ValueError for anything not in STATUSES."""
    status = status.upper()
    if status not in STATUSES:
        raise ValueError(f"unknown MLflow run status {status!r} (one of {', '.join(STATUSES)})")
    return status


def _limits():
    """MLflow's limits on keys, values and batch sizes (`mlflow.utils.validation`), imported when first needed."""
    from mlflow.utils import validation

    return validation


def _mlflow_error() -> type[Exception]:
    from mlflow.exceptions import MlflowException

    return MlflowException


def import_mlflow(store: bool = True) -> None:
    """Import mlflow now, and with store the modules of its sqlite/SQL stores (~1 s: SQLAlchemy's models of MLflow's
    tables), which opening such a store imports."""
    import mlflow  # noqa: F401

    if store:
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def skip_requirement_check() -> None:
    """Logging a model, MLflow checks its pip requirements against the installed packages and warns of a mismatch,
    twice (writing the model, then loading it to validate the input example), mapping every installed distribution
    to its modules first (~1 s of CPU, once per process). The models `serving.log_sampler` logs require the
    versions installed where it runs (`serving.requirements()`: each package `==` its installed version), which the
    check cannot find mismatched. In a process that logs only these (the tracking process,
    flows/tracking_process.py), the check is replaced by nothing where MLflow binds it."""
    import importlib

    for name in ("mlflow.utils.environment", "mlflow.pyfunc"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "warn_dependency_requirement_mismatches"):
            module.warn_dependency_requirement_mismatches = lambda *args, **kwargs: None


def new_client(tracking_uri: str):
    """An `mlflow.MlflowClient` on tracking_uri (MLflow keeps the store per URI for the rest of the process)."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


# ---------------------------------------------------------------------------------------------------------------
# params


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists stay values (logged as their repr)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            out.update(flatten(v, key))
    else:
        out[prefix] = obj
    return out


def loggable_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config as MLflow params: secrets dropped, keys and values cut to MLflow's limits."""
    params = {}
    for key, value in flatten(config).items():
        if _SECRET.search(key):
            continue
        params[_clean_key(key)] = str(value)[:_limits().MAX_PARAM_VAL_LENGTH]
    return params


def _clean_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)[:_limits().MAX_ENTITY_KEY_LENGTH]


# ---------------------------------------------------------------------------------------------------------------
# tracker


class MlflowTracker:
    """Parent run per pipeline run (id persisted under the run dir), child run per stage.

    Thread-safe: tasks for different stages (or shards of one stage) may log concurrently.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_dir_url: str, run_name: str | None = None,
                 artifact_root: str | None = None, params: Mapping[str, Any] | None = None):
        """params: the (nested) config, logged on every stage run as well as the parent, so MLflow's compare view
        of stage runs (teacher vs teacher, reflow vs reflow) shows the settings that differ."""
        self.tracking_uri = tracking_uri
        self.params = dict(params) if params else None
        self.experiment = experiment
        self.run_dir_url = run_dir_url.rstrip("/")
        self.run_name = run_name or self.run_dir_url.rsplit("/", 1)[-1]
        self.artifact_root = artifact_root
        self.client = new_client(tracking_uri)
        self._lock = threading.RLock()
        self._experiment_id: str | None = None
        self._parent_id: str | None = None
        self._children: dict[str, str] = {}
        self._callbacks: dict[str, MlflowStageCallback] = {}
        self._monitor = None  # the system metrics monitor, while one runs

    def __getstate__(self) -> dict:
        # picklable for process-based task runners (prefect-dask): settings and run ids travel; the client, the
        # lock, the monitor and the per-process metric buffers are made anew on the other side
        state = {k: v for k, v in self.__dict__.items() if k not in ("client", "_lock", "_monitor")}
        state["_callbacks"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.client = new_client(self.tracking_uri)
        self._lock = threading.RLock()
        self._monitor = None

    @classmethod
    def resumed(cls, settings: Mapping[str, Any], experiment_id: str | None, parent_id: str | None,
                children: Mapping[str, str]) -> "MlflowTracker":
        """A tracker of runs another tracker opened (settings: this class's constructor arguments): its experiment,
        parent and open stage runs known, so it logs into them without asking the store (a Dask shard process)."""
        t = cls(**settings)
        t._experiment_id, t._parent_id, t._children = experiment_id, parent_id, dict(children)
        return t

    # -- runs ---------------------------------------------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        with self._lock:
            if self._experiment_id is None:
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    try:
                        # experimentKind: open in MLflow 3's "model training" view, not the GenAI one
                        self._experiment_id = self.client.create_experiment(
                            self.experiment, artifact_location=self._artifact_location(),
                            tags={"mlflow.experimentKind": "custom_model_development"})
                    except _mlflow_error():  # created concurrently by another process
                        self._experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
                else:
                    self._experiment_id = exp.experiment_id
            return self._experiment_id

    def _artifact_location(self) -> str | None:
        """Artifacts next to a local sqlite store; a server (http) or explicit URI decides for itself."""
        if self.artifact_root:
            return self.artifact_root
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri[len("sqlite:///"):]).resolve()
            return (db.parent / "mlartifacts").as_uri()
        return None

    def _run_exists(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except _mlflow_error():
            return False
        return run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id

    def parent_run_id(self) -> str:
        """The pipeline run's parent MLflow run: reused from `<run dir>/mlflow_run.json`, else created."""
        with self._lock:
            if self._parent_id is not None:
                return self._parent_id
            url = storage.join(self.run_dir_url, RUN_FILE)
            stored = read_run_file(url)  # a torn / invalid file: TrackingFileError naming it and the fix
            run_id = stored.run_id if stored is not None else None
            if run_id and self._run_exists(run_id):
                self.client.update_run(run_id, status="RUNNING")
            else:
                run = self.client.create_run(
                    self.experiment_id, run_name=self.run_name,
                    tags={"reflow.run_dir": self.run_dir_url, "reflow.kind": "pipeline"})
                run_id = run.info.run_id
                storage.write_json(url, {"run_id": run_id, "tracking_uri": self.tracking_uri,
                                         "experiment_id": self.experiment_id, "experiment": self.experiment})
            self._parent_id = run_id
            return run_id

    def child_run_id(self, stage: str) -> str:
        """The stage's child run under the parent: found by tags on resume, else created. Marks it RUNNING. The config
        is logged on it as params when it is opened."""
        with self._lock:
            if stage in self._children:
                return self._children[stage]
            run_id = self.open_child(stage)
            if self.params:
                self.log_params(run_id, self.params)
            return run_id

    def open_child(self, stage: str) -> str:
        """`child_run_id` less the params (a queued tracker logs them without waiting)."""
        with self._lock:
            if stage in self._children:
                return self._children[stage]
            parent = self.parent_run_id()
            found = self._find_child(stage)
            if found:
                run_id = found[0].info.run_id
                if found[0].info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
            else:
                run = self.client.create_run(
                    self.experiment_id, run_name=stage,
                    tags={PARENT_TAG: parent, STAGE_TAG: stage, "reflow.run_dir": self.run_dir_url})
                run_id = run.info.run_id
            self._children[stage] = run_id
            return run_id

    def _find_child(self, stage: str) -> list:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id()}' and tags.`{STAGE_TAG}` = '{stage}'",
            order_by=["attributes.start_time ASC"], max_results=1)

    def stage_callback(self, stage: str) -> MlflowStageCallback:
        """The callback reflow_core reports a stage's events to (one per stage; shared by its shard tasks)."""
        with self._lock:
            if stage not in self._callbacks:
                self._callbacks[stage] = MlflowStageCallback(self, stage, self.child_run_id(stage))
            return self._callbacks[stage]

    def finish(self, stage: str | None, status: str = "FINISHED") -> None:
        """Flush a stage's pending metrics and set its terminal status (stage None: the parent run)."""
        status = run_status(status)
        with self._lock:
            if stage is None:
                self.client.set_terminated(self.parent_run_id(), status=status)
                return
            cb = self._callbacks.get(stage)
            if cb is not None:
                cb.flush()
            run_id = self.child_run_id(stage)
            self.client.set_terminated(run_id, status=status)
            self._children.pop(stage, None)  # a later use of this stage re-opens the run
            self._callbacks.pop(stage, None)

    def finish_open(self, status: str) -> None:
        """Terminate every stage run still open, then the parent (used when the pipeline fails)."""
        with self._lock:
            for stage in list(self._children):
                try:
                    self.finish(stage, status)
                except _mlflow_error():
                    pass
            if self._parent_id is not None:
                self.finish(None, status)

    # -- logging ------------------------------------------------------------------------------------------------
    def log_params(self, run_id: str, config: Mapping[str, Any]) -> dict[str, str]:
        """Log a (nested) config as flattened params. MLflow params are immutable: a key already logged with another
        value (a resumed run whose non-identity settings changed) is recorded as tag `reflow.changed.<key>`."""
        from mlflow.entities import Param, RunTag

        lim = _limits()
        params = loggable_params(config)
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = [RunTag(_clean_key(f"reflow.changed.{k}"), v[:lim.MAX_TAG_VAL_LENGTH])
                   for k, v in params.items() if k in existing and existing[k] != v]
        for i in range(0, len(new), lim.MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=new[i:i + lim.MAX_PARAMS_TAGS_PER_BATCH])
        for i in range(0, len(changed), lim.MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=changed[i:i + lim.MAX_PARAMS_TAGS_PER_BATCH])
        return params

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_metric_rows(run_id, metric_rows(metrics, step))

    def log_metric_rows(self, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
        """Metrics as (key, value, timestamp in ms, step) rows, in batches of MLflow's size."""
        from mlflow.entities import Metric

        batch = [Metric(_clean_key(k), v, ts, step) for k, v, ts, step in rows]
        size = _limits().MAX_METRICS_PER_BATCH
        for i in range(0, len(batch), size):
            self.client.log_batch(run_id, metrics=batch[i:i + size])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        limit = _limits().MAX_TAG_VAL_LENGTH
        batch = [RunTag(_clean_key(k), str(v)[:limit]) for k, v in tags.items() if not _SECRET.search(k)]
        if batch:
            self.client.log_batch(run_id, tags=batch)

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        """Log a local file or an fsspec URL (remote files are downloaded to a temp file first)."""
        fs, fpath = fsspec.core.url_to_fs(path)
        if storage.is_local(path):
            self.client.log_artifact(run_id, fpath, artifact_path)
            return
        with tempfile.TemporaryDirectory(prefix="reflow-artifact-") as tmp:
            local = os.path.join(tmp, os.path.basename(fpath.rstrip("/")))
            fs.get_file(fpath, local)
            self.client.log_artifact(run_id, local, artifact_path)


    def has_metric(self, run_id: str, prefix: str) -> bool:
        """Whether run_id has a metric whose key starts with prefix."""
        return any(k.startswith(prefix) for k in self.client.get_run(run_id).data.metrics)

    def resolve(self, run_id: str) -> str:
        """The id of a run (a queued tracker names runs before they exist; this one has their ids at once)."""
        return run_id

    def when_opened(self, run_id: str, then) -> None:
        """then(run_id): the run exists (a queued tracker calls it once its executor has opened the run)."""
        then(run_id)

    def call(self, fn, *args, **kwargs):
        """fn(this tracker, *args, **kwargs): work on the store that a queued tracker runs where its store is."""
        return fn(self, *args, **kwargs)

    def close(self) -> None:
        """Nothing to wait for: every call above has reached the store when it returns."""

    # -- pipeline results ----------------------------------------------------------------------------------------
    def eval_run_ids(self, models: list[str]) -> dict[str, str]:
        """{model: its evaluation run id} of the runs `log_results` made (left as they are)."""
        return {m: found[0].info.run_id for m in models if (found := self._find_child(f"eval/{m}"))}

    def log_results(self, rows: list[dict], metric: str, wall_seconds: Mapping[str, float]) -> dict[str, str]:
        """The evaluation as MLflow users compare it. On the parent run, one key per (quality column, model,
        solver, NFE), e.g. `sliced_w2.reflow.euler.nfe1`, plus `straightness.<model>`, `params.<model>` and
        `wall_seconds.<stage>`, so the experiment table sorts pipelines by any of them. One evaluation child run
        per model (`eval/<model>`) with the same keys less the model (`sliced_w2.euler.nfe1`), so the compare view
        sets teacher, reflow and students side by side. Returns {model: its evaluation run id}."""
        parent = self.parent_run_id()
        wall = {f"wall_seconds.{k}": v for k, v in wall_seconds.items()}
        self.log_metrics(parent, {**headline_metrics(rows), **wall})
        self.set_tags(parent, {"reflow.metric": metric})
        runs = {}
        for model, metrics in per_model_metrics(rows).items():
            run_id = self.child_run_id(f"eval/{model}")
            self.log_metrics(run_id, metrics)
            self.set_tags(run_id, {"reflow.model": model, "reflow.metric": metric})
            self.finish(f"eval/{model}", "FINISHED")
            runs[model] = run_id
        return runs

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, every_s: float = 5.0):
        """MLflow's system metrics (`system/cpu_utilization_percentage`, memory, disk, network, GPU when present)
        sampled every `every_s` seconds into run_id while the block runs."""
        self.start_system_metrics(run_id, every_s)
        try:
            yield
        finally:
            self.stop_system_metrics()

    def start_system_metrics(self, run_id: str, every_s: float = 5.0) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        with self._lock:
            self.stop_system_metrics()
            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, tracking_uri=self.tracking_uri)
            self._monitor.start()

    def stop_system_metrics(self) -> None:
        with self._lock:
            monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()

    @contextlib.contextmanager
    def active_run(self, run_id: str):
        """run_id as MLflow's active run in this thread (for `mlflow.<flavor>.log_model`, which logs into the
        active run), on this tracker's store; left FINISHED afterwards, as it was (start_run re-opens it)."""
        import mlflow
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with self._lock, _use_tracking_uri(self.tracking_uri), mlflow.start_run(run_id=run_id, nested=True,
                                                                               log_system_metrics=False) as run:
            yield run
        self.client.update_run(run_id, status="FINISHED")


def source_tags(repo: str | os.PathLike | None = None) -> dict[str, str]:
    """Where the code that ran came from: the git commit (MLflow's own `mlflow.source.git.commit` tag, shown in the
    run page), whether the tree had local changes, and the package version."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    repo = Path(repo) if repo else Path(__file__).resolve().parent.parent
    tags = {}
    try:
        tags["reflow.version"] = version("reflow")
    except PackageNotFoundError:
        tags["reflow.version"] = "unknown"
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        tags["mlflow.source.git.commit"] = tags["reflow.git_commit"] = git("rev-parse", "HEAD")
        tags["reflow.git_dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
    except (OSError, subprocess.SubprocessError):
        tags["reflow.git_commit"] = "unknown (not a git checkout)"
    return tags
