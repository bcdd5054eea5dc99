"""The rows of a conditional pair store (super-resolution, data.sr): which real image each row super-resolves, its
measurement and its source, all pure functions of (store seed, global row) as unconditional rows' noise is
(`reflow_core.rng`), so no value depends on the batch, the shard layout or the worker.

Backward row r (r < n_backward), store seed s:
    HR row      i_r = floor(u * n_data), u the 53-bit uniform of the first output of the row's data stream
                (SplitMix64 from `rng.row_seed(s, r, TAG_DATA)`, as `rng.row_labels` draws a label)
    measurement n_r ~ N(0, I) of the low-res shape, Box-Muller as `rng.row_noise` on the stream of
                `rng.row_seed(s, r, TAG_MEASURE)`
    source      eps_r = `rng.row_noise(s, [r], shape)` (the noise an unconditional store would hold in row r)
    stored      cond c_r = A^T (A x_{i_r} + sigma_y n_r), noise x_src = sqrt(1 - sigma_p^2) c_r + sigma_p eps_r,
                sample = the teacher's ODE endpoint from x_src under c_r (`reflow_core.sr`)
Forward row r (r >= n_backward): the real row `rng.forward_indices` picks (as in an unconditional store), its c_r
from n_r likewise; noise = that row inverted to t = 1 under c_r, sample = the row.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..rng import BLOCK_ELEMS, noise_block, row_keys, row_noise, row_stream, rows_array, uniform53
from ..sr import lift, measure, source

TAG_DATA, TAG_MEASURE = 0x6872726F77, 0x6D65617372  # "hrrow", "measr": streams apart from noise and labels
KINDS = ("sr",)


def cond_attrs(sr, shape: Sequence[int]) -> dict:
    """attrs["cond"] (`layout.CondAttrs`) of a super-resolution run's stores: data.sr's settings (an `SRConfig`) and
    the condition's per-row shape, the data's (A^T y is an image of the data's size)."""
    return {"kind": "sr", "shape": [int(d) for d in shape], "scale": int(sr.scale), "degradation": sr.degradation,
            "sigma_p": float(sr.sigma_p), "sigma_y": float(sr.sigma_y)}


def data_rows(seed: int, rows, n_data: int) -> torch.Tensor:
    """The real rows (long, (len(rows),)) backward rows super-resolve: uniform over [0, n_data), per row."""
    if n_data < 1:
        raise ValueError("conditional pairs need a non-empty data set")
    idx = rows_array(rows)
    if not idx.shape[0]:
        return torch.zeros(0, dtype=torch.long)
    u = uniform53(row_stream(row_keys(seed, idx, TAG_DATA), 1, 1)[:, 0])  # [0, 1 - 2**-53]
    return torch.from_numpy(np.minimum(np.floor(u * n_data).astype(np.int64), n_data - 1))


def measurement_noise(seed: int, rows, shape: Sequence[int]) -> torch.Tensor:
    """N(0, I) float32 (len(rows), *shape): row_noise's scheme on the rows' measurement streams."""
    idx = rows_array(rows)
    shape = tuple(int(s) for s in shape)
    n, d = idx.shape[0], int(np.prod(shape))
    out = np.empty((n, d), dtype=np.float32)
    if n and d:
        keys = row_keys(seed, idx, TAG_MEASURE)
        step = max(1, BLOCK_ELEMS // (d + 1))
        for b in range(0, n, step):
            noise_block(keys[b:b + step], out[b:b + step])
    return torch.from_numpy(out).reshape(n, *shape)


def _check(cond: dict) -> None:
    if cond.get("kind") not in KINDS:
        raise ValueError(f"unknown pair store condition kind {cond.get('kind')!r}; this code knows {KINDS}")


def condition(cond: dict, seed: int, rows, x: torch.Tensor) -> torch.Tensor:
    """c = A^T (A x + sigma_y n) of the rows' HR images x (len(rows), C, H, W), n their measurement noise."""
    _check(cond)
    scale, deg = int(cond["scale"]), str(cond["degradation"])
    n = measurement_noise(seed, rows, (x.shape[1], x.shape[2] // scale, x.shape[3] // scale))
    return lift(measure(x, n, scale, deg, float(cond["sigma_y"])), scale, deg)


def backward_rows(cond: dict, seed: int, rows, data_x: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(real rows i, sources x_src, conditions c) of backward rows `rows` (global row numbers)."""
    idx = data_rows(seed, rows, len(data_x))
    x = data_x[idx].to(torch.float32)
    c = condition(cond, seed, rows, x)
    return idx, source(c, row_noise(seed, rows, tuple(x.shape[1:])), float(cond["sigma_p"])), c
