"""Prefect orchestration of reflow_core: the flow (flows/reflow.py), its tasks, and the `reflow` command line."""
from __future__ import annotations

FLOW_NAME = "reflow"  # the Prefect flow's name (flows/reflow.py; deployments are `reflow/<name>`)


def with_teacher_checkpoint(overrides: dict, teacher_checkpoint: str | None) -> dict:
    """The config overrides of a run started from a given teacher checkpoint (the flow's `teacher_checkpoint`, the
    CLI's --teacher-checkpoint): `teacher.checkpoint` set, so the teacher stage trains nothing."""
    return overrides | {"teacher.checkpoint": teacher_checkpoint} if teacher_checkpoint else overrides
