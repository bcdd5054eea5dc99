"""Stage `reflow` (`reflow-r` in round r): fine-tune a model on stored pairs, regressing the straight line between
each (noise, sample) pair (2-rectified flow; round r gives the (r+1)-rectified flow).

reads:  {"pairs": the round's pair store, "init": the model that simulated them (teacher, or reflow-(r-1))}
writes: <run>/reflow/ckpt-<step>.pt + latest.json (round r > 1: reflow-r/)
output: {"model": checkpoint URL}

Batches are a function of the step (`PairSampler.batch`), so a resumed run trains on exactly the batches an
uninterrupted run would have.
"""
from __future__ import annotations

import contextlib

import torch

from .. import checkpoint, distributed
from ..config import TrainConfig
from ..nets import set_dropout
from ..pairs import PairSampler, PairStore
from ..train import Batch, train
from ..velocity import velocity_model_from_state
from . import pairs as pairs_stage
from .base import Context, Stage, StageOutput, default_device, round_seed


def done(stage: Stage, ctx: Context) -> bool:
    info = checkpoint.latest_info(stage.writes)
    return info is not None and info.step >= ctx.cfg.reflow.train.steps


def run(stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> StageOutput:
    cfg = ctx.cfg
    rc = cfg.reflow.train.model_copy(update={"seed": round_seed(cfg.reflow.train.seed, stage.round)})
    init_ckpt = inputs["init"].urls["model"]
    store = checked_pairs(stage, ctx, inputs, init_ckpt, done(stage, ctx))
    if rc.nproc > 1 and not distributed.under_torchrun():  # DDP: torchrun runs this stage on every rank
        url = distributed.launch_torchrun(rc.nproc, stage.name, cfg.model_dump_json(), ctx.paths.dir, stage.writes)
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


def checked_pairs(stage: Stage, ctx: Context, inputs: dict[str, StageOutput], simulated_by: str,
                  finished: bool) -> PairStore:
    """The stage's pair store (input role "pairs"), complete, re-hashed once before training reads it (not when the
    stage is finished), and made by the checkpoint `simulated_by` (pairs are never mixed across models)."""
    url, name = inputs["pairs"].urls["pairs"], stage.inputs["pairs"]
    store = pairs_stage.check_store(url, name, verify=not finished)
    if store.attrs.get("teacher_hash") != pairs_stage.model_hash(simulated_by):
        raise RuntimeError(f"pairs at {url} were made by another model than {simulated_by}; refusing to mix them "
                           f"(rerun with --redo-stage {name})")
    return store


@contextlib.contextmanager
def pair_batches(store: PairStore, model, tc: TrainConfig, forward_ratio: float, ram_budget_mb: int):
    """(batches, sampler mode): `batches(key)` is the training Batch of key = step (under DDP step * world + rank),
    a pure function of the store, tc.seed and the key: stored sample as data, stored noise as noise, labels (with
    CFG label dropout) when the model is class-conditional."""
    sampler = PairSampler(store, tc.batch_size, forward_ratio=forward_ratio, seed=tc.seed,
                          ram_budget_bytes=ram_budget_mb * 2**20)

    def batches(key: int) -> Batch:
        b = sampler.batch(key)
        label = b.label if model.class_cond else None
        if label is not None and tc.label_dropout > 0:
            label = model.drop_labels(label, tc.label_dropout, torch.Generator().manual_seed(tc.seed * 7_919 + key))
        return Batch(b.sample, b.noise, label)

    try:
        yield batches, sampler.mode
    finally:
        sampler.close()
