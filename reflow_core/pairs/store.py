"""The pair store: coupled (noise, sample) pairs for ReFlow as zarr 3 at any fsspec URL, with per-shard done markers;
simulated by the teacher (`simulate.py`), read for training by `sampler.py`. What the layout is: `layout.py`.

Layout of `<root>/<run>/pairs.zarr` (a local path, file://, s3://, ...):

    noise     (N, *shape)  float32 | float16 | uint16 (bfloat16 bits; attrs["storage_dtype"] says so)
    sample    (N, *shape)  same dtype as noise
    label     (N,)         int64, -1 = no label
    direction (N,)         int8, 0 = backward (noise -> teacher sample), 1 = forward (real data -> inverted noise)
    cond      (N, *cond)   same dtype as noise; conditional stores only (attrs["cond"], `layout.CondAttrs`)
    done/shard-00007.json  completion markers (row range, sha256 of the bytes written), one object per shard

Arrays are chunked along N only, so writers of different shards never touch the same chunk object and can run
concurrently (threads, processes or machines) against one store. Completion lives in per-shard marker objects,
written only after the shard's data, so there is no shared attrs document to race on and an interrupted shard is
simply redone. The noise scheme (`reflow_core.rng`) is recorded in attrs["noise_rng"] (NOISE_RNG): a store with
pending shards and another scheme is refused rather than finished with different noise.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Callable, Sequence

import fsspec
import numpy as np
import torch
import zarr
from pydantic import ValidationError

from .. import storage
from .errors import PairStoreMismatch, PairWriteError, invalid
from .layout import (ARRAYS, BACKWARD, COND, CONVENTION, IDENTITY_ATTRS, NOISE_RNG, Hasher, PairBatch, Shard,
                     ShardMarker, StoreAttrs, array_names, check_cond, check_layout, cond_shape, from_storage,
                     shard_plan, to_storage)

MARKER_RE = re.compile(r"shard-(\d+)\.json$")
# writes of array regions and markers are retried on transient storage errors (`storage.is_transient`):
# WRITE_TRIES attempts, sleeping WRITE_BACKOFF_S * 2**i between them (0.5, 1, 2 s), then PairWriteError
WRITE_TRIES = 4
WRITE_BACKOFF_S = 0.5


def with_retries(fn: Callable[[], None], url: str, what: str) -> None:
    """fn() retried on transient storage errors; PairWriteError naming the store, what was written and the way out."""
    for attempt in range(WRITE_TRIES):
        try:
            fn()
            return
        except Exception as err:  # noqa: BLE001 - filtered by storage.is_transient
            if not storage.is_transient(err):
                raise
            if attempt == WRITE_TRIES - 1:
                raise PairWriteError(f"writing {what} of the pair store {url} failed after {WRITE_TRIES} tries "
                                     f"({type(err).__name__}: {err}); the shard has no done marker and is redone on "
                                     "the next run (free disk space / check the object store, then rerun)") from err
            time.sleep(WRITE_BACKOFF_S * 2 ** attempt)


class PairStore:
    """A pairs.zarr group plus its per-shard completion markers. Safe for concurrent writers of distinct shards."""

    def __init__(self, url: str, group: zarr.Group, fs: fsspec.AbstractFileSystem, root: str):
        self.url = url.rstrip("/")
        self._group = group
        self._fs = fs
        self._root = root.rstrip("/")
        self._attrs = a = self._valid_attrs(self.url, group)
        # the layout, fixed when the store was made (validated above)
        self.n_backward, self.n_forward = int(a["n_backward"]), int(a["n_forward"])
        self.chunk_size, self.shard_size = int(a["chunk_size"]), int(a["shard_size"])
        self.shape, self.dtype = tuple(int(s) for s in a["shape"]), str(a["dtype"])
        self.cond_shape, self.array_names = cond_shape(a), array_names(a)  # (None, ARRAYS) when unconditional
        try:
            self._arrays = {k: group[k] for k in self.array_names}
        except KeyError as e:
            raise invalid(self.url, "its arrays", f"array {e} is missing") from None
        self._check_arrays()
        self._plan = shard_plan(self.n_backward, self.n_forward, self.shard_size)

    @staticmethod
    def _valid_attrs(url: str, group: zarr.Group) -> dict:
        """The group's attrs, validated (`StoreAttrs`); PairStoreInvalid naming the store and --redo-stage."""
        try:
            attrs = dict(group.attrs)
            StoreAttrs.model_validate(attrs)
        except (ValidationError, ValueError, TypeError) as e:
            raise invalid(url, "its attributes (zarr.json)", e) from None
        return attrs

    def _check_arrays(self) -> None:
        """The arrays must be what the attrs say (rows, row shape, storage dtype): rows are addressed by the attrs."""
        n, want = self.n, ("uint16" if self.dtype == "bfloat16" else self.dtype)
        for k in self.array_names:
            a = self._arrays[k]
            shape = {"noise": (n, *self.shape), "sample": (n, *self.shape), COND: (n, *(self.cond_shape or ()))}
            shape = shape.get(k, (n,))
            if tuple(a.shape) != shape:
                raise invalid(self.url, f"array {k!r}", f"shape {tuple(a.shape)}, the attributes say {shape}")
            if k in ("noise", "sample", COND) and str(a.dtype) != want:
                raise invalid(self.url, f"array {k!r}", f"dtype {a.dtype}, the attributes say {want}")

    # ---- opening
    @staticmethod
    def _zarr_store(url: str, storage_options: dict | None, read_only: bool):
        if storage.is_local(url):
            if storage_options:
                raise ValueError(f"storage_options given for a local pair store {url!r}")
            return zarr.storage.LocalStore(storage.local_path(url), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)

    @staticmethod
    def _marker_fs(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
        if storage.is_local(url):
            return fsspec.filesystem("file"), os.path.abspath(storage.local_path(url))
        return fsspec.core.url_to_fs(url, **(storage_options or {}))

    @classmethod
    def exists(cls, url: str, storage_options: dict | None = None) -> bool:
        opts = storage.resolve_storage_options(url, storage_options)
        fs, root = cls._marker_fs(url, opts)
        try:
            fs.invalidate_cache()
        except Exception:  # noqa: BLE001 - not every fs caches
            pass
        return fs.exists(f"{root.rstrip('/')}/zarr.json")

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, read_only: bool = False) -> "PairStore":
        opts = storage.resolve_storage_options(url, storage_options)
        if not cls.exists(url, opts):
            raise FileNotFoundError(f"no pair store at {url}")
        store = cls._zarr_store(url, opts, read_only)
        try:
            group = zarr.open_group(store=store, mode="r" if read_only else "r+")
        except (ValueError, TypeError, KeyError) as e:  # a torn zarr.json (JSONDecodeError is a ValueError)
            raise invalid(url, "its group metadata (zarr.json)", e) from None
        missing = []
        for k in ARRAYS:  # look arrays up by name: listing members would trip over the done/ markers folder
            try:
                group[k]
            except KeyError:
                missing.append(k)
        if missing or group.attrs.get("convention") != CONVENTION:
            raise ValueError(f"{url} is not a pair store (missing arrays {missing} or convention attr)")
        fs, root = cls._marker_fs(url, opts)
        return cls(url, group, fs, root)

    @classmethod
    def create(cls, url: str, *, shape: Sequence[int], n_backward: int, n_forward: int, chunk_size: int,
               shard_size: int, dtype: str, attrs: dict, storage_options: dict | None = None,
               zarr_shards: bool = False, compress: bool = False, cond: dict | None = None) -> "PairStore":
        """Create the store, or open it if one with the same structure and identity attrs exists (resume).

        Raises PairStoreMismatch if an existing store differs (shape, counts, chunk/shard size, dtype, or any of
        IDENTITY_ATTRS present in either). The store records NOISE_RNG as its noise_rng attr; an existing store
        with another (or none: made before the attr) is refused while it has pending shards (finishing it would mix
        two noise definitions), and opened when complete (its pairs are stored, no noise is drawn again).
        Create the store once before starting concurrent writers; they then `open` (or `create`, which opens) it.

        zarr_shards: noise/sample use zarr 3's sharding codec with one shard object per pair shard (shard_size
        rows, chunk_size-row inner chunks): n / shard_size objects instead of n / chunk_size, same values. A pair
        shard is then written in one piece (a partial write of a zarr shard rewrites the whole object), and the
        backward/forward boundary must fall on a shard boundary so no two writers share an object.
        compress: zstd (level 1) on noise/sample chunks. Both are layout choices of a new store only: an existing
        store keeps its own (values read back identical either way).
        cond: a conditional store's `layout.CondAttrs` (kind, per-row shape, settings), kept as attrs["cond"] (an
        identity attr: an existing store made with another condition, or none, is refused); its rows then carry a
        condition array COND (N, *cond["shape"]) of the store's dtype, chunked and sharded as noise."""
        shape = [int(s) for s in shape]
        check_layout(n_backward=n_backward, n_forward=n_forward, chunk_size=chunk_size, shard_size=shard_size,
                     dtype=dtype, zarr_shards=zarr_shards)
        structure = {"shape": shape, "n_backward": int(n_backward), "n_forward": int(n_forward),
                     "chunk_size": int(chunk_size), "shard_size": int(shard_size), "dtype": dtype}
        wanted = {**dict(attrs), "convention": CONVENTION, "noise_rng": NOISE_RNG,
                  **({} if cond is None else {COND: check_cond(cond)})}
        opts = storage.resolve_storage_options(url, storage_options)
        if cls.exists(url, opts):
            store = cls.open(url, opts)
            have = store.attrs
            diff = [k for k, v in structure.items() if have.get(k) != v]
            diff += [k for k in IDENTITY_ATTRS if (k in wanted or k in have) and have.get(k) != wanted.get(k)]
            if "noise_rng" in diff and store.is_complete():
                diff.remove("noise_rng")  # finished: its noise is stored and never drawn again
            if diff:
                detail = ", ".join(f"{k}: existing={have.get(k)!r} requested="
                                   f"{structure.get(k, wanted.get(k))!r}" for k in diff)
                why = ("; noise_rng says how per-row noise and labels are drawn, and this code draws them "
                       "differently, so the store's pending shards cannot be simulated" if "noise_rng" in diff else "")
                why += ("; cond is the rows' image condition: conditional and unconditional pairs (or pairs of "
                        "another condition) never mix" if COND in diff else "")
                raise PairStoreMismatch(
                    f"a different pair store already exists at {url} (differs in {detail}{why}); use a new run name "
                    "or delete it")
            return store

        n = n_backward + n_forward
        zstore = cls._zarr_store(url, opts, read_only=False)
        group = zarr.open_group(store=zstore, mode="a")
        storage_dtype = "uint16" if dtype == "bfloat16" else dtype
        group.attrs.update({
            **wanted, **structure,
            "storage_dtype": storage_dtype,
            "shard_size": int(shard_size),
            "zarr_shards": bool(zarr_shards),
            "compress": bool(compress),
            "created_by": wanted.get("created_by", "reflow_core.pairs"),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        compressors = [zarr.codecs.ZstdCodec(level=1)] if compress else None
        shards = (int(shard_size), *shape) if zarr_shards else None
        row_shapes = {"noise": shape, "sample": shape, **({} if cond is None else {COND: list(cond["shape"])})}
        for name, rs in row_shapes.items():
            group.create_array(name, shape=(n, *rs), chunks=(chunk_size, *rs), dtype=storage_dtype, fill_value=0,
                               shards=None if shards is None else (shards[0], *rs), compressors=compressors,
                               overwrite=True)
        group.create_array("label", shape=(n,), chunks=(chunk_size,), dtype="int64", fill_value=-1, overwrite=True)
        group.create_array("direction", shape=(n,), chunks=(chunk_size,), dtype="int8", fill_value=0,
                           overwrite=True)
        fs, root = cls._marker_fs(url, opts)
        return cls(url, zarr.open_group(store=zstore, mode="r+"), fs, root)

    # ---- properties
    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    @property
    def n(self) -> int:
        return self.n_backward + self.n_forward

    def __len__(self) -> int:
        return self.n

    @property
    def plan(self) -> list[Shard]:
        return list(self._plan)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.n / self.chunk_size)

    def chunk_rows(self, c: int) -> range:
        if not 0 <= c < self.num_chunks:
            raise IndexError(f"chunk {c} out of range [0, {self.num_chunks})")
        return range(c * self.chunk_size, min((c + 1) * self.chunk_size, self.n))

    # ---- markers
    def _marker_path(self, k: int) -> str:
        return f"{self._root}/done/shard-{k:05d}.json"

    def done_shards(self) -> set[int]:
        done_dir = f"{self._root}/done"
        try:
            self._fs.invalidate_cache(done_dir)
        except Exception:  # noqa: BLE001
            pass
        try:
            names = self._fs.ls(done_dir, detail=False)
        except FileNotFoundError:
            return set()
        found = {}
        for name in names:
            m = MARKER_RE.search(str(name))
            if m and int(m.group(1)) < len(self._plan):
                found[int(m.group(1))] = self._marker_path(int(m.group(1)))
        if not found:
            return set()
        # a marker counts only when it validates (ShardMarker, matching this store's plan): a torn or foreign one is
        # not trusted, so its shard is pending and simulated again (same values: noise is seeded per row), and
        # writing the shard replaces the marker. One batched read (concurrent GETs on object stores).
        data = self._fs.cat(list(found.values()), on_error="omit")
        data = {str(p).rstrip("/").rsplit("/", 1)[-1]: v for p, v in data.items()}
        return {k for k, p in found.items()
                if (raw := data.get(p.rsplit("/", 1)[-1])) is not None and self._valid_marker(k, raw) is not None}

    def _valid_marker(self, k: int, raw: bytes) -> dict | None:
        try:
            m = ShardMarker.model_validate_json(raw)
        except (ValidationError, ValueError):
            return None
        s = self._plan[k]
        if (m.shard, m.start, m.stop, m.direction, m.rows) != (s.index, s.start, s.stop, s.direction, s.rows):
            return None
        if self.cond_shape is not None and COND not in m.sha256:  # a conditional store's marker hashes its cond
            return None
        return json.loads(raw)

    def pending_shards(self) -> list[int]:
        done = self.done_shards()
        return [s.index for s in self._plan if s.index not in done]

    def is_complete(self) -> bool:
        return not self.pending_shards()

    def marker(self, k: int) -> dict | None:
        """Shard k's done marker, None when it is missing or does not validate (torn, foreign: not trusted)."""
        try:
            raw = self._fs.cat_file(self._marker_path(k))
        except FileNotFoundError:
            return None
        return self._valid_marker(k, raw)

    def _write_marker(self, shard: Shard, digests: dict[str, str], extra: dict | None = None) -> None:
        obj = {"shard": shard.index, "start": shard.start, "stop": shard.stop, "direction": shard.direction,
               "rows": shard.rows, "sha256": digests, "written_at": time.time(), **(extra or {})}
        data = json.dumps(obj, indent=2, sort_keys=True).encode()
        with_retries(lambda: self._put_marker(self._marker_path(shard.index), data), self.url,
                     f"shard {shard.index} done marker")

    def _put_marker(self, path: str, data: bytes) -> None:
        storage.write_atomic(self._fs, path, data)  # temp + rename locally, one PUT on object stores

    def unmark(self, k: int) -> None:
        """Delete shard k's marker, so the shard counts as pending (and is redone) again."""
        try:
            self._fs.rm_file(self._marker_path(k))
        except FileNotFoundError:
            pass

    # ---- writing
    def to_arrays(self, noise, sample, label, direction, cond=None) -> dict[str, np.ndarray]:
        """Rows as the store keeps them (storage dtypes, label -1 when unlabelled), checked against its shape; `cond`
        (n, *cond_shape) is required by a conditional store and refused by an unconditional one."""
        n = int(noise.shape[0])
        if tuple(noise.shape[1:]) != self.shape or tuple(sample.shape) != tuple(noise.shape):
            raise ValueError(f"noise/sample must have shape (n, *{self.shape}), got {tuple(noise.shape)} and "
                             f"{tuple(sample.shape)}")
        if (cond is None) != (self.cond_shape is None):
            raise ValueError(f"the pair store {self.url} is " + ("unconditional but the rows have a condition"
                             if cond is not None else f"conditional: rows need their condition {self.cond_shape}"))
        if cond is not None and tuple(cond.shape) != (n, *self.cond_shape):
            raise ValueError(f"cond must have shape (n, *{self.cond_shape}), got {tuple(cond.shape)}")
        if label is None:
            label = torch.full((n,), -1, dtype=torch.long)
        if isinstance(direction, int):
            direction = torch.full((n,), direction, dtype=torch.long)
        label = torch.as_tensor(label).reshape(-1)
        direction = torch.as_tensor(direction).reshape(-1)
        if label.shape[0] != n or direction.shape[0] != n:
            raise ValueError(f"label/direction must have {n} rows")
        return {"noise": to_storage(noise, self.dtype), "sample": to_storage(sample, self.dtype),
                "label": label.detach().cpu().to(torch.int64).numpy(),
                "direction": direction.detach().cpu().to(torch.int8).numpy(),
                **({} if cond is None else {COND: to_storage(cond, self.dtype)})}

    def write_arrays(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Raw region write (no marker). Callers keep regions chunk-aligned so no two writers share a chunk."""
        stop = start + int(arrays["noise"].shape[0])
        shard = next((s.index for s in self._plan if s.start <= start < s.stop), None)
        for k in self.array_names:
            def write(k=k):
                self._arrays[k][start:stop] = arrays[k]
            with_retries(write, self.url, f"shard {shard} array {k!r} rows [{start}, {stop})")

    def write_rows(self, start: int, noise, sample, label=None, direction: int | torch.Tensor = BACKWARD,
                   cond=None) -> None:
        """Write rows [start, start + len(noise)) without marking anything done (partial writes, tests)."""
        self.write_arrays(start, self.to_arrays(noise, sample, label, direction, cond))

    def write_shard(self, shard: Shard | int, noise, sample, label=None,
                    direction: int | torch.Tensor | None = None, cond=None) -> dict[str, str]:
        """Write a whole shard's rows, then (only after the write returned) its done marker. Returns the digests."""
        shard = self._plan[shard] if isinstance(shard, int) else shard
        if shard != self._plan[shard.index]:
            raise ValueError(f"{shard} is not shard {shard.index} of this store's plan {self._plan[shard.index]}")
        if int(noise.shape[0]) != shard.rows:
            raise ValueError(f"shard {shard.index} has {shard.rows} rows, got {int(noise.shape[0])}")
        arrays = self.to_arrays(noise, sample, label, shard.direction if direction is None else direction, cond)
        self.write_arrays(shard.start, arrays)
        h = Hasher(self.array_names)
        h.update(arrays)
        digests = h.digests()
        self._write_marker(shard, digests)
        return digests

    def mark_done(self, shard: Shard, digests: dict[str, str], extra: dict | None = None) -> None:
        self._write_marker(shard, digests, extra)

    # ---- reading
    def read_raw(self, rows: slice) -> dict[str, np.ndarray]:
        """The stored arrays (storage dtypes: bfloat16 as uint16 bits) for a slice of rows."""
        return {k: self._arrays[k][rows] for k in self.array_names}

    def _batch(self, raw: dict[str, np.ndarray], index: torch.Tensor) -> PairBatch:
        return PairBatch(noise=from_storage(raw["noise"], self.dtype), sample=from_storage(raw["sample"], self.dtype),
                         label=torch.from_numpy(np.asarray(raw["label"], dtype=np.int64)),
                         direction=torch.from_numpy(np.asarray(raw["direction"]).astype(np.int64)), index=index,
                         cond=from_storage(raw[COND], self.dtype) if COND in raw else None)

    def read(self, rows: slice | range | torch.Tensor | Sequence[int]) -> PairBatch:
        if isinstance(rows, range) and rows.step == 1:
            rows = slice(rows.start, rows.stop)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.n)
            if step != 1:
                return self.read(torch.arange(start, stop, step))
            raw = self.read_raw(slice(start, stop))
            return self._batch(raw, torch.arange(start, max(start, stop)))
        idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            return self._batch(self.read_raw(slice(0, 0)), idx)
        if int(idx.min()) < 0 or int(idx.max()) >= self.n:
            raise IndexError(f"row indices out of range [0, {self.n})")
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        sel = uniq.numpy()
        raw = {k: self._arrays[k].get_orthogonal_selection((sel,)) for k in self.array_names}
        b = self._batch(raw, uniq).select(inverse)
        b.index = idx
        return b

    def read_chunk(self, c: int) -> PairBatch:
        r = self.chunk_rows(c)
        return self.read(slice(r.start, r.stop))

    def verify_shard(self, k: int) -> bool:
        """Recompute the sha256 of shard k's stored bytes and compare with its marker (False if none)."""
        m = self.marker(k)
        if m is None:
            return False
        s = self._plan[k]
        h = Hasher(self.array_names)
        h.update(self.read_raw(slice(s.start, s.stop)))
        return h.digests()["all"] == m.get("sha256", {}).get("all")

    def __repr__(self) -> str:
        return (f"PairStore({self.url!r}, n_backward={self.n_backward}, n_forward={self.n_forward}, "
                f"shape={self.shape}, dtype={self.dtype})")


def verify_pairs(store: PairStore, shards: list[int] | None = None) -> list[str]:
    """Re-hash every (or the given) finished shard against its marker; the problems found, one line each."""
    bad = []
    for k in (range(len(store.plan)) if shards is None else shards):
        sh = store.plan[k]
        chunks = f"chunks {sh.start // store.chunk_size}..{(sh.stop - 1) // store.chunk_size}"
        try:
            ok = store.verify_shard(k)
        except Exception as e:  # noqa: BLE001 - a truncated chunk object fails to decode
            bad.append(f"shard {k} (rows [{sh.start}, {sh.stop}), {chunks}): unreadable ({type(e).__name__}: {e})")
            continue
        if not ok:
            bad.append(f"shard {k} (rows [{sh.start}, {sh.stop}), {chunks}): "
                       + ("no valid done marker" if store.marker(k) is None else "sha256 differs from its done marker"))
    return bad
