"""Stage `distill`: a one-step student x_data_hat = x_noise - v_s(x_noise, t=1) trained on pairs simulated by the
last reflow model (Liu et al.'s k = 1 distillation, InstaFlow), optionally with SlimFlow's flow-guided term; the
student is the reflow model's EMA (same size: model `distilled`) or the annealed smaller net (model `slim`).
With reflow.rounds = 0 "the last reflow model" is the teacher itself and the pairs are its store (`pairs`).
distill.method = oftsr (super-resolution) reads no store: OFTSR's knob student u(x_src, tau, c) = v_s(x_src, 1 - tau,
c), initialised from the teacher, is trained on the teacher's ODE along fresh sources (`reflow_core.oftsr`).

reads:  {"pairs": distill-pairs (rounds 0: pairs; oftsr: none), "teacher": the last reflow stage (rounds 0:
         teacher), "init": that stage, or anneal (smaller student)}
writes: <run>/distill/ckpt-<step>.pt + latest.json
output: {"model": checkpoint URL}
"""
from __future__ import annotations

from .. import checkpoint
from ..distill import slim_distill_loss
from ..oftsr import oftsr_loss, sample_knob, student_from_velocity
from ..train import train
from ..velocity import velocity_model_from_state
from .base import Context, Stage, StageOutput, dataset, default_device, load_model
from .batches import checked_pairs, pair_batches, sr_batches


def done(stage: Stage, ctx: Context) -> bool:
    return checkpoint.reached(stage.writes, ctx.cfg.distill.train.steps)


def run(stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> StageOutput:
    cfg, dc = ctx.cfg, ctx.cfg.distill
    if dc.method == "oftsr":
        return run_oftsr(stage, ctx, inputs)
    teacher_ckpt = inputs["teacher"].urls["model"]
    store = checked_pairs(stage, ctx, inputs, teacher_ckpt, done(stage, ctx))
    dev = default_device(ctx.device)
    init = checkpoint.load(inputs["init"].urls["model"])
    student = velocity_model_from_state(init, ema=True).train()
    teacher = load_model(teacher_ckpt, device=dev).requires_grad_(False) if dc.fgd_weight > 0 else None
    tc = dc.train

    def loss_fn(m, batch, step, gen):
        return slim_distill_loss(m, teacher, batch, gen, fgd_weight=dc.fgd_weight, t_range=dc.fgd_t,
                                       distance=dc.distance, huber_scale=tc.huber_scale)

    with pair_batches(store, student, tc, 0.0, cfg.reflow.ram_budget_mb) as (batches, mode):
        url = train(net=student, batches=batches, cfg=tc, ckpt_dir=stage.writes, stage=stage.name,
                    meta=init["meta"], callback=ctx.callback, device=dev, loss_fn=loss_fn)
    return StageOutput({"model": url}, {"sampler": mode})


def run_oftsr(stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> StageOutput:
    """OFTSR's student: per step, fresh (x_HR, c, x_src) from the training split (`sr_batches`), knob values
    tau ~ U[0, 1 - knob_delta] from the step's generator, and the trajectory + boundary loss against the frozen
    teacher."""
    cfg, dc, tc = ctx.cfg, ctx.cfg.distill, ctx.cfg.distill.train
    dev = default_device(ctx.device)
    init = checkpoint.load(inputs["init"].urls["model"])
    student = velocity_model_from_state(init, ema=True).train()
    teacher = load_model(inputs["teacher"].urls["model"], device=dev).requires_grad_(False)

    def loss_fn(m, batch, step, gen):
        tau = sample_knob(batch.x_noise.shape[0], dc.knob_delta, gen).to(batch.x_noise.device)
        return oftsr_loss(student_from_velocity(lambda x, t, c: m(x, t, None, c)),
                          lambda x, t, c: teacher(x, t, None, c), batch.x_noise, batch.cond, tau,
                          delta=dc.knob_delta, boundary_weight=dc.boundary_weight, distance=dc.distance,
                          huber_scale=tc.huber_scale)

    url = train(net=student, batches=sr_batches(dataset(cfg), tc, cfg.data.sr), cfg=tc, ckpt_dir=stage.writes,
                stage=stage.name, meta=init["meta"], callback=ctx.callback, device=dev, loss_fn=loss_fn)
    return StageOutput({"model": url})
