"""What a pair store is made of, apart from the zarr I/O: its constants and metadata schemas, the shard plan, the
checks a layout must pass (run at plan time too), row batches, dtype conversion and the bytes' hash.

Rows [0, n_backward) are backward pairs (noise -> teacher sample), rows [n_backward, N) forward pairs (real data ->
inverted noise). A conditional store (super-resolution) also holds each row's image condition, array COND, and
records how it was made in attrs["cond"] (`CondAttrs`); an unconditional store has neither, exactly as before.
Shards are whole numbers of chunks and never straddle the two sections, so writers of different shards never touch
the same chunk object.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..paths import CONVENTION

DTYPES = ("float32", "float16", "bfloat16")
ARRAYS = ("noise", "sample", "label", "direction")
COND = "cond"  # the condition array of a conditional store: (N, *cond shape), the store's dtype
BACKWARD, FORWARD = 0, 1
# how row_noise/row_labels draw a row's values: recorded in every store `create` makes, so a store whose noise was
# drawn otherwise (e.g. by the per-row torch.Generator scheme before it) is never resumed with different noise
NOISE_RNG = "splitmix64-boxmuller-v1"
# pairs simulated with guidance record it (an unguided store has neither key): guided and unguided never mix
GUIDANCE_ATTRS = ("guidance", "guidance_weight")
# identity keys of attrs compared when create() finds an existing store (besides the structural ones)
# (a conditional store's "cond" is one of them: conditional and unconditional pairs never mix)
IDENTITY_ATTRS = ("teacher_hash", "solver", "nfe", "grid", "rho", "seed", "convention", "noise_rng", *GUIDANCE_ATTRS,
                  COND)


# --- metadata -----------------------------------------------------------------------------------------------------
# Stored metadata is validated when read: a team shares one root, so whatever another writer left there is data to
# check, not to trust. The bounds keep a hostile attrs document from making the shard plan explode.
MAX_SHARDS = 1_000_000
_HEX64 = r"^[0-9a-f]{64}$"
_Count = Field(strict=True, ge=0, le=2 ** 48)
_Size = Field(strict=True, ge=1, le=2 ** 40)


def _positive_dims(shape: list[int]) -> list[int]:
    if any(not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= 2 ** 31 for d in shape):
        raise ValueError(f"shape must be positive ints, got {shape}")
    return shape


class CondAttrs(BaseModel):
    """attrs["cond"] of a conditional store: the condition's kind, its per-row shape and the settings that made it
    (kind "sr": c = A^T (A x + sigma_y n) of data.sr, `reflow_core.sr`; the rows' sources x_src = sqrt(1 - sigma_p^2)
    c + sigma_p eps are the stored noise)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern="^sr$")
    shape: list[int] = Field(min_length=1, max_length=8)
    scale: int = Field(strict=True, ge=1, le=64)
    degradation: str = Field(pattern="^(avgpool|bicubic)$")
    sigma_p: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    sigma_y: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> "CondAttrs":
        _positive_dims(self.shape)
        return self


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
    guidance: str | None = Field(None, pattern=r"^cfg$")
    guidance_weight: float | None = Field(None, allow_inf_nan=False)
    cond: CondAttrs | None = None

    @model_validator(mode="after")
    def _check(self) -> "StoreAttrs":
        _positive_dims(self.shape)
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


def check_cond(cond: dict) -> dict:
    """A conditional store's attrs["cond"] as `CondAttrs` validates it (ValueError otherwise), before it is written."""
    return CondAttrs.model_validate(cond).model_dump()


def array_names(attrs: dict) -> tuple[str, ...]:
    """The arrays of a store with these attrs, in hashing order: ARRAYS, then COND when it is conditional."""
    return (*ARRAYS, COND) if attrs.get(COND) is not None else ARRAYS


def cond_shape(attrs: dict) -> tuple[int, ...] | None:
    """The per-row shape of a conditional store's condition; None for an unconditional store."""
    c = attrs.get(COND)
    return None if c is None else tuple(int(d) for d in c["shape"])


# --- the plan -------------------------------------------------------------------------------------------------------
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


def check_layout(*, n_backward: int, n_forward: int, chunk_size: int, shard_size: int, dtype: str,
                 zarr_shards: bool = False) -> None:
    """The rules a new store's layout must pass (ValueError naming the rule). `PairStore.create` applies them, and
    the plan applies them to a run's pairs settings before any stage runs, so a bad layout never waits for a teacher."""
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


@dataclass
class PairBatch:
    noise: torch.Tensor  # float32 (B, *shape)
    sample: torch.Tensor  # float32 (B, *shape)
    label: torch.Tensor  # long (B,), -1 = none
    direction: torch.Tensor  # long (B,)
    index: torch.Tensor | None = None  # long (B,) global rows, where known
    cond: torch.Tensor | None = None  # float32 (B, *cond shape): a conditional store's condition, else None

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    def to(self, device) -> "PairBatch":
        return PairBatch(self.noise.to(device), self.sample.to(device), self.label.to(device),
                         self.direction.to(device), None if self.index is None else self.index.to(device),
                         None if self.cond is None else self.cond.to(device))

    def select(self, i) -> "PairBatch":
        """The rows i (an index tensor or slice) of every field."""
        return PairBatch(self.noise[i], self.sample[i], self.label[i], self.direction[i],
                         None if self.index is None else self.index[i], None if self.cond is None else self.cond[i])


# --- bytes ----------------------------------------------------------------------------------------------------------
def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
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


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(torch.float32)
    return torch.from_numpy(a).to(torch.float32)


class Hasher:
    """sha256 per array over the bytes written, in row order (independent of how the rows were split), and "all" over
    the digests of `names` in order (a store's `array_names`: an unconditional store's digests are what they were
    before conditional stores existed; a conditional one's "all" covers its condition too)."""

    def __init__(self, names: tuple[str, ...] = ARRAYS):
        self.names = tuple(names)
        self.h = {k: hashlib.sha256() for k in self.names}

    def update(self, arrays: dict[str, np.ndarray]) -> None:
        for k in self.names:
            self.h[k].update(np.ascontiguousarray(arrays[k]).tobytes())

    def digests(self) -> dict[str, str]:
        d = {k: h.hexdigest() for k, h in self.h.items()}
        d["all"] = hashlib.sha256("".join(d[k] for k in self.names).encode()).hexdigest()
        return d
