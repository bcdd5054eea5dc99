"""Coupled (noise, sample) pairs for ReFlow: the store, its simulation by the teacher, and the training sampler.

    store.py     PairStore (zarr 3 at any fsspec URL, per-shard done markers), the shard plan, per-row seeding,
                 PairBatch, dtype conversion, hashing and verification, write retries
    simulate.py  simulate_shard: one shard integrated by the teacher (velocity_for(labels) -> v(x, t)) and written
    sampler.py   PairSampler: reflow batches as a pure function of the step, from RAM or streamed from the store

This package depends on torch, zarr, fsspec and reflow_core's solvers/storage/config only (never on training,
distributed or pipeline code).
"""
from .sampler import PairSampler, ram_bytes
from .simulate import VelocityFor, simulate_shard
from .store import (ARRAYS, BACKWARD, CONVENTION, DTYPES, FORWARD, IDENTITY_ATTRS, PairBatch, PairStore,
                    PairStoreCorrupt, PairStoreIncomplete, PairStoreMismatch, PairWriteError, Shard, _retryable,
                    _with_retries, forward_indices, resolve_storage_options, row_labels, row_noise, row_seed,
                    shard_plan, verify_pairs)

__all__ = [
    "ARRAYS", "BACKWARD", "CONVENTION", "DTYPES", "FORWARD", "IDENTITY_ATTRS", "PairBatch", "PairSampler",
    "PairStore", "PairStoreCorrupt", "PairStoreIncomplete", "PairStoreMismatch", "PairWriteError", "Shard",
    "VelocityFor", "_retryable", "_with_retries", "forward_indices", "ram_bytes", "resolve_storage_options",
    "row_labels", "row_noise", "row_seed", "shard_plan", "simulate_shard", "verify_pairs",
]
