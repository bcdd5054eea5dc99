"""Stage `reflow` (`reflow-r` in round r): fine-tune a model on stored pairs, regressing the straight line between
each (noise, sample) pair (2-rectified flow; round r gives the (r+1)-rectified flow).

reads:  {"pairs": the round's pair store, "init": the model that simulated them (teacher, or reflow-(r-1))}
writes: <run>/reflow/ckpt-<step>.pt + latest.json (round r > 1: reflow-r/)
output: {"model": checkpoint URL}

Batches are a function of the step (`batches.pair_batches`), so a resumed run trains on exactly the batches an
uninterrupted run would have. A super-resolution run's store is conditional: its batches carry each row's stored
condition (`Batch.cond`), so the model is fine-tuned as v(x, t, c).
"""
from __future__ import annotations

from .. import checkpoint, distributed
from ..nets import set_dropout
from ..train import train
from ..velocity import velocity_model_from_state
from ..rng import round_seed
from .base import Context, Stage, StageOutput, default_device
from .batches import checked_pairs, pair_batches


def done(stage: Stage, ctx: Context) -> bool:
    return checkpoint.reached(stage.writes, ctx.cfg.reflow.train.steps)


def run(stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> StageOutput:
    cfg = ctx.cfg
    rc = cfg.reflow.train.model_copy(update={"seed": round_seed(cfg.reflow.train.seed, stage.round)})
    init_ckpt = inputs["init"].urls["model"]
    store = checked_pairs(stage, ctx, inputs, init_ckpt, done(stage, ctx))
    if rc.nproc > 1 and not distributed.under_torchrun():  # DDP: torchrun runs this stage on every rank
        url = distributed.launch_torchrun(rc.nproc, stage.name, cfg.model_dump_json(), ctx.rundir.dir, stage.writes)
        return StageOutput({"model": url})
    init = checkpoint.load(init_ckpt)
    model, meta = velocity_model_from_state(init, ema=True).train(), dict(init["meta"])
    if cfg.reflow.dropout is not None:  # Simple ReFlow #4; recorded in the meta, so the checkpoint rebuilds as trained
        set_dropout(model, cfg.reflow.dropout)
        if "dropout" in meta["net"]:
            meta["net"] = {**meta["net"], "dropout": cfg.reflow.dropout}
    with pair_batches(store, model, rc, cfg.reflow.forward_ratio, cfg.reflow.ram_budget_mb) as (batches, mode):
        url = train(net=model, batches=batches, cfg=rc, ckpt_dir=stage.writes, stage=stage.name, meta=meta,
                    callback=ctx.callback, device=default_device(ctx.device))
    return StageOutput({"model": url}, {"sampler": mode})

