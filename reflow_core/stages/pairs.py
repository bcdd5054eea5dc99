"""Stage `pairs` (`pairs-r` in round r): integrate a model's ODE from per-row seeded noise to data (backward pairs)
and real data back to noise (forward pairs), into a sharded zarr store.

reads:  {"model": the stage whose model simulates: teacher in round 1, reflow-(r-1) in round r}
writes: <run>/pairs.zarr (round r > 1: pairs-r.zarr); one shard = one task of the Prefect fan-out
output: {"pairs": store URL}

The store records the hash of the simulating checkpoint, so pairs are never mixed across models, and the guidance
(pairs.guidance=cfg: InstaFlow's guided pairs), so guided and unguided pairs never mix; a retried shard writes
identical values (noise is seeded per row, `reflow_core.pairs`). A super-resolution run (data.sr) makes a conditional
store: each row's source, its condition c = A^T y (array `cond`) and data.sr's settings in its identity
(`reflow_core.pairs.cond`).
"""
from __future__ import annotations

import torch

from .. import accel, solvers, storage
from ..config import ConfigError, PairsConfig
from ..pairs import (PairStore, PairStoreCorrupt, PairStoreMismatch, check_layout, cond_attrs, simulate_shard,
                     redo_hint, store_for_config, verify_pairs)
from ..rng import round_seed
from ..velocity import velocity_for
from .base import Context, Stage, StageOutput, dataset, load_model


def pairs_config(stage: Stage, ctx: Context) -> PairsConfig:
    """The pairs settings of this round (round r > 1 draws its own noise)."""
    pc = ctx.cfg.pairs
    return pc if stage.round <= 1 else pc.model_copy(update={"seed": round_seed(pc.seed, stage.round)})


def check_settings(pc: PairsConfig) -> None:
    """The pair store's layout rules on a run's pairs settings (ConfigError), checked when the plan is made."""
    try:
        check_layout(n_backward=pc.n_pairs, n_forward=pc.n_forward, chunk_size=pc.chunk_size,
                     shard_size=pc.shard_size, dtype=pc.dtype, zarr_shards=pc.zarr_shards)
    except ValueError as e:
        raise ConfigError(f"pairs: {e}") from None


def model_hash(url: str) -> str:
    return storage.sha256(storage.read_bytes(url))


def done(stage: Stage, ctx: Context) -> bool:
    return PairStore.exists(stage.writes) and PairStore.open(stage.writes).is_complete()


def open_store(stage: Stage, ctx: Context, model_ckpt: str) -> PairStore:
    """Create the store (or reopen it, refusing one written by another model or with other settings); conditional
    (attrs["cond"], array `cond`) for a super-resolution run."""
    shape, sr = tuple(dataset(ctx.cfg).shape), ctx.cfg.data.sr
    try:
        return store_for_config(stage.writes, pairs_config(stage, ctx), shape=shape,
                                teacher_hash=model_hash(model_ckpt),
                                extra_attrs={"teacher_checkpoint": model_ckpt, "stage": stage.name},
                                cond=None if sr is None else cond_attrs(sr, shape))
    except PairStoreMismatch as e:  # e.g. teacher.checkpoint now holds another teacher: never mix its pairs in
        raise PairStoreMismatch(f"{e}\nrerun with --redo-stage {stage.name} to simulate them again") from None


def pending(stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> list[int]:
    """Create the store if needed; the shards still to simulate."""
    return open_store(stage, ctx, inputs["model"].urls["model"]).pending_shards()


def shard_device(shard: int, device=None) -> torch.device:
    """The device for pair shard k: the given one; else cuda:{k % n_gpus} when GPUs are visible (shards running
    concurrently on one machine spread over its GPUs; a Dask worker limited to one GPU sees only cuda:0); else cpu."""
    if device is not None:
        return torch.device(device)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device(f"cuda:{shard % n}") if n else torch.device("cpu")


def pair_batch_size(model, pc: PairsConfig, shape: tuple[int, ...], rows: int, device: torch.device) -> int:
    """pairs.auto_batch: the largest batch, doubling from pairs.batch_size up to pairs.max_batch_size and the
    shard's rows, for which one solver step of the model (both Heun evaluations) fits in GPU memory; off CUDA,
    pairs.batch_size as configured (`accel.find_max_batch`)."""
    limit = min(pc.max_batch_size, rows)
    if limit <= pc.batch_size:
        return limit

    @torch.no_grad()
    def one_step(b: int) -> None:
        x = torch.randn((b, *shape), device=device)
        lab = torch.zeros(b, dtype=torch.long, device=device) if model.class_cond else None
        v = model.solver_velocity(lab, guidance=pc.guidance, weight=pc.guidance_weight, cond=example_cond(model, x))
        solvers.integrate(v, x, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), pc.solver)
    return accel.find_max_batch(one_step, pc.batch_size, limit, device)


def example_cond(model, x: torch.Tensor) -> torch.Tensor | None:
    """A zero image condition for probing a conditional model on x's batch (None for a model without one)."""
    if not model.cond_channels:
        return None
    return torch.zeros((x.shape[0], model.cond_channels, *x.shape[2:]), device=x.device)


def simulate(stage: Stage, ctx: Context, inputs: dict[str, StageOutput], shard: int) -> dict:
    """One shard (a Prefect task each); a shard already marked done is skipped."""
    cb, cfg = ctx.callback, ctx.cfg
    store = PairStore.open(stage.writes)
    sh = store.plan[shard]
    if shard in store.done_shards():
        return {"shard": shard, "skipped": True}
    dev = shard_device(shard, ctx.device)
    pc = pairs_config(stage, ctx)
    model = load_model(inputs["model"].urls["model"], device=dev)
    model.amp = pc.amp  # bf16 velocity when pairs.amp; the solver keeps x in float32
    check_conditional(store, model)
    ds = dataset(cfg)
    if pc.auto_batch:  # before compiling: the compiled module is specialised to the batch it is probed with
        pc = pc.model_copy(update={"batch_size": pair_batch_size(model, pc, ds.shape, sh.rows, dev)})
        cb.on_metrics(stage.name, shard, {"batch_size": float(pc.batch_size)})
    if pc.compile:  # a compiled backbone inside the same wrapper (the loaded model keeps its state-dict keys)
        x = torch.randn((min(pc.batch_size, sh.rows), *ds.shape), device=dev)
        lab = torch.zeros(x.shape[0], dtype=torch.long, device=dev) if model.class_cond else None
        c = example_cond(model, x)
        example = (x, torch.ones(x.shape[0], device=dev), lab) + (() if c is None else (c,))
        with accel.autocast(dev, pc.amp):
            model = model.with_backbone(accel.prepare_model(model.backbone, compile=True, example=example))
    v_for = velocity_for(model, guidance=pc.guidance, weight=pc.guidance_weight, cuda_graph=pc.cuda_graph)
    out = simulate_shard(store, sh, v_for, cfg=pc, data_x=ds.x,
                         data_y=ds.y if model.class_cond else None,
                         num_classes=ds.num_classes if model.class_cond else 0, device=dev,
                         progress=lambda d, total: cb.on_progress(f"{stage.name}/shard{shard}", d, total))
    if "pairs_per_s" in out:
        cb.on_metrics(stage.name, shard, {"pairs_per_s": float(out["pairs_per_s"]), "shard_seconds": out["seconds"]})
    return out


def check_conditional(store: PairStore, model) -> None:
    """A conditional model (net.cond_channels > 0) simulates or trains on a conditional store only, and an
    unconditional one on an unconditional store only (PairStoreMismatch naming the store and --redo-stage)."""
    conditional, has = model.cond_channels > 0, store.attrs.get("cond") is not None
    if conditional != has:
        raise PairStoreMismatch(
            f"the pair store {store.url} is {'conditional' if has else 'unconditional'} (" + (
                "its rows hold an image condition" if has else "no condition array") + ") but the model "
            + ("is conditioned on an image (net.cond_channels > 0, data.sr)" if conditional else "takes no condition")
            + f"; pairs are never used across that line: rerun with {redo_hint(store.url)} to simulate them again")


def finish(stage: Stage, ctx: Context, verify: bool = False) -> StageOutput:
    """The store once every shard is done (verified before training, by the reflow stage)."""
    return StageOutput({"pairs": stage.writes}, {"rows": check_store(stage.writes, stage.name, verify).n})


def check_store(url: str, name: str, verify: bool) -> PairStore:
    """The complete store at `url` (written by stage `name`); verify=True also re-hashes every shard against its
    marker, so a truncated or corrupt chunk is caught before training reads it."""
    store = PairStore.open(url)
    missing = store.pending_shards()
    if missing:
        raise RuntimeError(f"pair store {url} is missing shards {missing}; rerun the {name} stage")
    if verify:
        bad = verify_pairs(store)
        if bad:
            raise PairStoreCorrupt(f"pair store {url} failed verification:\n  " + "\n  ".join(bad)
                                   + f"\nrerun with --redo-stage {name} (reflow run ... --redo-stage {name})")
    return store


def run(stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> StageOutput:
    """All pending shards in this process (the Prefect flow fans them out as tasks instead)."""
    todo = pending(stage, ctx, inputs)
    for i, k in enumerate(todo):
        simulate(stage, ctx, inputs, k)
        ctx.callback.on_progress(stage.name, i + 1, len(todo))
    return finish(stage, ctx)  # verified before training, by the reflow stage
