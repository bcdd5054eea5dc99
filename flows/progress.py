"""A long stage's progress where a Prefect user looks: a progress artifact on the flow run (fraction done, with the
throughput and ETA in its description) kept up to date, and a line through the run logger at a steady interval.

The artifact's API calls are made by one background thread, in order, with the caller's Prefect run context, so a
stage does not wait for them; the updates share one API client (`update_progress_artifact` makes a new one per call,
~20-30 ms of CPU). `drain_progress()` (the flow's end) waits until the last one has been sent."""
from __future__ import annotations

import contextvars
import logging
import queue
import re
import threading
import time
from typing import Any, Callable
from uuid import UUID

from prefect import get_run_logger, runtime
from prefect.artifacts import create_progress_artifact
from prefect.client.schemas.actions import ArtifactUpdate

from reflow_core.callbacks import NullCallback


def artifact_key(stage: str) -> str:
    """`<flow run name>-<stage>-progress`, in the characters an artifact key allows (lowercase, digits, dashes)."""
    name = f"{runtime.flow_run.name or 'reflow'}-{stage}-progress"
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", name.lower())).strip("-")


class _Sender:
    """One daemon thread making queued calls in order, each in the context (contextvars) it was queued from; None
    closes its API client."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[contextvars.Context, Callable[[_Sender], Any] | None]] = queue.Queue()
        self._client: Any = None
        self._url: str | None = None
        threading.Thread(target=self._loop, name="prefect-progress", daemon=True).start()

    def client(self):
        """A sync API client on the current API URL, kept until the next drain."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        if self._client is None or url != self._url:
            self._close()
            self._client, self._url = get_client(sync_client=True), url
            self._client.__enter__()
        return self._client

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.__exit__(None, None, None)

    def _loop(self) -> None:
        while True:
            ctx, fn = self.queue.get()
            try:
                if fn is None:
                    self._close()
                else:
                    ctx.run(fn, self)
            except Exception as e:  # noqa: BLE001 - a progress view must never fail a stage
                logging.getLogger(__name__).warning("could not update a progress artifact: %s", e)
            finally:
                self.queue.task_done()


_sender: _Sender | None = None
_sender_lock = threading.Lock()


def _send(fn: Callable[[_Sender], Any] | None) -> None:
    global _sender
    with _sender_lock:
        if _sender is None:
            _sender = _Sender()
    _sender.queue.put((contextvars.copy_context(), fn))


def drain_progress() -> None:
    """Wait until every queued progress artifact call has been made (and close the API client they share)."""
    if _sender is not None:
        _send(None)
        _sender.queue.join()


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
        self.artifact: UUID | None = None  # set by the sender thread once created
        self.created = False
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
        if not finished and now - self.last_update < self.every_s and self.created:
            return
        t0, d0 = self.start
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
        eta = _eta((total - done) / rate) if rate > 0 else "unknown"
        text = f"{self.stage}: {done}/{total} {self.unit}, {rate:.3g} {self.unit}/s, ETA {eta}"
        percent = 100.0 * min(done, total) / total
        if not self.created:
            self.created = True
            key = artifact_key(self.stage)

            def create(sender: _Sender) -> None:
                self.artifact = create_progress_artifact(percent, key=key, description=text)
            _send(create)
        else:
            def update(sender: _Sender) -> None:
                if self.artifact is not None:  # (not if its creation failed)
                    sender.client().update_artifact(self.artifact, ArtifactUpdate(data=percent, description=text))
            _send(update)
        self.last_update = now
        if finished or now - self.last_log >= self.log_every_s:
            loss = "" if self.loss is None else f", loss {self.loss:.4g}"
            get_run_logger().info("%s (%.0f%%)%s", text, percent, loss)
            self.last_log = now
