"""The contract every stage kind satisfies (typed Protocols), and the registry of kinds by name.

A kind is a module: `teacher`, `pairs`, `reflow`, `anneal`, `distill`, `evaluate`. Both runners and the torchrun
entry call a kind only through `StageKind`; the Prefect flow fans a `ShardedKind` (pairs) out as one task per shard.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from . import anneal, distill, evaluate, pairs, reflow, teacher
from .base import Context, Stage, StageOutput


@runtime_checkable
class StageKind(Protocol):
    """done: finished, judged from the stage's artifact alone. run: idempotent (finished work is skipped, partial
    work resumes); `inputs` maps each role the stage reads to the output of the stage that fills it."""

    def done(self, stage: Stage, ctx: Context) -> bool: ...

    def run(self, stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> StageOutput: ...


@runtime_checkable
class ShardedKind(StageKind, Protocol):
    """A kind whose work splits into independent shards: `pending` creates the artifact and names the shards still
    to do, `simulate` does one (skipped when already done), `finish` hands on the output once all are done."""

    def pending(self, stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> list[int]: ...

    def simulate(self, stage: Stage, ctx: Context, inputs: dict[str, StageOutput], shard: int) -> dict: ...

    def finish(self, stage: Stage, ctx: Context, verify: bool = False) -> StageOutput: ...


KINDS: dict[str, StageKind] = {"teacher": teacher, "pairs": pairs, "reflow": reflow, "anneal": anneal,
                               "distill": distill, "evaluate": evaluate}


def module(stage: Stage) -> StageKind:
    """The kind that runs `stage`."""
    return KINDS[stage.kind]


def sharded(stage: Stage) -> ShardedKind | None:
    """The stage's kind when its work is sharded (the flow maps its shards over tasks), else None."""
    k = KINDS[stage.kind]
    return k if isinstance(k, ShardedKind) else None
