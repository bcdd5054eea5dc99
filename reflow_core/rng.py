"""Every seed the pipeline derives, one named function each, and the counter-based per-row noise streams.

Per-row streams: a pair-store row's noise and label are a pure function of (seed, global row), drawn from SplitMix64
streams keyed by `row_seed(seed, row, tag)` (Box-Muller in float64 for the noise), so they depend on neither the batch
size, the shard layout nor which other rows are drawn with them. Derived seeds: a stage's generators are seeded from
the configured seed and the step (or round) by the functions below, never by arithmetic written at the call site.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

MASK64 = (1 << 64) - 1
TAG_NOISE, TAG_LABEL, TAG_PERM = 0x6E6F697365, 0x6C6162656C, 0x7065726D


# --- derived seeds -----------------------------------------------------------------------------------------------------
def round_seed(seed: int, r: int) -> int:
    """The seed of reflow round r: the configured one for round 1, a distinct one for each later round."""
    return seed if r <= 1 else seed + 7_919 * (r - 1)


def batch_seed(seed: int, key: int) -> int:
    """The generator seed of training batch `key` (= step, or step * world + rank under DDP): data indices, fresh
    noise and label dropout."""
    return seed * 7_919 + key


def time_seed(seed: int, key: int) -> int:
    """The generator seed of training batch `key`'s time draws (a stream apart from `batch_seed`'s)."""
    return seed * 1_000_003 + key


def label_seed(seed: int) -> int:
    """The seed of the class labels drawn for evaluation or sampling beside noise seeded by `seed`."""
    return seed + 1


def draw_seed(seed: int, k: int) -> int:
    """The seed of source draw k of a super-resolution evaluation seeded by `seed`."""
    return seed + k + 1


def reference_seed(seed: int) -> int:
    """The seed of the real-data reference an evaluation seeded by `seed` compares against."""
    return seed + 2


# --- per-row streams ---------------------------------------------------------------------------------------------------
def splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def row_seed(seed: int, row: int, tag: int = TAG_NOISE) -> int:
    """A 63-bit generator seed for one global row: a hash of (seed, row, stream tag)."""
    return splitmix64(splitmix64((seed * 1_000_003 + row) & MASK64) ^ tag) % (2 ** 63)


# Vectorised counterparts (numpy uint64: wrapping arithmetic is defined there, unlike torch's signed int64).
_U64 = np.uint64
_GAMMA = _U64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_LOW63 = _U64(2 ** 63 - 1)
_INV53 = 2.0 ** -53
BLOCK_ELEMS = 1 << 20  # elements per block of rows in row_noise: its uint64/float64 temporaries stay ~4 MB each
THREAD_ELEMS = 1 << 18  # row_noise spreads its blocks over threads from this many elements on


def mix64_(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function applied in place to a uint64 array (wrapping): z ^= z >> 30; z *= C1; ..."""
    t = np.empty_like(z)
    for shift, mult in ((30, _MIX1), (27, _MIX2)):
        np.right_shift(z, _U64(shift), out=t)
        np.bitwise_xor(z, t, out=z)
        np.multiply(z, mult, out=z)
    np.right_shift(z, _U64(31), out=t)
    np.bitwise_xor(z, t, out=z)
    return z


def splitmix64_array(z: np.ndarray) -> np.ndarray:
    """`splitmix64` elementwise on a uint64 array (a new array): the first output of SplitMix64 with state z."""
    with np.errstate(over="ignore"):
        z = np.asarray(z, dtype=_U64)
        return mix64_(np.add(z, _GAMMA, out=np.empty_like(z)))


def rows_array(rows: range | Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
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


def row_keys(seed: int, rows: np.ndarray, tag: int) -> np.ndarray:
    """`row_seed(seed, r, tag)` for every r in rows (uint64 array), bit for bit."""
    base = _U64((int(seed) * 1_000_003) & MASK64)
    with np.errstate(over="ignore"):
        z = rows.astype(_U64) + base  # == (seed * 1_000_003 + r) & MASK64 (int64 -> uint64 wraps as & MASK64)
        z = splitmix64_array(z)
        np.bitwise_xor(z, _U64(tag & MASK64), out=z)
        z = splitmix64_array(z)
    return np.bitwise_and(z, _LOW63, out=z)


def row_stream(keys: np.ndarray, first: int, count: int, stride: int = 1) -> np.ndarray:
    """(len(keys), count) uint64: outputs first, first + stride, ... (count of them; 1-based) of the standard
    SplitMix64 generator started from state key, output i being mix(key + i * GAMMA) (wrapping)."""
    with np.errstate(over="ignore"):
        steps = np.arange(first, first + stride * count, stride, dtype=_U64)[:count] * _GAMMA
        return mix64_(keys[:, None] + steps[None, :])


def uniform53(x: np.ndarray) -> np.ndarray:
    """u = (x >> 11) * 2**-53 in [0, 1), float64 (exact: 53 bits)."""
    return np.right_shift(x, _U64(11), out=x).astype(np.float64) * _INV53


def noise_block(keys: np.ndarray, out: np.ndarray) -> None:
    """Fill out (len(keys), d) float32 with the rows' Box-Muller normals (see row_noise)."""
    d = out.shape[1]
    pairs = (d + 1) // 2
    # radius from the odd outputs: 1 - u = (2**53 - (x >> 11)) * 2**-53 is exact and in (0, 1], so never log(0)
    x = np.right_shift(row_stream(keys, 1, pairs, 2), _U64(11))
    r = np.subtract(_U64(1 << 53), x, out=x).astype(np.float64)
    del x
    r *= _INV53
    np.log(r, out=r)
    r *= -2.0
    np.sqrt(r, out=r)
    theta = uniform53(row_stream(keys, 2, pairs, 2))  # angle from the even outputs
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
    idx = rows_array(rows)
    shape = tuple(int(s) for s in shape)
    n, d = idx.shape[0], math.prod(shape)
    out = np.empty((n, d), dtype=np.float32)
    if n and d:
        keys = row_keys(seed, idx, TAG_NOISE)
        threads = min(torch.get_num_threads(), 8) if n * d >= THREAD_ELEMS else 1
        step = max(1, min(BLOCK_ELEMS // (d + 1), -(-n // threads)))
        blocks = [(keys[b:b + step], out[b:b + step]) for b in range(0, n, step)]
        if threads > 1 and len(blocks) > 1:
            with ThreadPoolExecutor(min(threads, len(blocks)), thread_name_prefix="row-noise") as ex:
                list(ex.map(lambda kb: noise_block(*kb), blocks))
        else:
            for kb in blocks:
                noise_block(*kb)
    return torch.from_numpy(out).reshape(n, *shape)


def row_labels(seed: int, rows: range | Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Uniform class labels (long, (len(rows),)), a pure function of (seed, row): floor(u * num_classes) with u the
    53-bit uniform of the first SplitMix64 output of the row's label-stream state row_seed(seed, r, label tag)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    idx = rows_array(rows)
    if not idx.shape[0]:
        return torch.zeros(0, dtype=torch.long)
    u = uniform53(row_stream(row_keys(seed, idx, TAG_LABEL), 1, 1)[:, 0])  # [0, 1 - 2**-53]
    lab = np.minimum(np.floor(u * num_classes).astype(np.int64), num_classes - 1)  # the min only guards rounding
    return torch.from_numpy(lab)


def forward_indices(seed: int, rows: range | Sequence[int] | torch.Tensor, n_data: int) -> torch.Tensor:
    """Real-data indices for forward-section rows j (0-based within the forward section): perm[j % n_data],
    perm a permutation of the data set seeded by the store seed."""
    if n_data < 1:
        raise ValueError("forward pairs need a non-empty data set")
    g = torch.Generator().manual_seed(row_seed(seed, 0, TAG_PERM))
    perm = torch.randperm(n_data, generator=g)
    j = torch.from_numpy(rows_array(rows).astype(np.int64))
    return perm[j % n_data]
