"""The one walk over a run's plan: `stages.run_local`, the Prefect flow and the torchrun entry all go through it.

`begin` deletes what is to be redone and schedules the walk; `walk` hands each stage instance, with its inputs and
whether its artifacts say it is finished (judged once, here), to a per-stage `execute` and collects the outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .. import lease
from ..callbacks import Callback, NullCallback
from ..config import ConfigError, PipelineConfig
from .base import Context, RunDir, Stage, StageOutput, prepare_run
from .graph import inputs_of, plan, reset_stage, upstream
from .kinds import StageKind, module


@dataclass(frozen=True)
class Schedule:
    """The stages to walk (the selected ones and those they read, in plan order) and the selected ones; a walked
    stage that was not selected has been found finished."""

    stages: list[Stage]
    chosen: list[Stage]

    @property
    def finished(self) -> set[str]:
        return {s.name for s in self.stages if s not in self.chosen}


@dataclass(frozen=True)
class Step:
    """One stage instance as the walk reaches it: its kind, its inputs by role, and whether it is finished."""

    stage: Stage
    kind: StageKind
    inputs: dict[str, StageOutput]
    done: bool

    def run(self, ctx: Context) -> StageOutput:
        """The stage in this process (its kind's `run`)."""
        return self.kind.run(self.stage, ctx, self.inputs)


def schedule(ctx: Context, selected: Sequence[str] | None = None) -> Schedule:
    """The walk for `--stages NAME,...` (None: all): the selected stages and those they read from; an unselected
    one must already be finished (it is then only asked for its output)."""
    stages = plan(ctx.cfg, ctx.rundir)
    names = list(selected) if selected else [s.name for s in stages]
    walk = upstream(stages, names)
    chosen = [s for s in walk if s.name in names]
    missing = [s.name for s in walk if s not in chosen and not module(s).done(s, ctx)]
    if missing:
        raise ConfigError(f"stage(s) {missing} are needed by {names} but have not finished under {ctx.rundir.dir}; "
                          "add them to --stages")
    return Schedule(walk, chosen)


def begin(cfg: PipelineConfig, rundir: RunDir, redo_stages: Sequence[str] = (),
          selected: Sequence[str] | None = None) -> tuple[Schedule, list[str]]:
    """What both runners do before walking: delete the artifacts of `redo_stages` (and every later stage's), and of
    `evaluate` when it is selected by name (asked for: recomputed even if metrics.json is current); then
    `schedule`. Returns (the schedule, URLs removed)."""
    removed = [url for name in redo_stages for url in reset_stage(rundir, name)]
    if selected and "evaluate" in selected:
        removed += reset_stage(rundir, "evaluate")
    return schedule(Context(cfg, rundir), selected), removed


def walk(ctx: Context, sched: Schedule, execute: Callable[[Step], StageOutput]) -> dict[str, StageOutput]:
    """Each scheduled stage in order through `execute`; returns the outputs by stage name. A stage's `done` is
    judged when the walk reaches it (an unselected one was judged by `schedule`), never again."""
    finished = sched.finished
    outputs: dict[str, StageOutput] = {}
    for s in sched.stages:
        kind = module(s)
        outputs[s.name] = execute(Step(s, kind, inputs_of(s, outputs), s.name in finished or kind.done(s, ctx)))
    return outputs


def run_local(cfg: PipelineConfig, root: str, run: str | None = None, callback: Callback | None = None,
              device=None, new: bool = False, redo_stages: Sequence[str] = (),
              stages: Sequence[str] | None = None) -> list[dict]:
    """Walk the plan in this process, each stage skipped when its artifacts say it is done, holding the run
    directory's lease (another runner on it: `lease.RunInUse`). redo_stages: delete these stages' artifacts (and
    later stages') first (`reset_stage`). Returns the metric rows."""
    with lease.hold(RunDir.of(root, cfg.name if run is None else run).dir, lease.local_owner()):
        rundir = prepare_run(cfg, root, run, new=new)
        sched, _ = begin(cfg, rundir, redo_stages, stages)
        ctx = Context(cfg, rundir, callback or NullCallback(), device)
        outputs = walk(ctx, sched, lambda step: step.run(ctx))
    return outputs["evaluate"].info["rows"] if "evaluate" in outputs else []
