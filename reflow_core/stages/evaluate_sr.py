"""Evaluation of a super-resolution run (data.sr) on its held-out split: the teacher at every eval NFE and OFTSR's
student at every knob, from the same low-res inputs and source draws; PSNR, consistency, the data set's Frechet
distance (LPIPS with eval.lpips); the fidelity-realism plot.

Each held-out image gets one measurement y = A x + sigma_y n (seeded by eval.seed) and eval.draws source draws
x_src = sqrt(1 - sigma_p^2) A^T y + sigma_p eps (draw k seeded by (eval.seed, k)). A teacher row integrates the ODE
from each x_src with NFE Euler steps; a student row is one network call at the knob (`oftsr.student_output`).
Student rows carry solver "knob <tau>" so (model, solver, nfe) stays a row's key.
"""
from __future__ import annotations

import time

import torch

from .. import metrics, plots, storage
from ..config import ConfigError, PipelineConfig
from ..metrics.sr import lpips_available, sr_row
from ..nets import count_params
from ..rng import draw_seed
from ..sr import degrade, lift, measure, source
from ..sr_sample import STUDENT, knob_output  # (knob_output re-exported)
from ..velocity import VelocityModel, generate
from .base import Context, Stage, StageOutput, dataset, default_device, heldout

GRID_IMAGES = 8  # held-out images per column of the comparison grid


def knob_solver(knob: float) -> str:
    return f"knob {knob:g}"


def check(cfg: PipelineConfig) -> None:
    """Refused before any work: LPIPS asked for without its weights on disk."""
    if cfg.eval.lpips and not lpips_available():
        raise ConfigError("eval.lpips: LPIPS needs the `lpips` package and its backbone weights on disk "
                          "(reflow_core.distill.lpips_weights_path names the file); they are never downloaded here")


def inputs_for(cfg: PipelineConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_true (N, C, H, W), y (N, C, h, w), c = A^T y, sources (K, N, C, H, W)) of the held-out split."""
    ec, sr = cfg.eval, cfg.data.sr
    test = heldout(cfg)
    x = test.x[: min(len(test), max(1, ec.n_samples // ec.draws))]
    n = torch.randn(degrade(x, sr.scale, sr.degradation).shape, generator=torch.Generator().manual_seed(ec.seed))
    y = measure(x, n, sr.scale, sr.degradation, sr.sigma_y)
    c = lift(y, sr.scale, sr.degradation)
    src = torch.stack([source(c, torch.randn(x.shape, generator=torch.Generator().manual_seed(draw_seed(ec.seed, k))),
                              sr.sigma_p) for k in range(ec.draws)])
    return x, y, c, src


def run(stage: Stage, ctx: Context, models: dict[str, VelocityModel], ckpts: dict[str, str]) -> dict:
    """The rows, plots and metrics.json content of an SR evaluation (the evaluate stage writes it)."""
    cfg, cb, ec, sr = ctx.cfg, ctx.callback, ctx.cfg.eval, ctx.cfg.data.sr
    check(cfg)
    dev = default_device(ctx.device)
    x, y, c, src = inputs_for(cfg)
    ref = metrics.reference_for(dataset(cfg), x, storage.join(ctx.rundir.root, "_cache"),
                                inception_weights=ec.inception_weights)
    lpips_net = "alex" if ec.lpips else None
    cs = c.repeat(ec.draws, 1, 1, 1)  # the condition of every flattened (draw, image) source row
    flat = src.reshape(-1, *x.shape[1:])

    def degrade_fn(z):
        return degrade(z, sr.scale, sr.degradation)

    settings = [(name, n, None) for name in models if name != STUDENT for n in ec.nfes]  # flows: ODE at each NFE
    settings += [(name, 1, k) for name in models if name == STUDENT for k in ec.knobs]  # OFTSR's student: knobs
    rows, shown = [], {}
    for name, model in models.items():
        s = float(metrics.straightness(model.solver_velocity(None, cond=c.to(dev)), src[0].to(dev),
                                       steps=ec.straightness_steps))
        cb.on_metrics(stage.name, 0, {f"{name}_params": float(count_params(model))})
        for _, nfe, knob in (t for t in settings if t[0] == name):
            t0 = time.perf_counter()
            if knob is None:
                out = generate(model, flat, nfe, "euler", cond=cs, device=dev)
            else:
                out = knob_output(model, flat, cs, knob)
            row = {"model": name, "params": count_params(model), "nfe": nfe,
                   "solver": "euler" if knob is None else knob_solver(knob), "straightness": s,
                   **({} if knob is None else {"knob": knob}),
                   **sr_row(out.reshape(src.shape), x, y, degrade_fn, reference=ref, lpips_net=lpips_net),
                   "seconds": time.perf_counter() - t0, "steps": nfe, "grid": "uniform", "rho": 1.0,
                   "guidance": "none", "guidance_weight": 1.0}
            rows.append(row)
            shown[(name, row["solver"], nfe)] = out[:GRID_IMAGES]
            cb.on_metrics(stage.name, nfe, {f"{name}_{row['solver'].replace(' ', '')}_{k}": v for k, v in row.items()
                                            if isinstance(v, float) and k not in ("seconds", "rho", "guidance_weight")})
            cb.on_progress(stage.name, len(rows), len(settings))
    paths = _plots(cfg, stage, rows, shown, x[:GRID_IMAGES], c[:GRID_IMAGES], ref.metric)
    return {"rows": rows, "metric": ref.metric, "checkpoints": ckpts, "plots": paths}


def _plots(cfg, stage, rows, shown, truth, cond, metric) -> list[str]:
    teacher = [r | {"fd": r[metric]} for r in rows if "knob" not in r]
    student = [r | {"fd": r[metric]} for r in rows if "knob" in r]
    out = [plots.fidelity_realism(teacher, student, storage.join(stage.writes, "fidelity_realism.png"),
                                  title=f"{cfg.name}: PSNR vs {metric} (held out)")]
    order = [k for k in shown if k[1] == "euler"] + [k for k in shown if k[1] != "euler"]
    grid = torch.cat([cond, truth, *[shown[k] for k in order]])
    names = ["low-res input", "truth"] + [f"{m} {s if s != 'euler' else f'NFE {n}'}" for m, s, n in order]
    labels = "\n".join(", ".join(names[i:i + 3]) for i in range(0, len(names), 3))  # rows, top to bottom
    out.append(plots.sample_grid(grid, storage.join(stage.writes, "sr_grid.png"), nrow=truth.shape[0],
                                 title=f"rows, top to bottom:\n{labels}"))
    return out


__all__ = ["run", "check", "inputs_for", "knob_output", "knob_solver"]
