"""Stage `anneal` (SlimFlow's Annealing Reflow, only with a smaller `distill.net`): a small student trained from
random init on the distill pairs, flow matching from a source that starts as fresh noise and is annealed into the
stored noise (beta 1 -> 0 over distill.anneal.steps), so the small net first learns a flow of its own and ends on
the reflow coupling.

reads:  {"pairs": distill-pairs (rounds 0: pairs), "teacher": the last reflow stage, or the teacher (it simulated them)}
writes: <run>/anneal/ckpt-<step>.pt + latest.json
output: {"model": checkpoint URL}
"""
from __future__ import annotations

from .. import checkpoint
from ..distill import anneal_batch
from ..losses import HighPass
from ..train import flow_matching_loss, train
from .base import Context, Stage, StageOutput, dataset, default_device, model_meta, new_model
from .batches import checked_pairs, pair_batches


def done(stage: Stage, ctx: Context) -> bool:
    return checkpoint.reached(stage.writes, ctx.cfg.distill.anneal.train.steps)


def run(stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> StageOutput:
    cfg, dc = ctx.cfg, ctx.cfg.distill
    ac = dc.anneal
    store = checked_pairs(stage, ctx, inputs, inputs["teacher"].urls["model"], done(stage, ctx))
    ds = dataset(cfg)
    model = new_model(cfg.model_copy(update={"net": dc.net}), ds, ac.train.seed)
    hpf = HighPass(ac.train.hpf) if ac.train.hpf > 0 else None

    def loss_fn(m, batch, step, gen):  # the source is annealed by the step: a function of (seed, step) as batches are
        mixed = anneal_batch(batch, step, ac.steps, ac.schedule, gen, ac.flip)
        return flow_matching_loss(m, mixed, ac.train, gen, hpf)

    with pair_batches(store, model, ac.train, 0.0, cfg.reflow.ram_budget_mb) as (batches, mode):
        url = train(net=model, batches=batches, cfg=ac.train, ckpt_dir=stage.writes, stage=stage.name,
                    meta=model_meta(cfg, ds, dc.net), callback=ctx.callback, device=default_device(ctx.device),
                    loss_fn=loss_fn)
    return StageOutput({"model": url}, {"sampler": mode})
