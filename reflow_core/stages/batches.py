"""The training batches the stage kinds share: the teacher's from real data, the others' from a checked pair store.

Every `batches(key)` is a pure function of (data or store, seed, key), key = step (under DDP step * world + rank),
so a resumed run trains on exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..config import SRConfig, TrainConfig
from ..data import DataSet
from ..pairs import PairSampler, PairStore
from ..rng import batch_seed
from ..sr import draw
from ..train import Batch
from ..velocity import VelocityModel
from .base import Context, Stage, StageOutput
from .pairs import check_conditional, check_store, model_hash


def teacher_batches(ds: DataSet, model: VelocityModel, tc: TrainConfig, class_cond: bool) -> Callable[[int], Batch]:
    """`batches(step)`: real data indices, fresh N(0, I) noise and (CFG-dropped) labels drawn from a generator
    seeded by (tc.seed, step): the independent coupling of a 1-rectified flow."""
    y = ds.y if class_cond else None

    def batches(step: int) -> Batch:
        g = torch.Generator().manual_seed(batch_seed(tc.seed, step))
        idx = torch.randint(len(ds), (tc.batch_size,), generator=g)
        label = None if y is None else model.drop_labels(y[idx], tc.label_dropout, g)
        return Batch(ds.x[idx], torch.randn((tc.batch_size, *ds.shape), generator=g), label)

    return batches


def sr_batches(ds: DataSet, tc: TrainConfig, sr: SRConfig) -> Callable[[int], Batch]:
    """`batches(step)` of super-resolution (data.sr): HR rows as data, their sources
    sqrt(1 - sigma_p^2) c + sigma_p eps as noise and c = A^T (A x + sigma_y n) as the condition, all drawn from a
    generator seeded by (tc.seed, step) (`sr.draw`)."""

    def batches(step: int) -> Batch:
        g = torch.Generator().manual_seed(batch_seed(tc.seed, step))
        x = ds.x[torch.randint(len(ds), (tc.batch_size,), generator=g)]
        _, c, x_src = draw(x, sr.scale, sr.degradation, sr.sigma_y, sr.sigma_p, g)
        return Batch(x, x_src, None, c)

    return batches


def checked_pairs(stage: Stage, ctx: Context, inputs: dict[str, StageOutput], simulated_by: str,
                  finished: bool) -> PairStore:
    """The stage's pair store (input role "pairs"), complete, re-hashed once before training reads it (not when the
    stage is finished), and made by the checkpoint `simulated_by` (pairs are never mixed across models)."""
    url, name = inputs["pairs"].urls["pairs"], stage.inputs["pairs"]
    store = check_store(url, name, verify=not finished)
    if store.attrs.get("teacher_hash") != model_hash(simulated_by):
        raise RuntimeError(f"pairs at {url} were made by another model than {simulated_by}; refusing to mix them "
                           f"(rerun with --redo-stage {name})")
    return store


@contextlib.contextmanager
def pair_batches(store: PairStore, model, tc: TrainConfig, forward_ratio: float, ram_budget_mb: int):
    """(batches, sampler mode): `batches(key)` is the training Batch of key = step (under DDP step * world + rank),
    a pure function of the store, tc.seed and the key: stored sample as data, stored noise as noise, labels (with
    CFG label dropout) when the model is class-conditional, the stored condition as `cond` when the model is
    conditioned on an image (a conditional store; `check_conditional` refuses a mismatch before any batch)."""
    check_conditional(store, model)
    sampler = PairSampler(store, tc.batch_size, forward_ratio=forward_ratio, seed=tc.seed,
                          ram_budget_bytes=ram_budget_mb * 2**20)

    def batches(key: int) -> Batch:
        b = sampler.batch(key)
        label = b.label if model.class_cond else None
        if label is not None and tc.label_dropout > 0:
            label = model.drop_labels(label, tc.label_dropout, torch.Generator().manual_seed(batch_seed(tc.seed, key)))
        return Batch(b.sample, b.noise, label, b.cond)

    try:
        yield batches, sampler.mode
    finally:
        sampler.close()
