"""The pipeline as data: a config yields a plan of stage instances; one module per stage kind runs them.

    from reflow_core import stages
    rundir = stages.prepare_run(cfg, "./runs", "demo")
    for s in stages.plan(cfg, rundir): print(s.name, s.kind, s.reads, s.writes)
    rows = stages.run_local(cfg, "./runs", "demo")

Every stage kind (module) satisfies `kinds.StageKind`: `done(stage, ctx) -> bool` and `run(stage, ctx, inputs) ->
StageOutput`; `run` is idempotent (finished work is detected from the artifacts and skipped, partial work resumes).
The pairs kind is a `kinds.ShardedKind` (`pending` / `simulate` / `finish`), so the Prefect flow can fan its shards
out as tasks. `run_local`, `flows/reflow.py` and `stage_main` all walk `plan(...)` through `walker.walk`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import checkpoint
from ..config import ConfigError
from . import anneal, batches, distill, evaluate, pairs, reflow, teacher
from .base import (RUN_NAME, Context, RunDir, Stage, StageOutput, check_run_name, dataset, default_device,
                   load_model, prepare_run, read_run_config)
from .graph import (check_stage_names, describe, final_models, find, inputs_of, model_names, plan, reset_stage,
                    stage_done, stage_names, suffix, upstream)
from .kinds import KINDS, ShardedKind, StageKind, module, sharded
from .walker import Schedule, Step, begin, run_local, schedule, walk

__all__ = ["teacher", "pairs", "reflow", "anneal", "distill", "evaluate", "batches", "Context", "RunDir", "Stage",
           "StageOutput", "StageKind", "ShardedKind", "KINDS", "module", "sharded", "plan", "describe", "find",
           "upstream", "inputs_of", "suffix", "model_names", "final_models", "check_stage_names", "stage_done",
           "stage_names", "reset_stage", "prepare_run", "read_run_config", "dataset", "load_model", "check_run_name",
           "RUN_NAME", "Schedule", "Step", "schedule", "begin", "walk", "run_local", "model_checkpoint",
           "sample_model"]


def model_checkpoint(rundir: RunDir, model: str) -> str:
    """The latest checkpoint of a model of the run: teacher, reflow, reflow-2, ..., anneal, distilled or slim."""
    cfg = rundir.config()
    models = {s.model: s for s in plan(cfg, rundir) if s.model}
    if model not in models:
        raise ConfigError(f"model must be one of {list(models)} for this run, got {model!r}")
    if model == "teacher" and cfg.teacher.checkpoint:
        return cfg.teacher.checkpoint
    url = checkpoint.latest(models[model].writes)
    if url is None:
        raise checkpoint.CheckpointError(f"no {model} checkpoint under {models[model].writes}; run the pipeline "
                                         "first")
    return url


def sample_model(rundir: RunDir, model: str, nfe: int, solver: str, n: int, seed: int, device=None,
                 label: int | Sequence[int] | None = None, *, guidance: str | None = None,
                 guidance_weight: float | None = None, grid: str = "uniform", rho: float = 1.0) -> torch.Tensor:
    """n samples in data space (toy: (n, 2); images: (n, C, H, W) in [-1, 1]), from noise seeded by `seed`.

    nfe counts network evaluations; guidance (default: the run's eval.guidance / guidance_weight) costs 2 a step.
    label: one class for all samples, or a list cycled over them; a class-conditional model without labels gets
    them drawn uniformly (seed + 1), never the untrained "no label" row."""
    dev = default_device(device)
    cfg = rundir.config()
    m = load_model(model_checkpoint(rundir, model), device=dev)
    ds = dataset(cfg)
    lab = None
    if cfg.net.class_cond:
        lab = _cycled(label, n) if label is not None else evaluate.eval_labels(ds, True, n, seed)
        if lab.numel() and not 0 <= int(lab.min()) <= int(lab.max()) < ds.num_classes:
            raise ConfigError(f"labels must be classes 0..{ds.num_classes - 1}, got {sorted(set(lab.tolist()))}")
    elif label is not None:
        raise ConfigError(f"the {model} model of this run is unconditional (net.class_cond: false): it takes no labels")
    g = cfg.eval.guidance if guidance is None else guidance
    w = cfg.eval.guidance_weight if guidance_weight is None else guidance_weight
    guide = None
    if g == "autoguidance":
        t = teacher.output(find(plan(cfg, rundir), "teacher"), model_checkpoint(rundir, "teacher"))
        guide = evaluate.load_guide(evaluate.guide_checkpoint(cfg, t), dev)
    x = evaluate.generate(m, evaluate.eval_noise(ds.shape, n, seed), nfe, solver, grid, rho, label=lab, device=dev,
                          guidance=g, weight=w, guide=guide)
    return x.clamp(-1, 1) if ds.kind == "image" else x


def _cycled(label: int | Sequence[int], n: int) -> torch.Tensor:
    """n labels: one class repeated, or a list of classes cycled."""
    lab = torch.as_tensor(label, dtype=torch.long).reshape(-1)
    if lab.numel() == 0:
        raise ConfigError("labels must name at least one class")
    return lab.repeat(-(-n // lab.numel()))[:n]
