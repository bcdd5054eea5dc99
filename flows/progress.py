"""A long stage's progress where a Prefect user looks: a progress artifact on the flow run (fraction done, with the
throughput and ETA in its description) kept up to date, and a line through the run logger at a steady interval."""
from __future__ import annotations

import re
import time
from typing import Callable
from uuid import UUID

from prefect import get_run_logger, runtime
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from reflow_core.callbacks import NullCallback


def artifact_key(stage: str) -> str:
    """`<flow run name>-<stage>-progress`, in the characters an artifact key allows (lowercase, digits, dashes)."""
    name = f"{runtime.flow_run.name or 'reflow'}-{stage}-progress"
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", name.lower())).strip("-")


def _eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class PrefectProgress(NullCallback):
    """The progress of one stage (`on_progress(stage, done, total)`: steps of a training stage, shards of a pairs
    stage) as a Prefect progress artifact, updated at most every `every_s` seconds and at the end, and a run-logger
    line every `log_every_s` seconds (with the last loss a training stage reported). Events of other stages (a
    pair shard's own rows, `pairs/shard3`) are left to the other callbacks. Throughput and ETA count from the first
    event, so a resumed stage's rate is its own."""

    def __init__(self, stage: str, unit: str = "steps", every_s: float = 2.0, log_every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.unit, self.every_s, self.log_every_s, self.clock = stage, unit, every_s, log_every_s, clock
        self.artifact: UUID | None = None
        self.start: tuple[float, int] | None = None
        self.last_update = self.last_log = -float("inf")
        self.loss: float | None = None

    def on_metrics(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if stage == self.stage and "loss" in metrics:
            self.loss = float(metrics["loss"])

    def on_progress(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage or total <= 0:
            return
        now = self.clock()
        if self.start is None:
            self.start = (now, done)
        finished = done >= total
        if not finished and now - self.last_update < self.every_s and self.artifact is not None:
            return
        t0, d0 = self.start
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
        eta = _eta((total - done) / rate) if rate > 0 else "unknown"
        text = f"{self.stage}: {done}/{total} {self.unit}, {rate:.3g} {self.unit}/s, ETA {eta}"
        percent = 100.0 * min(done, total) / total
        if self.artifact is None:
            self.artifact = create_progress_artifact(percent, key=artifact_key(self.stage), description=text)
        else:
            update_progress_artifact(self.artifact, percent, description=text)
        self.last_update = now
        if finished or now - self.last_log >= self.log_every_s:
            loss = "" if self.loss is None else f", loss {self.loss:.4g}"
            get_run_logger().info("%s (%.0f%%)%s", text, percent, loss)
            self.last_log = now
