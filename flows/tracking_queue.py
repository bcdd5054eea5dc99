"""The flow's MLflow tracker: `flows.tracking.MlflowTracker`'s interface, with every store call run in order by one
executor, so the flow never waits for MLflow while the pipeline runs.

    tracker = open_tracker(uri, "reflow", rundir.dir, run_name=rundir.run, params=config)
    parent = tracker.parent_run_id()       # a name for the run at once; tracker.resolve(parent) waits for its id
    ...
    tracker.close()                        # every call is in the store when this returns

The executor (`flows.tracking_process`: a thread of this process, or the tracking process `reflow run` starts) owns an
`MlflowTracker`, the one client of the store, and runs the calls one by one in the order they were made.

Runs are named before they exist: `parent_run_id()` and `child_run_id(stage)` return a reference (`mlflow-run:...`)
at once, which every later call of this tracker may use as a run id (the executor puts the run's id in its place),
or the run's id once the executor has said it. `resolve(run_id)` waits for the id: the flow does at its end, for what
it prints and returns. What waits besides: the evaluation runs, the registered model versions and the experiment at
the end (`log_results`, `call`, `experiment_id`), which the flow uses. Metric timestamps are taken where a call is
made, so what is stored is what the synchronous tracker stored.

Errors: a run file the flow cannot use (`mlflow_run.json` torn or invalid) is still refused at `parent_run_id()`,
read here before anything is queued. A call that fails in the executor (an unreachable MLflow server, a full disk)
is raised by the next call of the tracker, or by `close()`: the flow still fails on a store that fails, a few
seconds later than before (the next metric flush, stage or artifact) instead of at the failing call itself.

Crash safety: `close()` runs at the flow's end and on its failure (flows/reflow.py); what a crash loses is said in
`flows.tracking_process`.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Union

from flows.stage_metrics import MlflowStageCallback, metric_rows
from flows.tracking import MlflowTracker, run_status
from flows.tracking_process import REF, Executor, ThreadExecutor, take_started
from flows.tracking_store import RUN_FILE, read_run_file
from reflow_core import storage

log = logging.getLogger(__name__)


def open_tracker(tracking_uri: str, experiment: str, run_dir_url: str, run_name: str | None = None,
                 artifact_root: str | None = None, params: Mapping[str, Any] | None = None) -> "QueuedTracker":
    """The flow's tracker: on the tracking process `reflow run` started (taken: one tracker per process), else on a
    thread of this process."""
    executor: Executor | None = take_started()
    if executor is None:
        executor = ThreadExecutor()
    elif executor.store != tracking_uri:
        executor.open_store(tracking_uri)
    return QueuedTracker(executor, tracking_uri, experiment, run_dir_url, run_name, artifact_root, params)


# --- the tracker ----------------------------------------------------------------------------------------------------

class QueuedTracker:
    """MlflowTracker's interface (what the flow, its tasks and its publish task use), the store calls queued on an
    executor. Thread-safe. Pickled (a Dask shard's process), it becomes an MlflowTracker of the same runs."""

    def __init__(self, executor: Executor, tracking_uri: str, experiment: str, run_dir_url: str,
                 run_name: str | None = None, artifact_root: str | None = None,
                 params: Mapping[str, Any] | None = None):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_dir_url = run_dir_url.rstrip("/")
        self.run_name = run_name or self.run_dir_url.rsplit("/", 1)[-1]
        self.artifact_root = artifact_root
        self.params = dict(params) if params else None
        self.settings = {"tracking_uri": tracking_uri, "experiment": experiment, "run_dir_url": self.run_dir_url,
                         "run_name": self.run_name, "artifact_root": artifact_root, "params": self.params}
        self.executor = executor
        self._lock = threading.RLock()
        self._count = itertools.count(1)
        self._runs: dict[str, Future] = {}  # REF -> the answer of the op opening it
        self._experiment_id: str | None = None
        self._parent: str | None = None
        self._children: dict[str, str] = {}
        self._callbacks: dict[str, MlflowStageCallback] = {}
        self._queue("init", "", (), self.settings)

    def __reduce__(self):
        return MlflowTracker.resumed, (self.settings, self.experiment_id, self.resolve(self.parent_run_id()),
                                       {stage: self.resolve(ref) for stage, ref in dict(self._children).items()})

    def _raise_failed(self) -> None:
        """Raise the first call that failed in the executor since the last check (the others, logged there, mostly
        follow from it: a run that could not be opened fails every call into it)."""
        errors = self.executor.errors
        if errors:
            first = errors[0]
            errors.clear()
            raise first

    def _queue(self, kind: str, name: str, args: tuple = (), kwargs: dict | None = None,
               ref: str | None = None) -> Future:
        self._raise_failed()
        return self.executor.request((kind, name, args, kwargs or {}, ref))

    def _wait(self, kind: str, name: str, *args, **kwargs) -> Any:
        self._raise_failed()
        ok, value = self.executor.request((kind, name, args, kwargs, None), wait=True).result()
        self._raise_failed()
        if not ok:
            raise value
        return value

    def _open(self, method: str, *args) -> str:
        ref = f"{REF}{args[0] if args else 'parent'}#{next(self._count)}"
        self._runs[ref] = self._queue("method", method, args, ref=ref)
        return ref

    def resolve(self, run_id: str) -> str:
        """The id of a run this tracker named (waits until the executor has opened it); any other id as it is."""
        fut = self._runs.get(run_id)
        if fut is None:
            return run_id
        ok, value = fut.result()
        if not ok:
            raise value
        return value

    def _known(self, ref: str) -> str:
        fut = self._runs[ref]
        if fut.done():
            ok, value = fut.result()
            if ok:
                return value
        return ref

    def when_opened(self, run_id: str, then: Callable[[str], Any]) -> None:
        """then(the run's id) once the executor has opened it (at once for an id; never if opening it failed)."""
        fut = self._runs.get(run_id)
        if fut is None:
            then(run_id)
            return

        def done(f: Future) -> None:
            ok, value = f.result()
            if ok:
                then(value)
        fut.add_done_callback(done)

    # -- runs --------------------------------------------------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        with self._lock:
            if self._experiment_id is None:
                self._experiment_id = self._wait("attr", "experiment_id")
            return self._experiment_id

    def parent_run_id(self) -> str:
        """The pipeline's parent run (as MlflowTracker.parent_run_id), named at once. The run file is read here: a
        torn or invalid one raises TrackingFileError now, before the flow does any work."""
        with self._lock:
            if self._parent is None:
                read_run_file(storage.join(self.run_dir_url, RUN_FILE))
                self._parent = self._open("parent_run_id")
            return self._known(self._parent)

    def child_run_id(self, stage: str) -> str:
        with self._lock:
            if stage not in self._children:
                ref = self._open("open_child", stage)
                if self.params:  # (MlflowTracker.child_run_id logs them when it opens the run)
                    self._queue("method", "log_params", (ref, self.params))
                self._children[stage] = ref
            return self._known(self._children[stage])

    def stage_callback(self, stage: str) -> MlflowStageCallback:
        with self._lock:
            if stage not in self._callbacks:
                self._callbacks[stage] = MlflowStageCallback(self, stage, self.child_run_id(stage))
            return self._callbacks[stage]

    def finish(self, stage: str | None, status: str = "FINISHED") -> None:
        status = run_status(status)
        with self._lock:
            if stage is not None:
                cb = self._callbacks.pop(stage, None)
                if cb is not None:
                    cb.flush()
                self._children.pop(stage, None)  # a later use of this stage re-opens the run
            self._queue("method", "finish", (stage, status))

    def finish_open(self, status: str) -> None:
        """Every stage run still open, then the parent, ended with status (the pipeline failed). Waits; an error of
        the store is logged, not raised: the flow is failing with its own."""
        with self._lock:
            for cb in self._callbacks.values():
                with contextlib.suppress(Exception):
                    cb.flush()
            self._callbacks.clear()
            self._children.clear()
            try:
                self.executor.errors.clear()
                ok, value = self.executor.request(("method", "finish_open", (status,), {}, None), wait=True).result()
                if not ok:
                    raise value
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow: could not end the open runs as %s: %s: %s", status, type(e).__name__, e)

    # -- logging -----------------------------------------------------------------------------------------------------
    def log_params(self, run_id: str, config: Mapping[str, Any]) -> None:
        self._queue("method", "log_params", (run_id, dict(config)))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self._queue("method", "log_metric_rows", (run_id, metric_rows(metrics, step)))

    def log_metric_rows(self, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
        self._queue("method", "log_metric_rows", (run_id, list(rows)))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self._queue("method", "set_tags", (run_id, {str(k): str(v) for k, v in tags.items()}))

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self._queue("method", "log_artifact", (run_id, path, artifact_path))

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, every_s: float = 5.0):
        self._queue("method", "start_system_metrics", (run_id, every_s))
        try:
            yield
        finally:
            self._queue("method", "stop_system_metrics")

    # -- results (waited for) ----------------------------------------------------------------------------------------
    def has_metric(self, run_id: str, prefix: str) -> bool:
        return self._wait("method", "has_metric", run_id, prefix)

    def eval_run_ids(self, models: list[str]) -> dict[str, str]:
        return self._wait("method", "eval_run_ids", models)

    def log_results(self, rows: list[dict], metric: str, wall_seconds: Mapping[str, float]) -> dict[str, str]:
        return self._wait("method", "log_results", rows, metric, dict(wall_seconds))

    def call(self, fn: Callable, *args, **kwargs) -> Any:
        """fn(the executor's MlflowTracker, *args, **kwargs) where the store is (fn: a module-level function)."""
        return self._wait("fn", f"{fn.__module__}:{fn.__qualname__}", *args, **kwargs)

    # -- the end -----------------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every call made so far is in the store (raises one that failed)."""
        with self._lock:
            for cb in list(self._callbacks.values()):
                cb.flush()
        self._wait("method", "close")  # (MlflowTracker.close does nothing: this waits for the calls before it)

    def close(self) -> None:
        """Flush, then end the executor (the tracking process exits). Raises a call that failed."""
        with self._lock:
            for cb in list(self._callbacks.values()):
                cb.flush()
            self._callbacks.clear()
        ok, value = self.executor.close()
        self._raise_failed()
        if not ok:
            raise value


Tracker = Union[MlflowTracker, QueuedTracker]
