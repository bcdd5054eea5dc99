"""Stage `evaluate`: every model of the run (teacher, reflow, reflow-2, ..., distilled or slim) at every (solver,
NFE), from the same noise, against real data; straightness and parameter count per model.

reads:  {model name: the stage that trained it, for each evaluated model; "guide": teacher (AutoGuidance)}
writes: <run>/eval/metrics.json + plots (quality vs NFE, straightness, trajectories or sample grids)
output: {"metrics": metrics.json URL}, info {"rows": [...]}
"""
from __future__ import annotations

import time

import torch

from .. import metrics, plots, solvers, storage
from ..config import ConfigError, PipelineConfig
from ..data import DataSet, real_reference
from ..nets import count_params
from ..rng import label_seed, reference_seed
from ..velocity import VelocityModel, generate
from . import evaluate_sr
from .base import Context, Stage, StageOutput, dataset, default_device, load_model

GUIDE = "guide"
TRAJ_LINES = 256  # paths drawn per model in the toy trajectory plot
GRID_IMAGES = 64  # images per sample grid


def metrics_url(stage: Stage) -> str:
    return storage.join(stage.writes, "metrics.json")


def done(stage: Stage, ctx: Context) -> bool:
    url = metrics_url(stage)
    if not storage.exists(url):
        return False
    m = storage.read_json(url)
    return m.get("eval_config") == ctx.cfg.eval.model_dump(mode="json") and m.get("models") == evaluated_models(stage)


def evaluated_models(stage: Stage) -> list[str]:
    return [role for role, _ in stage.reads if role != GUIDE]


def eval_noise(shape: tuple, n: int, seed: int) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def eval_labels(ds: DataSet, class_cond: bool, n: int, seed: int) -> torch.Tensor | None:
    if not class_cond or ds.num_classes == 0:
        return None
    return torch.randint(ds.num_classes, (n,), generator=torch.Generator().manual_seed(label_seed(seed)))


def guide_checkpoint(cfg: PipelineConfig, teacher_out: StageOutput | None) -> str:
    """eval.guide_checkpoint, else the teacher stage's guide.pt (its EMA at 1/4 of training)."""
    if cfg.eval.guide_checkpoint:
        return cfg.eval.guide_checkpoint
    url = (teacher_out.urls if teacher_out is not None else {}).get("guide")
    if url is None:
        raise ConfigError("eval.guidance='autoguidance' needs a weaker model: the teacher stage wrote no guide.pt "
                          "(teacher trained before the guide snapshot existed, or given as teacher.checkpoint); "
                          "set eval.guide_checkpoint")
    return url


def load_guide(url: str, device) -> VelocityModel:
    """AutoGuidance's model: a checkpoint, or a single-file snapshot such as teacher/guide.pt."""
    return load_model(url, device=device)


def run(stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> StageOutput:
    """Quality per (model, solver, NFE) from the same noise, straightness per model; metrics.json and plots."""
    cfg, cb, ec = ctx.cfg, ctx.callback, ctx.cfg.eval
    ds, dev = dataset(cfg), default_device(ctx.device)
    if done(stage, ctx):
        m = storage.read_json(metrics_url(stage))
        return StageOutput({"metrics": metrics_url(stage)}, {"rows": m["rows"]})
    ckpts = {name: inputs[name].urls["model"] for name in evaluated_models(stage)}
    if cfg.data.sr is not None:
        evaluate_sr.check(cfg)
    models = {name: load_model(url, device=dev) for name, url in ckpts.items()}
    if cfg.data.sr is not None:  # super-resolution: held-out split, teacher NFEs and student knobs
        res = evaluate_sr.run(stage, ctx, models, ckpts)
        return _finish(stage, ctx, res["rows"], res["metric"], list(models), ckpts, res["plots"])
    guided = ec.guidance != "none"
    guide = load_guide(guide_checkpoint(cfg, inputs.get(GUIDE)), dev) if ec.guidance == "autoguidance" else None
    noise = eval_noise(ds.shape, ec.n_samples, ec.seed)
    label = eval_labels(ds, cfg.net.class_cond, ec.n_samples, ec.seed)
    real = real_reference(ds, ec.n_samples, torch.Generator().manual_seed(reference_seed(ec.seed)))
    # the reference side once per evaluation, not per row (statistics kept under <root>/_cache by content)
    ref = metrics.reference_for(ds, real, storage.join(ctx.rundir.root, "_cache"),
                                inception_weights=ec.inception_weights)
    # nfe = network evaluations; a (solver, nfe) whose budget cannot be met exactly is skipped (heun: odd NFE;
    # guided: 2 NFE per velocity, so euler needs even NFE and heun 2 (2N - 1))
    combos = [(s, n) for s in ec.solvers for n in ec.nfes if solvers.solver_nfe_for_budget(s, n, guided)]
    rows, samples, total = [], {}, len(models) * len(combos)
    # toy: the trajectory plot's paths are the first TRAJ_LINES of the straightness integration (no second ODE)
    keep = min(TRAJ_LINES, ec.n_samples) if ds.kind == "toy" else 0
    trajs = {}
    for name, model in models.items():
        lab = None if label is None else label.to(dev)
        record = _TrajectoryRecorder(keep) if keep else None
        s = metrics.straightness(model.solver_velocity(lab), noise.to(dev), steps=ec.straightness_steps,
                                 callback=record)
        if record is not None:
            trajs[name] = record.trajectory()
        cb.on_metrics(stage.name, 0, {f"{name}_params": float(count_params(model))})
        for solver, nfe in combos:
            t0 = time.perf_counter()
            g = ec.grid.solver_args(nfe)
            x, counted = generate(model, noise, nfe, solver, g["grid"], g["rho"], label=label, device=dev,
                                  times=g["times"], guidance=ec.guidance, weight=ec.guidance_weight, guide=guide,
                                  return_nfe=True)
            assert counted == nfe, (solver, nfe, counted)  # the accounting is measured, not assumed
            row = {"model": name, "params": count_params(model), "nfe": nfe, "solver": solver,
                   "straightness": float(s), **ref.score(x),
                   "seconds": time.perf_counter() - t0, "steps": solvers.steps_for_nfe(
                       solver, solvers.solver_nfe_for_budget(solver, nfe, guided)),
                   "grid": g["grid"], "rho": g["rho"], "guidance": ec.guidance,
                   "guidance_weight": ec.guidance_weight if guided else 1.0}
            rows.append(row)
            # plots need a toy's whole cloud but only an image grid's first 64: keep no more (50k cifar10
            # samples are 600 MB per row)
            samples[(name, solver, nfe)] = x if ds.kind == "toy" else x[:GRID_IMAGES].clone()
            cb.on_metrics(stage.name, nfe, {f"{name}_{solver}_{k}": v for k, v in row.items()
                                            if isinstance(v, float) and k not in ("seconds", "rho", "guidance_weight")})
            cb.on_progress(stage.name, len(rows), total)
    paths = _plots(cfg, stage, ds, models, trajs, real, rows, samples, ref.metric)
    return _finish(stage, ctx, rows, ref.metric, list(models), ckpts, paths)


def _finish(stage: Stage, ctx: Context, rows: list[dict], metric: str, models: list[str], ckpts: dict[str, str],
            plot_paths: list[str]) -> StageOutput:
    """metrics.json (what `done` checks), then every artifact reported to the callback."""
    url = metrics_url(stage)
    storage.write_json(url, {"rows": rows, "metric": metric, "eval_config": ctx.cfg.eval.model_dump(mode="json"),
                             "models": models, "checkpoints": ckpts})
    ctx.callback.on_artifact(stage.name, url)
    for p in plot_paths:
        ctx.callback.on_artifact(stage.name, p)
    return StageOutput({"metrics": url}, {"rows": rows})


class _TrajectoryRecorder:
    """A straightness step callback keeping the first k rundir: (steps + 1, k, ...) on the CPU, noise end first."""

    def __init__(self, k: int):
        self.k, self.pts, self.last = k, [], None

    def __call__(self, i, t, x, v):
        self.pts.append(x[: self.k].detach().cpu())
        self.last = (float(t), v[: self.k].detach().cpu())

    def trajectory(self) -> torch.Tensor:
        t, v = self.last
        return torch.stack(self.pts + [self.pts[-1] - t * v])  # the final Euler step, to t = 0


def _plots(cfg, stage, ds, models, trajs, real, rows, samples, metric) -> list[str]:
    out = [plots.quality_vs_nfe(rows, metric, storage.join(stage.writes, f"{metric}_vs_nfe.png"),
                                title=f"{cfg.name}: {metric} vs NFE"),
           plots.quality_vs_nfe(rows, "straightness", storage.join(stage.writes, "straightness_vs_nfe.png"))]
    nfes = sorted({r["nfe"] for r in rows})
    if ds.kind == "toy":
        out.append(plots.trajectory_plot(trajs, real[:2000], storage.join(stage.writes, "trajectories.png")))
        one = {f"{m} (1 NFE)": samples[(m, "euler", 1)] for m in models if (m, "euler", 1) in samples}
        if one:
            out.append(plots.scatter_samples(one, real[:2000], storage.join(stage.writes, "samples_1nfe.png"),
                                             title="one Euler step from the same noise"))
    else:
        for (name, solver, nfe), x in samples.items():
            if nfe in (nfes[0], nfes[-1]) and solver == cfg.eval.solvers[0]:
                png = storage.join(stage.writes, f"grid_{name}_{solver}_{nfe}.png")
                out.append(plots.sample_grid(x[:GRID_IMAGES], png, title=f"{name}, {solver}, {nfe} NFE"))
    return out
