"""One interface for a sample set's quality against real data, whatever the data: `Reference.score(x)`.

The reference side is done once per evaluation: features are extracted by a `FeatureExtractor` (identity for the toy
clouds, the digit classifier, Inception), their statistics computed once and cached in one format (`FeatureStats`
as `<metric>_ref-<key>.npz`, key = the real samples' bytes and the extractor's name), and each evaluated sample set
is scored by a distance from statistics. A paired metric (a reconstruction against its ground truth, such as PSNR)
is a second kind of reference with a `score(x, target)` of its own; it plugs in beside these.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch

from .. import storage
from .distances import energy_from, feature_stats, flat, frechet_distance, mean_cdist, sliced_w2_sorted, unit_directions


@runtime_checkable
class Reference(Protocol):
    """Quality of generated samples against the real data a reference was built from."""

    metric: str  # the headline key of `score`, lower is better

    def score(self, x: torch.Tensor) -> dict[str, float]: ...


@runtime_checkable
class FeatureExtractor(Protocol):
    """Features (N, D) of samples; `name` identifies the extractor and its weights (part of the cache key)."""

    name: str

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64: what a Frechet distance compares."""

    mu: np.ndarray
    sigma: np.ndarray

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "FeatureStats":
        with np.load(io.BytesIO(data)) as z:
            return cls(z["mu"], z["sigma"])


def moments(features) -> FeatureStats:
    """`FeatureStats` of features (N, D), unbiased covariance (`distances.feature_stats`)."""
    return FeatureStats(*feature_stats(features))


def frechet(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


class ToyReference:
    """Toy 2-D clouds (identity features): sliced W2 and energy distance, the reference's sorted projections and its
    within-cloud term E|Y - Y'| computed once. `score(x)` equals `sliced_w2(x, real, n_proj,
    generator=manual_seed(seed))` and `energy_distance(x, real, chunk)` without redoing the reference's work."""

    metric = "sliced_w2"

    def __init__(self, real: torch.Tensor, n_proj: int = 256, seed: int = 0, chunk: int = 2048):
        self.y = flat(real).double()
        self.chunk = int(chunk)
        self.u = unit_directions(self.y.shape[1], n_proj, torch.Generator().manual_seed(seed), self.y.device)
        self.py = torch.sort(self.y @ self.u, dim=0).values
        self.eyy = mean_cdist(self.y, self.y, self.chunk, exclude_diag=True)

    def sliced_w2(self, x: torch.Tensor) -> float:
        x = flat(x).to(self.y.device).double()
        if x.shape[1] != self.y.shape[1]:
            raise ValueError(f"dimension mismatch: {x.shape[1]} vs {self.y.shape[1]}")
        return sliced_w2_sorted(torch.sort(x @ self.u, dim=0).values, self.py)

    def energy(self, x: torch.Tensor) -> float:
        return energy_from(flat(x).to(self.y.device).double(), self.y, self.eyy, self.chunk)

    def score(self, x: torch.Tensor) -> dict[str, float]:
        return {"sliced_w2": self.sliced_w2(x), "energy": self.energy(x)}

    __call__ = score


class FrechetReference:
    """A Frechet distance between feature statistics: the real samples' `FeatureStats` once (loaded from
    `cache_url` when an earlier evaluation of the same samples with the same extractor left them there),
    each scored sample set's statistics per call. `statistics_computed` counts reference extractions (0 on a hit)."""

    def __init__(self, metric: str, extractor: FeatureExtractor, real: torch.Tensor, cache_url: str | None = None,
                 statistics: Callable[[torch.Tensor], FeatureStats] = moments,
                 distance: Callable[[FeatureStats, FeatureStats], float] = frechet):
        self.metric, self.extractor = metric, extractor
        self._statistics, self._distance = statistics, distance
        self.statistics_computed = 0
        self.cache = None
        if cache_url is not None:
            real_bytes = torch.as_tensor(real).detach().float().cpu().contiguous().numpy().tobytes()
            key = hashlib.sha256(real_bytes + str(tuple(real.shape)).encode() + extractor.name.encode()).hexdigest()
            self.cache = storage.join(cache_url, f"{metric}_ref-{key[:24]}.npz")
        self.stats = self._load()
        if self.stats is None:
            self.stats = self.statistics(real)
            self.statistics_computed += 1
            if self.cache is not None:
                storage.atomic_write_bytes(self.cache, self.stats.to_bytes())

    def _load(self) -> FeatureStats | None:
        if self.cache is None or not storage.exists(self.cache):
            return None
        try:
            return FeatureStats.from_bytes(storage.read_bytes(self.cache))
        except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed and rewritten
            return None

    def statistics(self, x: torch.Tensor) -> FeatureStats:
        """The `FeatureStats` of samples x."""
        return self._statistics(self.extractor.features(x))

    def score(self, x: torch.Tensor) -> dict[str, float]:
        return {self.metric: float(self._distance(self.statistics(x), self.stats))}
