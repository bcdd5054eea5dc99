"""How reflow_core reports progress: a small callback protocol (no logging framework is imported here).

`flows/tracking.py` implements it with MLflow; the CLI uses `ConsoleCallback` for progress bars.
"""
from __future__ import annotations

from typing import Protocol

from tqdm.auto import tqdm


class Callback(Protocol):
    def on_metrics(self, stage: str, step: int, metrics: dict[str, float]) -> None: ...
    def on_artifact(self, stage: str, path: str) -> None: ...
    def on_progress(self, stage: str, done: int, total: int) -> None: ...


class NullCallback:
    def on_metrics(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_artifact(self, stage: str, path: str) -> None:
        pass

    def on_progress(self, stage: str, done: int, total: int) -> None:
        pass


class ConsoleCallback(NullCallback):
    """A tqdm bar per stage; metrics go into the bar's postfix."""

    def __init__(self, disable: bool | None = False):  # None: off when the output is not a terminal
        self.bars: dict[str, tqdm] = {}
        self.disable = disable

    def on_progress(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None or bar.total != total:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, disable=self.disable, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def on_metrics(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        bar = self.bars.get(stage)
        if bar is not None and not bar.disable:
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:4]}, refresh=False)


class MultiCallback(NullCallback):
    def __init__(self, *callbacks: Callback):
        self.callbacks = callbacks

    def on_metrics(self, stage, step, metrics):
        for c in self.callbacks:
            c.on_metrics(stage, step, metrics)

    def on_artifact(self, stage, path):
        for c in self.callbacks:
            c.on_artifact(stage, path)

    def on_progress(self, stage, done, total):
        for c in self.callbacks:
            c.on_progress(stage, done, total)


class OfTotal(NullCallback):
    """Another callback's events, with progress counted toward `total`: a stage that trains in parts (the teacher,
    to its guide snapshot and then on) reports one progress from 0 to its steps, not one per part."""

    def __init__(self, inner: Callback, total: int):
        self.inner, self.total = inner, total

    def on_metrics(self, stage, step, metrics):
        self.inner.on_metrics(stage, step, metrics)

    def on_artifact(self, stage, path):
        self.inner.on_artifact(stage, path)

    def on_progress(self, stage, done, total):
        self.inner.on_progress(stage, done, self.total)
