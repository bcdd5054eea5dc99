"""Stage `reflow` (`reflow-r` in round r): fine-tune a model on stored pairs, regressing the straight line between
each (noise, sample) pair (2-rectified flow; round r gives the (r+1)-rectified flow).

reads:  {"pairs": the round's pair store, "init": the model that simulated them (teacher, or reflow-(r-1))}
writes: <run>/reflow/ckpt-<step>.pt + latest.json (round r > 1: reflow-r/)
output: {"model": checkpoint URL}

Batches are a function of the step (`PairSampler.batch`), so a resumed run trains on exactly the batches an
uninterrupted run would have.
"""
from __future__ import annotations

import torch

from .. import checkpoint, distributed
from ..nets import set_dropout
from ..pairs import PairSampler
from ..train import Batch, train
from . import pairs as pairs_stage
from .base import Context, Stage, StageOutput, dataset, default_device, load_model, model_meta, round_seed


def done(stage: Stage, ctx: Context) -> bool:
    info = checkpoint.latest_info(stage.writes)
    return info is not None and info.step >= ctx.cfg.reflow.train.steps


def run(stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> StageOutput:
    cfg = ctx.cfg
    rc = cfg.reflow.train.model_copy(update={"seed": round_seed(cfg.reflow.train.seed, stage.round)})
    init_ckpt, pairs_url = inputs["init"].urls["model"], inputs["pairs"].urls["pairs"]
    pairs_name = stage.inputs["pairs"]
    # shard hashes are checked once, before training reads the pairs
    store = pairs_stage.check_store(pairs_url, pairs_name, verify=not done(stage, ctx))
    if store.attrs.get("teacher_hash") != pairs_stage.model_hash(init_ckpt):
        raise RuntimeError(f"pairs at {pairs_url} were made by another model than {init_ckpt}; refusing to mix "
                           f"them (rerun with --redo-stage {pairs_name})")
    if rc.nproc > 1 and not distributed.under_torchrun():  # DDP: torchrun runs this stage on every rank
        url = distributed.launch_torchrun(rc.nproc, stage.name, cfg.model_dump_json(), ctx.paths.dir, stage.writes)
        return StageOutput({"model": url})
    ds = dataset(cfg)
    model = load_model(init_ckpt, ema=True).train()
    if cfg.reflow.dropout is not None:
        set_dropout(model, cfg.reflow.dropout)
    net_cfg = cfg.net.model_copy(update={"dropout": cfg.reflow.dropout}) if cfg.reflow.dropout is not None else None
    sampler = PairSampler(store, rc.batch_size, forward_ratio=cfg.reflow.forward_ratio, seed=rc.seed,
                          ram_budget_bytes=cfg.reflow.ram_budget_mb * 2**20)

    def batches(key: int) -> Batch:  # key = step (under DDP: step * world_size + rank)
        b = sampler.batch(key)
        label = b.label if model.class_cond else None
        if label is not None and rc.label_dropout > 0:
            label = model.drop_labels(label, rc.label_dropout, torch.Generator().manual_seed(rc.seed * 7_919 + key))
        return Batch(b.sample, b.noise, label)

    try:
        url = train(net=model, batches=batches, cfg=rc, ckpt_dir=stage.writes, stage=stage.name,
                    meta=model_meta(cfg, ds, net_cfg), callback=ctx.callback, device=default_device(ctx.device))
    finally:
        sampler.close()
    return StageOutput({"model": url}, {"sampler": sampler.mode})
