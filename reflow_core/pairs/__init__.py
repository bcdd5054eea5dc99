"""Coupled (noise, sample) pairs for ReFlow: the store, its layout, its simulation by the teacher, and the sampler.

    layout.py    constants, metadata schemas, the shard plan, layout checks, PairBatch, dtype conversion, hashing
    errors.py    the store's errors and the `--redo-stage` hint they carry
    store.py     PairStore (zarr 3 at any fsspec URL, per-shard done markers, write retries) and verification
    simulate.py  simulate_shard: one shard integrated by the teacher and written; store_for_config
    cond.py      a conditional store's rows (super-resolution): real row, measurement and source, per row
    sampler.py   PairSampler: reflow batches as a pure function of the step, from RAM or streamed from the store

Per-row noise and labels come from `reflow_core.rng`. This package depends on torch, zarr, fsspec and reflow_core's
rng/solvers/storage/sr (and the pairs settings' schema in simulate.py) only, never on training or pipeline code.
"""
from ..rng import forward_indices, row_labels, row_noise, row_seed
from .cond import backward_rows, cond_attrs, condition, data_rows, measurement_noise
from .errors import (PairStoreCorrupt, PairStoreIncomplete, PairStoreInvalid, PairStoreMismatch, PairWriteError,
                     redo_hint)
from .layout import (ARRAYS, BACKWARD, COND, DTYPES, FORWARD, IDENTITY_ATTRS, NOISE_RNG, CondAttrs, Hasher, PairBatch,
                     Shard, check_layout, shard_plan)
from .sampler import PairSampler, ram_bytes
from .simulate import VelocityFor, simulate_shard, solver_attrs, store_for_config
from .store import PairStore, verify_pairs, with_retries

__all__ = [
    "ARRAYS", "BACKWARD", "COND", "CondAttrs", "DTYPES", "FORWARD", "Hasher", "IDENTITY_ATTRS", "NOISE_RNG",
    "PairBatch", "PairSampler", "backward_rows", "cond_attrs", "condition", "data_rows", "measurement_noise",
    "PairStore", "PairStoreCorrupt", "PairStoreIncomplete", "PairStoreInvalid", "PairStoreMismatch", "PairWriteError",
    "Shard", "VelocityFor", "check_layout", "forward_indices", "ram_bytes", "redo_hint", "row_labels", "row_noise",
    "row_seed", "shard_plan", "simulate_shard", "solver_attrs", "store_for_config", "verify_pairs", "with_retries",
]
