"""The pair store: coupled (noise, sample) pairs for ReFlow, simulated by the teacher (`simulate.py`) and stored as
zarr 3 at any fsspec URL; read for training by `sampler.py`.

Layout of `<root>/<run>/pairs.zarr` (a local path, file://, s3://, ...):

    noise     (N, *shape)  float32 | float16 | uint16 (bfloat16 bits; attrs["storage_dtype"] says so)
    sample    (N, *shape)  same dtype as noise
    label     (N,)         int64, -1 = no label
    direction (N,)         int8, 0 = backward (noise -> teacher sample), 1 = forward (real data -> inverted noise)
    done/shard-00007.json  completion markers (row range, sha256 of the bytes written), one object per shard

A pair is (noise[i], sample[i]). Rows [0, n_backward) are backward pairs, rows [n_backward, N) forward pairs.
Arrays are chunked along N only (chunk_size rows, other dims whole); shards are whole numbers of chunks and never
straddle the two sections, so writers of different shards never touch the same chunk object and can run
concurrently (threads, processes or machines) against one store. Completion lives in per-shard marker objects,
written only after the shard's data, so there is no shared attrs document to race on and an interrupted shard is
simply redone.

Noise and backward labels are counter-based: a row's values are a pure function of (seed, global row), drawn from
SplitMix64 streams keyed by `row_seed(seed, row, tag)` (Box-Muller in float64 for the noise, see `row_noise`), so
they depend on neither the batch size, the shard layout nor which other rows are drawn with it. The scheme is
recorded in attrs["noise_rng"] (NOISE_RNG): a store with pending shards and another scheme (or none: made by the
earlier per-row torch.Generator scheme) is refused rather than finished with different noise.

Time convention: t = 0 data, t = 1 noise (`solvers.sample` integrates 1 -> 0, `solvers.invert` 0 -> 1).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import fsspec
import numpy as np
import torch
import zarr
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import storage
from ..config import PairsConfig

CONVENTION = "t0=data,t1=noise"
DTYPES = ("float32", "float16", "bfloat16")
ARRAYS = ("noise", "sample", "label", "direction")
BACKWARD, FORWARD = 0, 1
# how row_noise/row_labels draw a row's values: recorded in every store `create` makes, so a store whose noise was
# drawn otherwise (e.g. by the per-row torch.Generator scheme before it) is never resumed with different noise
NOISE_RNG = "splitmix64-boxmuller-v1"
# identity keys of attrs compared when create() finds an existing store (besides the structural ones)
IDENTITY_ATTRS = ("teacher_hash", "solver", "nfe", "grid", "rho", "seed", "convention", "noise_rng")
_MARKER_RE = re.compile(r"shard-(\d+)\.json$")
_MASK64 = (1 << 64) - 1
_TAG_NOISE, _TAG_LABEL, _TAG_PERM = 0x6E6F697365, 0x6C6162656C, 0x7065726D


class PairStoreMismatch(ValueError):
    """An existing store at the URL was made with different structure or teacher/solver settings."""


class PairStoreInvalid(PairStoreMismatch):
    """The store's metadata (the group's zarr attributes) is unreadable or invalid: torn, hand-edited or written by
    something else. Never trusted; the message names the store and `--redo-stage`."""


class PairStoreIncomplete(RuntimeError):
    """The store still has pending shards (raised by readers that need all of it)."""


class PairWriteError(RuntimeError):
    """A write to the pair store kept failing (disk full, object store unavailable) after its retries."""


# writes of array regions and markers are retried on storage errors: WRITE_TRIES attempts, sleeping
# WRITE_BACKOFF_S * 2**i between them (0.5, 1, 2 s), then PairWriteError
WRITE_TRIES = 4
WRITE_BACKOFF_S = 0.5


def _retryable(err: BaseException) -> bool:
    """Storage errors worth retrying: OSError (ENOSPC, EIO, connection resets, fsspec/s3fs errors mapped to
    OSError) and botocore-style ClientError / EndpointConnectionError, found by class name (no botocore import)."""
    if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    names = {c.__name__ for c in type(err).__mro__}
    return bool(names & {"ClientError", "BotoCoreError", "EndpointConnectionError", "ConnectionError"})


def _with_retries(fn: Callable[[], None], url: str, what: str) -> None:
    for attempt in range(WRITE_TRIES):
        try:
            fn()
            return
        except Exception as err:  # noqa: BLE001 - filtered by _retryable
            if not _retryable(err):
                raise
            if attempt == WRITE_TRIES - 1:
                raise PairWriteError(f"writing {what} of the pair store {url} failed after {WRITE_TRIES} tries "
                                     f"({type(err).__name__}: {err}); the shard has no done marker and is redone on "
                                     "the next run (free disk space / check the object store, then rerun)") from err
            time.sleep(WRITE_BACKOFF_S * 2 ** attempt)


# --------------------------------------------------------------------------------------------------- metadata
# Stored metadata is validated when read: a team shares one root, so whatever another writer left there is data to
# check, not to trust. The bounds keep a hostile attrs document from making the shard plan explode.
MAX_SHARDS = 1_000_000
_HEX64 = r"^[0-9a-f]{64}$"
_Count = Field(strict=True, ge=0, le=2 ** 48)
_Size = Field(strict=True, ge=1, le=2 ** 40)


class StoreAttrs(BaseModel):
    """The attrs of a pair store's zarr group that this module relies on (what `create` writes). Unknown keys are
    kept (a caller's extra attrs); the simulation settings are optional (a store made by `create` with other attrs)
    but typed when present."""

    model_config = ConfigDict(extra="allow")

    convention: str = Field(pattern=f"^{re.escape(CONVENTION)}$")
    n_backward: int = _Count
    n_forward: int = _Count
    shape: list[int] = Field(min_length=0, max_length=8)
    chunk_size: int = _Size
    shard_size: int = _Size
    dtype: str = Field(pattern=f"^({'|'.join(DTYPES)})$")
    storage_dtype: str | None = Field(None, pattern=r"^(float32|float16|uint16)$")
    zarr_shards: bool | None = Field(None, strict=True)
    compress: bool | None = Field(None, strict=True)
    solver: str | None = Field(None, max_length=64)
    nfe: int | None = Field(None, strict=True, ge=1, le=100_000)
    grid: str | None = Field(None, max_length=64)
    rho: float | None = Field(None, allow_inf_nan=False)
    seed: int | None = Field(None, strict=True)
    teacher_hash: str | None = Field(None, max_length=256)
    stage: str | None = Field(None, max_length=256)
    noise_rng: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _check(self) -> "StoreAttrs":
        if any(not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= 2 ** 31 for d in self.shape):
            raise ValueError(f"shape must be positive ints, got {self.shape}")
        if self.shard_size % self.chunk_size:
            raise ValueError(f"shard_size {self.shard_size} is not a multiple of chunk_size {self.chunk_size}")
        if self.n_backward + self.n_forward < 1:
            raise ValueError("a pair store holds at least one row")
        shards = -(-self.n_backward // self.shard_size) + -(-self.n_forward // self.shard_size)
        if shards > MAX_SHARDS:
            raise ValueError(f"{shards} shards (more than {MAX_SHARDS})")
        want = "uint16" if self.dtype == "bfloat16" else self.dtype
        if self.storage_dtype is not None and self.storage_dtype != want:
            raise ValueError(f"storage_dtype {self.storage_dtype} does not go with dtype {self.dtype}")
        return self


class ShardMarker(BaseModel):
    """done/shard-NNNNN.json: written after a shard's rows, with the sha256 of the bytes written."""

    model_config = ConfigDict(extra="allow")  # simulate_shard adds seconds, solver, nfe

    shard: int = Field(strict=True, ge=0)
    start: int = Field(strict=True, ge=0)
    stop: int = Field(strict=True, ge=0)
    direction: int = Field(strict=True, ge=0, le=1)
    rows: int = Field(strict=True, ge=0)
    sha256: dict[str, str]

    @model_validator(mode="after")
    def _check(self) -> "ShardMarker":
        missing = [k for k in (*ARRAYS, "all") if not re.match(_HEX64, str(self.sha256.get(k, "")))]
        if missing:
            raise ValueError(f"sha256 lacks a hex digest for {missing}")
        return self


def redo_hint(url: str) -> str:
    """`--redo-stage NAME` for the store at url (pairs.zarr -> pairs, pairs-2.zarr -> pairs-2)."""
    m = re.search(r"(pairs(?:-\d+)?)\.zarr/?$", url)
    return f"--redo-stage {m.group(1) if m else '<the pairs stage that writes it>'}"


def _invalid(url: str, what: str, err: BaseException | str) -> PairStoreInvalid:
    detail = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    detail = str(detail).replace("\n", " ")[:400]
    return PairStoreInvalid(f"pair store {url}: {what} is unreadable or invalid ({detail}); it is not trusted. "
                            f"Rerun with {redo_hint(url)} to simulate the pairs again")


# --------------------------------------------------------------------------------------------------- seeding
def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def row_seed(seed: int, row: int, tag: int = _TAG_NOISE) -> int:
    """A 63-bit generator seed for one global row: a hash of (seed, row, stream tag)."""
    return _splitmix64(_splitmix64((seed * 1_000_003 + row) & _MASK64) ^ tag) % (2 ** 63)


# Vectorised counterparts (numpy uint64: wrapping arithmetic is defined there, unlike torch's signed int64).
_U64 = np.uint64
_GAMMA = _U64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_LOW63 = _U64(2 ** 63 - 1)
_INV53 = 2.0 ** -53
_BLOCK_ELEMS = 1 << 20  # elements per block of rows in row_noise: its uint64/float64 temporaries stay ~4 MB each
_THREAD_ELEMS = 1 << 18  # row_noise spreads its blocks over threads from this many elements on


def _mix64_(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function applied in place to a uint64 array (wrapping): z ^= z >> 30; z *= C1; ..."""
    t = np.empty_like(z)
    for shift, mult in ((30, _MIX1), (27, _MIX2)):
        np.right_shift(z, _U64(shift), out=t)
        np.bitwise_xor(z, t, out=z)
        np.multiply(z, mult, out=z)
    np.right_shift(z, _U64(31), out=t)
    np.bitwise_xor(z, t, out=z)
    return z


def _splitmix64_np(z: np.ndarray) -> np.ndarray:
    """`_splitmix64` elementwise on a uint64 array (a new array): the first output of SplitMix64 with state z."""
    with np.errstate(over="ignore"):
        z = np.asarray(z, dtype=_U64)
        return _mix64_(np.add(z, _GAMMA, out=np.empty_like(z)))


def _rows_array(rows: range | Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
    """Global row indices as a 1-D integer numpy array (int64, or uint64 for numpy uint64 input)."""
    if isinstance(rows, range):
        return np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)
    if isinstance(rows, torch.Tensor):
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise TypeError(f"row indices must be integers, got a {rows.dtype} tensor")
        return rows.detach().reshape(-1).to("cpu", torch.int64).numpy()
    a = np.asarray(rows).reshape(-1)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"row indices must be integers, got dtype {a.dtype}")
    return a if a.dtype == np.uint64 else a.astype(np.int64, copy=False)


def _row_keys(seed: int, rows: np.ndarray, tag: int) -> np.ndarray:
    """`row_seed(seed, r, tag)` for every r in rows (uint64 array), bit for bit."""
    base = _U64((int(seed) * 1_000_003) & _MASK64)
    with np.errstate(over="ignore"):
        z = rows.astype(_U64) + base  # == (seed * 1_000_003 + r) & _MASK64 (int64 -> uint64 wraps as & _MASK64)
        z = _splitmix64_np(z)
        np.bitwise_xor(z, _U64(tag & _MASK64), out=z)
        z = _splitmix64_np(z)
    return np.bitwise_and(z, _LOW63, out=z)


def _row_stream(keys: np.ndarray, first: int, count: int, stride: int = 1) -> np.ndarray:
    """(len(keys), count) uint64: outputs first, first + stride, ... (count of them; 1-based) of the standard
    SplitMix64 generator started from state key, output i being mix(key + i * GAMMA) (wrapping)."""
    with np.errstate(over="ignore"):
        steps = np.arange(first, first + stride * count, stride, dtype=_U64)[:count] * _GAMMA
        return _mix64_(keys[:, None] + steps[None, :])


def _uniform53(x: np.ndarray) -> np.ndarray:
    """u = (x >> 11) * 2**-53 in [0, 1), float64 (exact: 53 bits)."""
    return np.right_shift(x, _U64(11), out=x).astype(np.float64) * _INV53


def _noise_block(keys: np.ndarray, out: np.ndarray) -> None:
    """Fill out (len(keys), d) float32 with the rows' Box-Muller normals (see row_noise)."""
    d = out.shape[1]
    pairs = (d + 1) // 2
    # radius from the odd outputs: 1 - u = (2**53 - (x >> 11)) * 2**-53 is exact and in (0, 1], so never log(0)
    x = np.right_shift(_row_stream(keys, 1, pairs, 2), _U64(11))
    r = np.subtract(_U64(1 << 53), x, out=x).astype(np.float64)
    del x
    r *= _INV53
    np.log(r, out=r)
    r *= -2.0
    np.sqrt(r, out=r)
    theta = _uniform53(_row_stream(keys, 2, pairs, 2))  # angle from the even outputs
    theta *= 2.0 * math.pi
    c = np.cos(theta)
    np.multiply(r, c, out=out[:, 0::2])  # the float64 product, rounded once to float32
    np.sin(theta, out=c)
    np.multiply(r[:, :d // 2], c[:, :d // 2], out=out[:, 1::2])


def row_noise(seed: int, rows: range | Sequence[int] | torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """N(0, I) float32 noise of shape (len(rows), *shape); row i a pure function of (seed, rows[i]).

    Counter-based: row r's values come from the SplitMix64 stream started at state row_seed(seed, r) (outputs
    x_1, x_2, ...), as uniforms u_i = (x_i >> 11) * 2**-53 in [0, 1), through Box-Muller in float64 in pairs:
    flat element 2j = sqrt(-2 ln(1 - u_{2j+1})) cos(2 pi u_{2j+2}), element 2j + 1 the same with sin (an odd
    element count drops the last sine), rounded to float32. Vectorised over rows and elements, in blocks of rows
    (spread over torch.get_num_threads() threads when large; numpy releases the GIL; same values either way)."""
    idx = _rows_array(rows)
    shape = tuple(int(s) for s in shape)
    n, d = idx.shape[0], math.prod(shape)
    out = np.empty((n, d), dtype=np.float32)
    if n and d:
        keys = _row_keys(seed, idx, _TAG_NOISE)
        threads = min(torch.get_num_threads(), 8) if n * d >= _THREAD_ELEMS else 1
        step = max(1, min(_BLOCK_ELEMS // (d + 1), -(-n // threads)))
        blocks = [(keys[b:b + step], out[b:b + step]) for b in range(0, n, step)]
        if threads > 1 and len(blocks) > 1:
            with ThreadPoolExecutor(min(threads, len(blocks)), thread_name_prefix="row-noise") as ex:
                list(ex.map(lambda kb: _noise_block(*kb), blocks))
        else:
            for kb in blocks:
                _noise_block(*kb)
    return torch.from_numpy(out).reshape(n, *shape)


def row_labels(seed: int, rows: range | Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Uniform class labels (long, (len(rows),)), a pure function of (seed, row): floor(u * num_classes) with u the
    53-bit uniform of the first SplitMix64 output of the row's label-stream state row_seed(seed, r, label tag)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    idx = _rows_array(rows)
    if not idx.shape[0]:
        return torch.zeros(0, dtype=torch.long)
    u = _uniform53(_row_stream(_row_keys(seed, idx, _TAG_LABEL), 1, 1)[:, 0])  # [0, 1 - 2**-53]
    lab = np.minimum(np.floor(u * num_classes).astype(np.int64), num_classes - 1)  # the min only guards rounding
    return torch.from_numpy(lab)


def forward_indices(seed: int, rows: range | Sequence[int] | torch.Tensor, n_data: int) -> torch.Tensor:
    """Real-data indices for forward-section rows j (0-based within the forward section): perm[j % n_data],
    perm a permutation of the data set seeded by the store seed."""
    if n_data < 1:
        raise ValueError("forward pairs need a non-empty data set")
    g = torch.Generator().manual_seed(row_seed(seed, 0, _TAG_PERM))
    perm = torch.randperm(n_data, generator=g)
    j = torch.from_numpy(_rows_array(rows).astype(np.int64))
    return perm[j % n_data]


# --------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int
    direction: int  # 0 backward, 1 forward

    @property
    def rows(self) -> int:
        return self.stop - self.start


def shard_plan(n_backward: int, n_forward: int, shard_size: int) -> list[Shard]:
    """Backward shards over [0, n_backward), then forward shards over [n_backward, n_backward + n_forward);
    global, consecutive indices; no shard straddles the two sections."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if n_backward < 0 or n_forward < 0:
        raise ValueError(f"n_backward and n_forward must be >= 0, got {n_backward}, {n_forward}")
    plan: list[Shard] = []
    for base, n, direction in ((0, n_backward, BACKWARD), (n_backward, n_forward, FORWARD)):
        for s in range(0, n, shard_size):
            plan.append(Shard(len(plan), base + s, base + min(s + shard_size, n), direction))
    return plan


@dataclass
class PairBatch:
    noise: torch.Tensor  # float32 (B, *shape)
    sample: torch.Tensor  # float32 (B, *shape)
    label: torch.Tensor  # long (B,), -1 = none
    direction: torch.Tensor  # long (B,)
    index: torch.Tensor | None = None  # long (B,) global rows, where known

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    def to(self, device) -> "PairBatch":
        return PairBatch(self.noise.to(device), self.sample.to(device), self.label.to(device),
                         self.direction.to(device), None if self.index is None else self.index.to(device))


# --------------------------------------------------------------------------------------------------- url helpers
def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def resolve_storage_options(url: str, storage_options: dict | None = None) -> dict:
    """Copy of storage_options; for s3:// without an explicit endpoint, take one from FSSPEC_S3_ENDPOINT_URL,
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (MinIO, moto, ...)."""
    opts = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        ck = dict(opts.get("client_kwargs") or {})
        if "endpoint_url" not in opts and "endpoint_url" not in ck:
            env = (os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
                   or os.environ.get("AWS_ENDPOINT_URL"))
            if env:
                ck["endpoint_url"] = env
                opts["client_kwargs"] = ck
    return opts


def _to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A batch as stored. Called in the shard writer's thread: float16 is rounded by numpy (single-threaded, the
    same round-to-nearest-even as torch), since a torch kernel there would start an OpenMP team next to the
    simulating thread's, and libgomp cuts spin-waits short once a process's OpenMP threads outnumber its cores."""
    x = x.detach().to("cpu")
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if dtype == "float16" and x.dtype == torch.float32:
        with np.errstate(over="ignore"):  # beyond 65504 -> inf, as in torch, without numpy's warning
            return x.contiguous().numpy().astype(np.float16)
    return x.to(getattr(torch, dtype)).contiguous().numpy()


def _from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(torch.float32)
    return torch.from_numpy(a).to(torch.float32)


class _Hasher:
    """sha256 per array over the bytes written, in row order (independent of how the rows were split)."""

    def __init__(self):
        self.h = {k: hashlib.sha256() for k in ARRAYS}

    def update(self, arrays: dict[str, np.ndarray]) -> None:
        for k in ARRAYS:
            self.h[k].update(np.ascontiguousarray(arrays[k]).tobytes())

    def digests(self) -> dict[str, str]:
        d = {k: h.hexdigest() for k, h in self.h.items()}
        d["all"] = hashlib.sha256("".join(d[k] for k in ARRAYS).encode()).hexdigest()
        return d


# --------------------------------------------------------------------------------------------------- store
def solver_attrs(cfg: PairsConfig) -> dict:
    """The simulation settings a store records (and a reopening config must match): solver, NFE, grid, rho, seed."""
    g = cfg.grid.solver_args(cfg.nfe)
    return {"solver": cfg.solver, "nfe": cfg.nfe, "grid": g["grid"], "rho": g["rho"], "seed": cfg.seed}


class PairStore:
    """A pairs.zarr group plus its per-shard completion markers. Safe for concurrent writers of distinct shards."""

    def __init__(self, url: str, group: zarr.Group, fs: fsspec.AbstractFileSystem, root: str):
        self.url = url.rstrip("/")
        self._group = group
        self._fs = fs
        self._root = root.rstrip("/")
        self._attrs = self._valid_attrs(self.url, group)
        self._arrays = {k: group[k] for k in ARRAYS}
        self._check_arrays()
        self._plan = shard_plan(self.n_backward, self.n_forward, self.shard_size)

    @staticmethod
    def _valid_attrs(url: str, group: zarr.Group) -> dict:
        """The group's attrs, validated (`StoreAttrs`); PairStoreInvalid naming the store and --redo-stage."""
        try:
            attrs = dict(group.attrs)
            StoreAttrs.model_validate(attrs)
        except (ValidationError, ValueError, TypeError) as e:
            raise _invalid(url, "its attributes (zarr.json)", e) from None
        return attrs

    def _check_arrays(self) -> None:
        """The arrays must be what the attrs say (rows, row shape, storage dtype): rows are addressed by the attrs."""
        n, want = self.n, ("uint16" if self.dtype == "bfloat16" else self.dtype)
        for k in ARRAYS:
            a = self._arrays[k]
            shape = (n, *self.shape) if k in ("noise", "sample") else (n,)
            if tuple(a.shape) != shape:
                raise _invalid(self.url, f"array {k!r}", f"shape {tuple(a.shape)}, the attributes say {shape}")
            if k in ("noise", "sample") and str(a.dtype) != want:
                raise _invalid(self.url, f"array {k!r}", f"dtype {a.dtype}, the attributes say {want}")

    # ---- opening
    @staticmethod
    def _zarr_store(url: str, storage_options: dict | None, read_only: bool):
        if _is_local(url):
            if storage_options:
                raise ValueError(f"storage_options given for a local pair store {url!r}")
            return zarr.storage.LocalStore(_local_path(url), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)

    @staticmethod
    def _marker_fs(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
        if _is_local(url):
            return fsspec.filesystem("file"), os.path.abspath(_local_path(url))
        return fsspec.core.url_to_fs(url, **(storage_options or {}))

    @classmethod
    def exists(cls, url: str, storage_options: dict | None = None) -> bool:
        opts = resolve_storage_options(url, storage_options)
        fs, root = cls._marker_fs(url, opts)
        try:
            fs.invalidate_cache()
        except Exception:  # noqa: BLE001 - not every fs caches
            pass
        return fs.exists(f"{root.rstrip('/')}/zarr.json")

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, read_only: bool = False) -> "PairStore":
        opts = resolve_storage_options(url, storage_options)
        if not cls.exists(url, opts):
            raise FileNotFoundError(f"no pair store at {url}")
        store = cls._zarr_store(url, opts, read_only)
        try:
            group = zarr.open_group(store=store, mode="r" if read_only else "r+")
        except (ValueError, TypeError, KeyError) as e:  # a torn zarr.json (JSONDecodeError is a ValueError)
            raise _invalid(url, "its group metadata (zarr.json)", e) from None
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
               zarr_shards: bool = False, compress: bool = False) -> "PairStore":
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
        store keeps its own (values read back identical either way)."""
        shape = [int(s) for s in shape]
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if chunk_size < 1 or shard_size < 1:
            raise ValueError(f"chunk_size and shard_size must be >= 1, got {chunk_size}, {shard_size}")
        if shard_size % chunk_size:
            raise ValueError(f"shard_size ({shard_size}) must be a multiple of chunk_size ({chunk_size})")
        if n_backward + n_forward < 1:
            raise ValueError("a pair store needs at least one row")
        if n_forward > 0 and n_backward % chunk_size:
            raise ValueError(
                f"n_backward ({n_backward}) must be a multiple of chunk_size ({chunk_size}) when n_forward > 0, "
                "so that no zarr chunk holds both backward and forward rows (concurrent shard writers would race "
                "on it); round n_pairs up to a multiple of chunk_size")
        if zarr_shards and n_forward > 0 and n_backward % shard_size:
            raise ValueError(
                f"zarr_shards needs n_backward ({n_backward}) to be a multiple of shard_size ({shard_size}) when "
                "n_forward > 0 (the last backward and first forward pair shards would share one zarr shard object)")
        structure = {"shape": shape, "n_backward": int(n_backward), "n_forward": int(n_forward),
                     "chunk_size": int(chunk_size), "shard_size": int(shard_size), "dtype": dtype}
        wanted = {**dict(attrs), "convention": CONVENTION, "noise_rng": NOISE_RNG}
        opts = resolve_storage_options(url, storage_options)
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
        for name in ("noise", "sample"):
            group.create_array(name, shape=(n, *shape), chunks=(chunk_size, *shape), shards=shards,
                               dtype=storage_dtype, fill_value=0, compressors=compressors, overwrite=True)
        group.create_array("label", shape=(n,), chunks=(chunk_size,), dtype="int64", fill_value=-1, overwrite=True)
        group.create_array("direction", shape=(n,), chunks=(chunk_size,), dtype="int8", fill_value=0,
                           overwrite=True)
        fs, root = cls._marker_fs(url, opts)
        return cls(url, zarr.open_group(store=zstore, mode="r+"), fs, root)

    @classmethod
    def create_from_config(cls, url: str, cfg: PairsConfig, *, shape: Sequence[int], teacher_hash: str,
                           extra_attrs: dict | None = None, storage_options: dict | None = None) -> "PairStore":
        """`create` with the counts, sizes, dtype and solver attrs taken from a PairsConfig."""
        attrs = {"teacher_hash": teacher_hash, **solver_attrs(cfg), **(extra_attrs or {})}
        return cls.create(url, shape=shape, n_backward=cfg.n_pairs, n_forward=cfg.n_forward,
                          chunk_size=cfg.chunk_size, shard_size=cfg.shard_size, dtype=cfg.dtype, attrs=attrs,
                          storage_options=storage_options, zarr_shards=cfg.zarr_shards, compress=cfg.compress)

    # ---- properties
    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    @property
    def n_backward(self) -> int:
        return int(self._attrs["n_backward"])

    @property
    def n_forward(self) -> int:
        return int(self._attrs["n_forward"])

    @property
    def n(self) -> int:
        return self.n_backward + self.n_forward

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._attrs["shape"])

    @property
    def dtype(self) -> str:
        return str(self._attrs["dtype"])

    @property
    def chunk_size(self) -> int:
        return int(self._attrs["chunk_size"])

    @property
    def shard_size(self) -> int:
        return int(self._attrs["shard_size"])

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
            m = _MARKER_RE.search(str(name))
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
        _with_retries(lambda: self._put_marker(self._marker_path(shard.index), data), self.url,
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
    def _convert(self, start: int, noise, sample, label, direction) -> dict[str, np.ndarray]:
        n = int(noise.shape[0])
        if tuple(noise.shape[1:]) != self.shape or tuple(sample.shape) != tuple(noise.shape):
            raise ValueError(f"noise/sample must have shape (n, *{self.shape}), got {tuple(noise.shape)} and "
                             f"{tuple(sample.shape)}")
        if label is None:
            label = torch.full((n,), -1, dtype=torch.long)
        if isinstance(direction, int):
            direction = torch.full((n,), direction, dtype=torch.long)
        label = torch.as_tensor(label).reshape(-1)
        direction = torch.as_tensor(direction).reshape(-1)
        if label.shape[0] != n or direction.shape[0] != n:
            raise ValueError(f"label/direction must have {n} rows")
        return {"noise": _to_storage(noise, self.dtype), "sample": _to_storage(sample, self.dtype),
                "label": label.detach().cpu().to(torch.int64).numpy(),
                "direction": direction.detach().cpu().to(torch.int8).numpy()}

    def _write_rows(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Raw region write (no marker). Callers keep regions chunk-aligned so no two writers share a chunk."""
        stop = start + int(arrays["noise"].shape[0])
        shard = next((s.index for s in self._plan if s.start <= start < s.stop), None)
        for k in ARRAYS:
            def write(k=k):
                self._arrays[k][start:stop] = arrays[k]
            _with_retries(write, self.url, f"shard {shard} array {k!r} rows [{start}, {stop})")

    def write_rows(self, start: int, noise, sample, label=None, direction: int | torch.Tensor = BACKWARD) -> None:
        """Write rows [start, start + len(noise)) without marking anything done (partial writes, tests)."""
        self._write_rows(start, self._convert(start, noise, sample, label, direction))

    def write_shard(self, shard: Shard | int, noise, sample, label=None,
                    direction: int | torch.Tensor | None = None) -> dict[str, str]:
        """Write a whole shard's rows, then (only after the write returned) its done marker. Returns the digests."""
        shard = self._plan[shard] if isinstance(shard, int) else shard
        if shard != self._plan[shard.index]:
            raise ValueError(f"{shard} is not shard {shard.index} of this store's plan {self._plan[shard.index]}")
        if int(noise.shape[0]) != shard.rows:
            raise ValueError(f"shard {shard.index} has {shard.rows} rows, got {int(noise.shape[0])}")
        arrays = self._convert(shard.start, noise, sample, label, shard.direction if direction is None else direction)
        self._write_rows(shard.start, arrays)
        h = _Hasher()
        h.update(arrays)
        digests = h.digests()
        self._write_marker(shard, digests)
        return digests

    def mark_done(self, shard: Shard, digests: dict[str, str], extra: dict | None = None) -> None:
        self._write_marker(shard, digests, extra)

    # ---- reading
    def read_raw(self, rows: slice) -> dict[str, np.ndarray]:
        """The stored arrays (storage dtypes: bfloat16 as uint16 bits) for a slice of rows."""
        return {k: self._arrays[k][rows] for k in ARRAYS}

    def _batch(self, raw: dict[str, np.ndarray], index: torch.Tensor) -> PairBatch:
        return PairBatch(noise=_from_storage(raw["noise"], self.dtype), sample=_from_storage(raw["sample"], self.dtype),
                         label=torch.from_numpy(np.asarray(raw["label"], dtype=np.int64)),
                         direction=torch.from_numpy(np.asarray(raw["direction"]).astype(np.int64)), index=index)

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
        raw = {k: self._arrays[k].get_orthogonal_selection((sel,)) for k in ARRAYS}
        b = self._batch(raw, uniq)
        return PairBatch(b.noise[inverse], b.sample[inverse], b.label[inverse], b.direction[inverse], idx)

    def read_chunk(self, c: int) -> PairBatch:
        r = self.chunk_rows(c)
        return self.read(slice(r.start, r.stop))

    def verify_shard(self, k: int) -> bool:
        """Recompute the sha256 of shard k's stored bytes and compare with its marker (False if none)."""
        m = self.marker(k)
        if m is None:
            return False
        s = self._plan[k]
        h = _Hasher()
        h.update(self.read_raw(slice(s.start, s.stop)))
        return h.digests()["all"] == m.get("sha256", {}).get("all")

    def __repr__(self) -> str:
        return (f"PairStore({self.url!r}, n_backward={self.n_backward}, n_forward={self.n_forward}, "
                f"shape={self.shape}, dtype={self.dtype})")


# --------------------------------------------------------------------------------------------------- verification
class PairStoreCorrupt(RuntimeError):
    """Stored pairs whose bytes no longer match the sha256 in their shard's done marker."""


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
