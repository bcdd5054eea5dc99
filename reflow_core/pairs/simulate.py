"""Pair simulation: one shard of the plan integrated by the teacher and written to the PairStore.

Backward shards integrate per-row seeded noise 1 -> 0 (`solvers.sample`); forward shards invert real data 0 -> 1
(`solvers.invert`). A conditional store's rows integrate from (or invert to) super-resolution sources under their
image condition (`cond.py`). A background writer stores chunk-aligned pieces while the next batch integrates; the
shard's done marker is written only after all of its data, so an interrupted shard is simply redone (bit-identical
values).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Sequence

import numpy as np
import torch

from .. import cores, solvers
from ..config import PairsConfig
from ..rng import forward_indices, row_labels, row_noise
from ..solvers import Velocity
from .cond import backward_rows, condition
from .errors import PairStoreMismatch, redo_hint
from .layout import BACKWARD, COND, FORWARD, GUIDANCE_ATTRS, NOISE_RNG, Hasher, Shard
from .store import PairStore

# velocity_for(labels on the device, or None for unconditional teachers) -> the batch's (x, t) -> v; for a
# conditional store velocity_for(labels, cond), cond the batch's image condition on the device
VelocityFor = Callable[..., Velocity]


def solver_attrs(cfg: PairsConfig) -> dict:
    """The simulation settings a store records (and a reopening config must match): solver, NFE, grid, rho, seed,
    and with pairs.guidance=cfg the guidance and its weight (absent when unguided, so an unguided store's attrs are
    what they were before guidance existed; IDENTITY_ATTRS compares a key present on either side)."""
    g = cfg.grid.solver_args(cfg.nfe)
    guided = {"guidance": cfg.guidance, "guidance_weight": cfg.guidance_weight} if cfg.guidance != "none" else {}
    return {"solver": cfg.solver, "nfe": cfg.nfe, "grid": g["grid"], "rho": g["rho"], "seed": cfg.seed, **guided}


def store_for_config(url: str, cfg: PairsConfig, *, shape: Sequence[int], teacher_hash: str,
                     extra_attrs: dict | None = None, storage_options: dict | None = None,
                     cond: dict | None = None) -> PairStore:
    """`PairStore.create` with the counts, sizes, dtype and solver attrs of a run's pairs settings (and a conditional
    store's `cond` attrs, `cond.cond_attrs`)."""
    attrs = {"teacher_hash": teacher_hash, **solver_attrs(cfg), **(extra_attrs or {})}
    return PairStore.create(url, shape=shape, n_backward=cfg.n_pairs, n_forward=cfg.n_forward,
                            chunk_size=cfg.chunk_size, shard_size=cfg.shard_size, dtype=cfg.dtype, attrs=attrs,
                            storage_options=storage_options, zarr_shards=cfg.zarr_shards, compress=cfg.compress,
                            cond=cond)


class _ShardWriter:
    """One background thread writing chunk-aligned pieces of a shard while the next batch integrates."""

    def __init__(self, store: PairStore, shard: Shard, max_queue: int = 2):
        self.store, self.shard = store, shard
        self.q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.hasher = Hasher(store.array_names)
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_start = shard.start
        self._pending_rows = 0
        self.written = 0
        self.thread = threading.Thread(target=self._run, name=f"pairs-writer-{shard.index}", daemon=True)
        self.thread.start()

    def put(self, start: int, noise, sample, label, direction, cond=None) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((start, noise, sample, label, direction, cond))

    def _flush(self, final: bool) -> None:
        if not self._pending_rows:
            return
        if not final and self.store.attrs.get("zarr_shards"):
            return  # one zarr shard object per pair shard: write it once, at the end
        end = self._pending_start + self._pending_rows
        c = self.store.chunk_size
        upto = end if final else self._pending_start + ((end - self._pending_start) // c) * c
        # shard starts are chunk-aligned, so multiples of c past the start are chunk boundaries
        if upto <= self._pending_start:
            return
        cat = {k: np.concatenate([p[k] for p in self._pending]) if len(self._pending) > 1 else self._pending[0][k]
               for k in self.store.array_names}
        n_write = upto - self._pending_start
        self.store.write_arrays(self._pending_start, {k: v[:n_write] for k, v in cat.items()})
        self.written += n_write
        rest = {k: v[n_write:] for k, v in cat.items()}
        self._pending_start, self._pending_rows = upto, self._pending_rows - n_write
        self._pending = [rest] if self._pending_rows else []

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                if self.error is None:
                    try:
                        self._flush(final=True)
                    except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                        self.error = e
                return
            if self.error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            try:
                start, noise, sample, label, direction, cond = item
                if start != self._pending_start + self._pending_rows:
                    raise RuntimeError(f"out-of-order rows: expected {self._pending_start + self._pending_rows}, "
                                       f"got {start}")
                arrays = self.store.to_arrays(noise, sample, label, direction, cond)
                self.hasher.update(arrays)
                self._pending.append(arrays)
                self._pending_rows += int(noise.shape[0])
                self._flush(final=False)
            except BaseException as e:  # noqa: BLE001
                self.error = e

    def finish(self) -> dict[str, str]:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.written != self.shard.rows:
            raise RuntimeError(f"shard {self.shard.index}: wrote {self.written} rows, expected {self.shard.rows}")
        return self.hasher.digests()

    def abort(self) -> None:
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass


def _check_cfg(store: PairStore, cfg: PairsConfig) -> None:
    a, want = store.attrs, solver_attrs(cfg)
    diff = {k: (a[k], want[k]) for k in want if k in a and a[k] != want[k]}
    diff |= {k: (a.get(k), want.get(k)) for k in GUIDANCE_ATTRS if a.get(k) != want.get(k)}
    if diff:
        raise PairStoreMismatch(f"pairs config differs from the store at {store.url}: "
                                + ", ".join(f"{k}: store={s!r} cfg={c!r}" for k, (s, c) in diff.items()))
    if a.get("noise_rng") != NOISE_RNG:
        raise PairStoreMismatch(
            f"the pair store at {store.url} has noise_rng={a.get('noise_rng')!r}, this code draws noise with "
            f"{NOISE_RNG!r}: simulating its pending shards would mix two noise definitions; simulate the store "
            f"again ({redo_hint(store.url)})")


def simulate_shard(store: PairStore, shard: Shard | int, velocity_for: VelocityFor, *, cfg: PairsConfig,
                   data_x: torch.Tensor | None = None, data_y: torch.Tensor | None = None, num_classes: int = 0,
                   device: str | torch.device = "cpu",
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Simulate one shard's pairs and write them; a shard already marked done is skipped.

    Backward shard: per-row noise (and labels if num_classes > 0) integrated 1 -> 0 by `solvers.sample`.
    Forward shard: real rows data_x[perm[j]] inverted 0 -> 1 by `solvers.invert` (labels data_y[perm[j]]).

    `velocity_for(labels)` is called once per batch of cfg.batch_size rows and returns that batch's velocity in
    the solvers' signature `v(x, t)`: labels are the batch's class labels as a long tensor on `device` when
    num_classes > 0, else None (unconditional teacher), so the caller binds them, e.g.
    `lambda lab: (lambda x, t: net(x, t, lab))`. Stored labels: backward rows the seeded labels when num_classes > 0
    (else -1), forward rows data_y's (-1 without data_y).

    A conditional store (attrs["cond"]): every row is made from a real row of data_x (`cond.py`), so data_x is
    needed for backward shards too; `velocity_for(labels, cond)` gets the batch's conditions on `device` as well,
    and rows keep their real row's label (data_y's, when num_classes > 0)."""
    shard = store.plan[shard] if isinstance(shard, int) else shard
    if shard.index in store.done_shards():
        return {"shard": shard.index, "skipped": True, "rows": shard.rows}
    _check_cfg(store, cfg)
    cond = store.attrs.get(COND)
    if (shard.direction == FORWARD or cond is not None) and data_x is None:
        raise ValueError(f"shard {shard.index} holds {'forward' if cond is None else 'conditional'} pairs: pass "
                         "data_x (the real data) to simulate_shard")
    seed, grid = cfg.seed, cfg.grid.solver_args(cfg.nfe)
    t0 = time.perf_counter()
    writer = _ShardWriter(store, shard)
    share = cores.Share(f"pairs-shard-{shard.index}")  # this process's share of the host's cores, per batch
    done = 0
    try:
        for b0 in range(shard.start, shard.stop, cfg.batch_size):
            share.tick(done)
            b1 = min(b0 + cfg.batch_size, shard.stop)
            rows = range(b0, b1)
            c = None
            if shard.direction == BACKWARD and cond is None:
                x0 = row_noise(seed, rows, store.shape)
                labels = row_labels(seed, rows, num_classes) if num_classes > 0 else None
            elif shard.direction == BACKWARD:
                idx, x0, c = backward_rows(cond, seed, rows, data_x)
                labels = data_y[idx].to(torch.long) if (data_y is not None and num_classes > 0) else None
            else:
                idx = forward_indices(seed, range(b0 - store.n_backward, b1 - store.n_backward), len(data_x))
                x0 = data_x[idx].to(torch.float32)
                labels = data_y[idx].to(torch.long) if data_y is not None else None
                c = None if cond is None else condition(cond, seed, rows, x0)
            lab_dev = labels.to(device) if (labels is not None and num_classes > 0) else None
            v = velocity_for(lab_dev) if c is None else velocity_for(lab_dev, c.to(device))
            with torch.no_grad():
                xd = x0.to(device)
                if shard.direction == BACKWARD:
                    out = solvers.sample(v, xd, cfg.nfe, cfg.solver, grid["grid"], grid["rho"]).float().cpu()
                    noise, sample = x0, out
                else:
                    out = solvers.invert(v, xd, cfg.nfe, cfg.solver, grid["grid"], grid["rho"]).float().cpu()
                    noise, sample = out, x0
            writer.put(b0, noise, sample, labels, shard.direction, c)
            done += b1 - b0
            if progress is not None:
                progress(done, shard.rows)
        digests = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        share.close()
    seconds = time.perf_counter() - t0
    store.mark_done(shard, digests, {"seconds": seconds, "solver": cfg.solver, "nfe": cfg.nfe})
    return {"shard": shard.index, "rows": shard.rows, "seconds": seconds,
            "pairs_per_s": shard.rows / max(seconds, 1e-9), "skipped": False}
