"""What a stage reports, as MLflow stores it: the stage's callback (metrics buffered into batches, progress as a
metric, artifacts), metric rows, and the evaluation rows' keys on the parent and per-model runs.

Pure bookkeeping over a `MetricSink` (`MlflowTracker`, or the queued tracker that sends its calls elsewhere): no
mlflow import here.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Mapping, Protocol

Row = tuple[str, float, int, int]  # (key, value, timestamp in ms, step)


class MetricSink(Protocol):
    """Where a stage callback writes: a tracker's two calls it uses."""

    def log_metric_rows(self, run_id: str, rows: list[Row]) -> None: ...

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None: ...


def now_ms() -> int:
    return int(time.time() * 1000)


def metric_rows(metrics: Mapping[str, Any], step: int = 0, ts: int | None = None) -> list[Row]:
    """The numbers of metrics as (key, value, timestamp in ms, step) rows, stamped now (or at ts)."""
    ts = now_ms() if ts is None else ts
    return [(k, float(v), ts, int(step)) for k, v in metrics.items() if is_number(v)]


def is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, (str, bytes))


class MlflowStageCallback:
    """reflow_core's Callback protocol for one stage's child run.

    Metrics are buffered and written with `log_batch` (every `flush_every` metrics or `flush_seconds`, and on
    artifacts / finish); progress becomes the metric `<stage>_progress` at most every `progress_every` of the total,
    buffered the same way (the final 1.0 written at once).
    """

    def __init__(self, tracker: MetricSink, stage: str, run_id: str, flush_every: int = 200,
                 flush_seconds: float = 10.0, progress_every: float = 0.05):
        self.tracker = tracker
        self.stage = stage
        self.run_id = run_id
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.progress_every = progress_every
        self._buffer: list[Row] = []  # (key, value, ms, step), written by log_metric_rows
        self._last_flush = time.monotonic()
        self._last_progress: dict[str, float] = {}
        self._lock = threading.Lock()

    def on_metrics(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        ts = now_ms()
        with self._lock:
            self._buffer.extend(metric_rows(metrics, step, ts))
            due = len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds
        if due:
            self.flush()

    def on_artifact(self, stage: str, path: str) -> None:
        self.flush()
        self.tracker.log_artifact(self.run_id, path)

    def on_progress(self, stage: str, done: int, total: int) -> None:
        if total <= 0:
            return
        frac = done / total
        with self._lock:  # keyed by the reported stage: shards report "pairs/shard3"
            last = self._last_progress.get(stage, -1.0)
            if frac < 1.0 and 0.0 <= frac - last < self.progress_every:
                return
            self._last_progress[stage] = frac
            self._buffer.append((f"{stage}_progress", frac, now_ms(), int(done)))
            # written with the next batch of metrics (each write is a store transaction, ~10 ms on sqlite), at
            # the latest flush_seconds from the last; the end of a stage at once
            due = frac >= 1.0 or time.monotonic() - self._last_flush > self.flush_seconds
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
        if batch:
            self.tracker.log_metric_rows(self.run_id, batch)


def headline_metrics(rows: list[dict]) -> dict[str, float]:
    """Parent-run keys of the evaluation rows: `<column>.<model>.<solver>.nfe<N>`, `straightness.<model>`,
    `params.<model>`."""
    out: dict[str, float] = {}
    for model, metrics in per_model_metrics(rows).items():
        for key, value in metrics.items():
            head, _, rest = key.partition(".")
            out[f"{head}.{model}.{rest}" if rest else f"{head}.{model}"] = value
    return out


_ROW_INFO = {"model", "solver", "nfe", "steps", "grid", "rho", "guidance", "guidance_weight", "seconds", "params",
             "straightness"}


def per_model_metrics(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{model: {`<column>.<solver>.nfe<N>`: value, `straightness`: s, `params`: n}} of the evaluation rows."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        m = out.setdefault(r["model"], {})
        for k, v in r.items():
            if k not in _ROW_INFO and is_number(v) and not isinstance(v, bool):
                m[f"{k}.{r['solver']}.nfe{r['nfe']}"] = float(v)
        m["straightness"] = float(r["straightness"])
        if "params" in r:
            m["params"] = float(r["params"])
    return out
