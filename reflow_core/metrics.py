"""Evaluation metrics: trajectory straightness, distribution distances, Frechet distances (digit features, FID).

Time convention (see docs/architecture.md): t = 0 is data, t = 1 is noise, velocity v = x_noise - x_data and
generation integrates from t = 1 down to t = 0.

Every public metric returns a plain python ``float``. This module never imports prefect or mlflow; torch-fidelity
is imported lazily inside :class:`FIDReference` only.
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from reflow_core import storage

__all__ = [
    "straightness",
    "sliced_w2",
    "energy_distance",
    "ToyReference",
    "mmd_rbf",
    "frechet_distance",
    "feature_stats",
    "DigitFeatureNet",
    "train_digit_classifier",
    "load_or_train_digit_classifier",
    "digit_features",
    "digit_accuracy",
    "digit_fd",
    "digit_stats",
    "fid_torch_fidelity",
    "FIDReference",
    "INCEPTION_URL",
    "inception_cache_path",
]


# ----------------------------------------------------------------------------------------------------------------
# straightness
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def straightness(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_noise: torch.Tensor,
    steps: int = 64,
    *,
    return_per_sample: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
):
    """Liu et al.'s straightness S = int_0^1 E || (x_noise - x_data) - v(x_t, t) ||^2 dt along the model's own path.

    The ODE is integrated with Euler on a uniform grid from t = 1 (``x_noise``) to t = 0 with ``steps`` steps;
    ``velocity_fn(x, t)`` is the solvers' velocity (``solvers.Velocity``; labels bound by the caller, e.g.
    ``VelocityModel.solver_velocity(label)``) and gets ``t`` as a float tensor of shape (B,). ``x_data`` is the
    final point. The squared norm is summed over all non-batch dims; the time integral is the left Riemann sum
    over the velocities evaluated at each Euler step. A field whose velocity is constant along each path gives
    exactly 0.

    Returns ``float`` S (mean over samples), or ``(S, per_sample)`` with ``per_sample`` a CPU tensor (B,) when
    ``return_per_sample=True``. ``callback(i, t, x, v)`` (the solvers' step callback) sees every Euler step before
    it is taken, so a caller can keep the trajectory (e.g. for a plot) without integrating the ODE a second time.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    x = x_noise.clone()
    b = x.shape[0]
    ts = torch.linspace(1.0, 0.0, steps + 1, device=x.device, dtype=torch.float32)
    vs = []
    for i in range(steps):
        t = ts[i].expand(b).clone()
        v = velocity_fn(x, t)
        vs.append(v.detach())
        if callback is not None:
            callback(i, ts[i], x, v)
        x = x + (ts[i + 1] - ts[i]).to(x.dtype) * v
    x_data = x
    disp = (x_noise - x_data).reshape(b, -1).double()
    dt = 1.0 / steps
    per_sample = torch.zeros(b, dtype=torch.float64, device=x.device)
    for v in vs:
        per_sample += dt * ((disp - v.reshape(b, -1).double()) ** 2).sum(dim=1)
    s = float(per_sample.mean().item())
    if return_per_sample:
        return s, per_sample.float().cpu()
    return s


# ----------------------------------------------------------------------------------------------------------------
# distances between point clouds
# ----------------------------------------------------------------------------------------------------------------
def _flat(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.reshape(x.shape[0], -1)


def _quantile_resample(sorted_vals: torch.Tensor, n: int) -> torch.Tensor:
    """Pick ``n`` evenly spaced quantiles (mid-points) from a column-sorted (m, P) tensor."""
    m = sorted_vals.shape[0]
    if m == n:
        return sorted_vals
    idx = ((torch.arange(n, device=sorted_vals.device, dtype=torch.float64) + 0.5) * m / n).floor().long()
    return sorted_vals[idx.clamp_(0, m - 1)]


def _unit_directions(d: int, n_proj: int, generator: torch.Generator | None, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.randn(d, n_proj, generator=generator, device=gen_device, dtype=torch.float64).to(device)
    return u / u.norm(dim=0, keepdim=True).clamp_min(1e-12)


def _sliced_w2_sorted(px: torch.Tensor, py: torch.Tensor) -> float:
    """sqrt(mean over projections of the 1-D W2^2) from column-sorted projections (N, P) and (M, P)."""
    n = min(px.shape[0], py.shape[0])
    px, py = _quantile_resample(px, n), _quantile_resample(py, n)
    w2sq = ((px - py) ** 2).mean(dim=0)  # (n_proj,)
    return float(w2sq.mean().sqrt().item())


def sliced_w2(
    x: torch.Tensor,
    y: torch.Tensor,
    n_proj: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced Wasserstein-2 distance between point clouds x (N, ...) and y (M, ...).

    sqrt( mean over ``n_proj`` random unit directions u of W2^2(u.x, u.y) ), the 1-D W2 computed from sorted
    projections. If N != M the larger cloud's sorted projections are subsampled at the smaller's quantile levels.
    For two clouds that differ by a translation m, the value is about |m| / sqrt(d).
    Against one reference cloud many times, :class:`ToyReference` projects and sorts the reference once.
    """
    x = _flat(x).double()
    y = _flat(y).to(x.device).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    u = _unit_directions(x.shape[1], n_proj, generator, x.device)
    return _sliced_w2_sorted(torch.sort(x @ u, dim=0).values, torch.sort(y @ u, dim=0).values)


def _mean_cdist(a: torch.Tensor, b: torch.Tensor, chunk: int, exclude_diag: bool = False) -> float:
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        total += float(torch.cdist(a[i : i + chunk], b).sum().item())
    n, m = a.shape[0], b.shape[0]
    if exclude_diag:  # the diagonal is zero, so only the normaliser changes (U-statistic)
        return total / max(n * (n - 1), 1)
    return total / (n * m)


def energy_distance(x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Euclidean, computed with torch.cdist in row chunks).

    The within-cloud terms are U-statistics (self-pairs excluded), so the estimate is unbiased and can be slightly
    negative when both clouds come from the same distribution.
    """
    x = _flat(x).double()
    y = _flat(y).to(x.device).double()
    return _energy(x, y, _mean_cdist(y, y, chunk, exclude_diag=True), chunk)


def _energy(x: torch.Tensor, y: torch.Tensor, eyy: float, chunk: int) -> float:
    exy = _mean_cdist(x, y, chunk)
    exx = _mean_cdist(x, x, chunk, exclude_diag=True)
    return float(2.0 * exy - exx - eyy)


class ToyReference:
    """The reference side of the toy distances, computed once: :func:`sliced_w2` (projection directions from
    ``torch.Generator().manual_seed(seed)``, the reference's sorted projections) and :func:`energy_distance`
    (its within-reference term E|Y - Y'|). ``ref(x)`` returns ``{"sliced_w2", "energy"}`` equal to
    ``sliced_w2(x, real, n_proj, generator=manual_seed(seed))`` and ``energy_distance(x, real, chunk)``, without
    redoing the reference's O(M log M) sort and O(M^2) distances for every evaluated sample set."""

    def __init__(self, real: torch.Tensor, n_proj: int = 256, seed: int = 0, chunk: int = 2048):
        self.y = _flat(real).double()
        self.chunk = int(chunk)
        self.u = _unit_directions(self.y.shape[1], n_proj, torch.Generator().manual_seed(seed), self.y.device)
        self.py = torch.sort(self.y @ self.u, dim=0).values
        self.eyy = _mean_cdist(self.y, self.y, self.chunk, exclude_diag=True)

    def sliced_w2(self, x: torch.Tensor) -> float:
        x = _flat(x).to(self.y.device).double()
        if x.shape[1] != self.y.shape[1]:
            raise ValueError(f"dimension mismatch: {x.shape[1]} vs {self.y.shape[1]}")
        return _sliced_w2_sorted(torch.sort(x @ self.u, dim=0).values, self.py)

    def energy(self, x: torch.Tensor) -> float:
        return _energy(_flat(x).to(self.y.device).double(), self.y, self.eyy, self.chunk)

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        return {"sliced_w2": self.sliced_w2(x), "energy": self.energy(x)}


def mmd_rbf(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
    chunk: int = 2048,
) -> float:
    """Unbiased squared MMD with a sum of RBF kernels exp(-|a - b|^2 / (2 h^2)) over ``bandwidths``."""
    x = _flat(x).double()
    y = _flat(y).to(x.device).double()
    hs = torch.tensor(list(bandwidths), dtype=torch.float64, device=x.device)

    def ksum(a, b, exclude_diag):
        total = 0.0
        for i in range(0, a.shape[0], chunk):
            d2 = torch.cdist(a[i : i + chunk], b).pow(2)
            total += float(torch.exp(-d2[..., None] / (2 * hs**2)).sum().item())
        n, m = a.shape[0], b.shape[0]
        if exclude_diag:
            total -= n * len(bandwidths)  # k(a, a) = 1 per bandwidth
            return total / max(n * (n - 1), 1)
        return total / (n * m)

    return float(ksum(x, x, True) + ksum(y, y, True) - 2.0 * ksum(x, y, False))


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------
def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (float64 numpy, unbiased) of features (N, D) given as tensor or array."""
    if torch.is_tensor(features):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    f = f.reshape(f.shape[0], -1)
    mu = f.mean(axis=0)
    sigma = np.atleast_2d(np.cov(f, rowvar=False))
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), as in the reference FID code (pytorch-fid / TTUR).

    Uses scipy.linalg.sqrtm; if the product is near singular (non-finite sqrtm), ``eps`` is added to the diagonals;
    small imaginary parts from numerical error are dropped. If the imaginary part is large, the trace of the square
    root is taken from the eigenvalues of S1 S2 instead (they are real and >= 0 in exact arithmetic).
    """
    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("mean vectors / covariances have different shapes")
    diff = mu1 - mu2

    def _sqrtm(a):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = linalg.sqrtm(a)
        return out[0] if isinstance(out, tuple) else out

    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            eig = np.linalg.eigvals(sigma1.dot(sigma2)).astype(np.complex128)
            tr_covmean = float(np.sum(np.sqrt(eig)).real)
        else:
            tr_covmean = float(np.trace(covmean.real))
    else:
        tr_covmean = float(np.trace(covmean))
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------------------------------------------
# digit feature network (a small offline stand-in for Inception on 8x8 / 16x16 digits)
# ----------------------------------------------------------------------------------------------------------------
class DigitFeatureNet(nn.Module):
    """Small CNN classifier for 1-channel digits in [-1, 1].

    Accepts (B, 1, H, W) or flat (B, H*W) square inputs of any size (8x8 sklearn digits, 16x16, 28x28 ...) and
    resizes them internally to 16x16. ``features(x)`` gives the ``feature_dim``-d penultimate activation used for
    the Frechet distance; ``forward(x)`` gives class logits.
    """

    SIZE = 16

    def __init__(self, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(next(self.parameters()).device, torch.float32)
        if x.dim() == 2:
            side = int(round(math.sqrt(x.shape[1])))
            if side * side != x.shape[1]:
                raise ValueError(f"flat input of size {x.shape[1]} is not a square image")
            x = x.reshape(-1, 1, side, side)
        elif x.dim() == 3:
            x = x.unsqueeze(1)
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (self.SIZE, self.SIZE):
            x = F.interpolate(x, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self._prep(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Cheap augmentation: shift each image by up to ``max_shift`` pixels (padding with the background -1)."""
    b, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (b, h)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # (b, w)
    bi = torch.arange(b, device=x.device)[:, None, None]
    return pad[:, 0][bi, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train_digit_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 400,
    seed: int = 0,
    *,
    batch_size: int = 128,
    lr: float = 2e-3,
    feature_dim: int = 128,
    augment: bool = True,
    device: str | torch.device | None = None,
) -> DigitFeatureNet:
    """Train :class:`DigitFeatureNet` on digits ``x`` (N, 1, H, W) or (N, H*W) in [-1, 1] with labels ``y`` (N,).

    Adam + cosine decay, 1-pixel random shifts. Deterministic for a given seed on CPU; a few seconds on sklearn
    digits (1797 8x8 images), > 95 % held-out accuracy. Returns the net in eval mode.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device) if device is not None else torch.device("cpu")
    y = torch.as_tensor(y).long()
    num_classes = int(y.max().item()) + 1 if y.numel() else 10
    net = DigitFeatureNet(feature_dim=feature_dim, num_classes=max(num_classes, 10)).to(device)
    xs = net._prep(torch.as_tensor(x).float().to(device)).detach()
    ys = y.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    net.train()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # a net this small gains nothing from intra-op threads, and they thrash badly on a busy machine
        torch.set_num_threads(1)
    try:
        _train_loop(net, opt, sched, xs, ys, steps, batch_size, augment, gen, device)
    finally:
        torch.set_num_threads(threads)
    net.eval()
    return net


def _train_loop(net, opt, sched, xs, ys, steps, batch_size, augment, gen, device):
    n = xs.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(device)
        xb = xs[idx]
        if augment:
            xb = _random_shift(xb, gen)
        loss = F.cross_entropy(net(xb), ys[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def load_or_train_digit_classifier(cache_url: str, x: torch.Tensor, y: torch.Tensor, **train_kwargs) -> DigitFeatureNet:
    """Load a cached :class:`DigitFeatureNet` from ``cache_url`` (any fsspec URL), or train one and cache it there.

    The cache holds ``{"state_dict", "feature_dim", "num_classes"}``, written by
    :func:`reflow_core.checkpoint.save_file` (atomic, with a ``<cache_url>.sha256`` sidecar) and read by
    ``checkpoint.load_file`` (hash-checked, ``weights_only=True``); a cache that fails the check (or has no sidecar,
    e.g. one written before this) raises ``CheckpointError`` naming the files to delete.
    """
    from reflow_core import checkpoint

    if storage.exists(cache_url):
        blob = checkpoint.load_file(cache_url)
        net = DigitFeatureNet(feature_dim=int(blob["feature_dim"]), num_classes=int(blob["num_classes"]))
        net.load_state_dict(blob["state_dict"])
        net.eval()
        return net
    net = train_digit_classifier(x, y, **train_kwargs)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    checkpoint.save_file(cache_url, {"state_dict": state, "feature_dim": int(net.feature_dim),
                                     "num_classes": int(net.num_classes)})
    return net


@torch.no_grad()
def digit_features(x: torch.Tensor, net: DigitFeatureNet, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate features (N, feature_dim) on CPU."""
    net.eval()
    out = [net.features(x[i : i + batch_size]).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out, dim=0)


@torch.no_grad()
def digit_accuracy(x: torch.Tensor, y: torch.Tensor, net: DigitFeatureNet, batch_size: int = 1024) -> float:
    net.eval()
    preds = torch.cat([net(x[i : i + batch_size]).argmax(1).cpu() for i in range(0, x.shape[0], batch_size)])
    return float((preds == torch.as_tensor(y).cpu().long()).float().mean().item())


def digit_fd(fake: torch.Tensor, real, net: DigitFeatureNet, batch_size: int = 1024) -> float:
    """Frechet distance between the penultimate DigitFeatureNet features of ``fake`` and ``real`` digits.

    ``real`` is the images, or their ``(mu, sigma)`` from :func:`digit_stats` (computed once per evaluation)."""
    mu1, s1 = digit_stats(fake, net, batch_size)
    mu2, s2 = real if isinstance(real, tuple) else digit_stats(real, net, batch_size)
    return frechet_distance(mu1, s1, mu2, s2)


def digit_stats(x: torch.Tensor, net: DigitFeatureNet, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the DigitFeatureNet features of ``x``: the reference side of :func:`digit_fd`."""
    return feature_stats(digit_features(x, net, batch_size))


# ----------------------------------------------------------------------------------------------------------------
# FID through torch-fidelity
# ----------------------------------------------------------------------------------------------------------------
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


def inception_cache_path() -> str:
    """Where torch-fidelity (via torch.hub) looks for / caches the InceptionV3 weights when none are given."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()


class _UInt8Images(torch.utils.data.Dataset):
    """torch-fidelity input: a Dataset whose items are uint8 (3, H, W) tensors."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _offline_message(path: str) -> str:
    return (
        "InceptionV3 weights for FID are not available and could not be downloaded. Download\n"
        f"  {INCEPTION_URL}\n"
        f"on a machine with network access and either put it at\n  {path}\n"
        "(torch.hub's cache; set TORCH_HOME to move it) or pass its path as inception_weights= "
        "(EvalConfig / fid_torch_fidelity)."
    )


def _resolve_inception_weights(inception_weights: str | None) -> tuple[str | None, str | None]:
    """Return (local path or None for torch-fidelity's default, temp file to delete afterwards or None)."""
    if inception_weights is None:
        path = inception_cache_path()
        if not os.path.exists(path):
            try:
                torch.hub.load_state_dict_from_url(INCEPTION_URL, progress=False, map_location="cpu",
                                               weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure here means "offline / no weights"
                raise RuntimeError(_offline_message(path)) from e
        return None, None
    if inception_weights.startswith("file://"):
        inception_weights = inception_weights[len("file://"):]
    if "://" in inception_weights:  # remote fsspec URL: copy to a local temp file for torch.load
        fd, tmp = tempfile.mkstemp(suffix=".pth")
        with os.fdopen(fd, "wb") as f:
            f.write(storage.read_bytes(inception_weights))
        return tmp, tmp
    if not os.path.exists(inception_weights):
        raise RuntimeError(f"inception_weights file not found: {inception_weights}\n" + _offline_message(inception_cache_path()))
    return inception_weights, None


FID_EXTRACTOR = "inception-v3-compat"


def _file_digest(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class FIDReference:
    """FID against one set of real images, with the reference side done once (torch-fidelity's own code).

    The constructor builds torch-fidelity's 'inception-v3-compat' extractor once and computes the real images'
    (mu, sigma) once; ``ref.fid(fake)`` then extracts only the fake images' features. The numbers are those of
    ``torch_fidelity.calculate_metrics(input1=fake, input2=real, fid=True, feature_extractor='inception-v3-compat')``
    (same extractor, same ``fid_features_to_statistics`` / ``fid_statistics_to_metric``), without rebuilding the
    extractor and re-extracting the reference for every (model, solver, NFE) row.

    ``cache_url`` (any fsspec URL of a directory, e.g. ``<root>/_cache``): keep the reference statistics there as
    ``fid_ref-<key>.npz``, key = sha256 of the uint8 reference images and of the weight file, so a later evaluation
    of the same reference (another run of the preset, a changed NFE list) loads them. This replaces torch-fidelity's
    ``cache=True``, which only writes to a local directory and also stores every reference image's 2048-d features
    (410 MB for 50,000 images) besides the 2 x 2048^2 statistics. ``statistics_computed`` counts reference
    extractions (0 on a cache hit, else 1).
    """

    def __init__(
        self,
        real: torch.Tensor,
        inception_weights: str | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        cache_url: str | None = None,
    ):
        from torch_fidelity.utils import create_feature_extractor, resolve_feature_layer_for_metric

        self.cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        self.batch_size = int(batch_size)
        self.statistics_computed = 0
        weights_path, tmp = _resolve_inception_weights(inception_weights)
        try:
            kw = {"feature_extractor": FID_EXTRACTOR, "fid": True, "verbose": False,
                  "feature_extractor_weights_path": weights_path}
            self.layer = resolve_feature_layer_for_metric("fid", **kw)
            self.extractor = create_feature_extractor(FID_EXTRACTOR, [self.layer], cuda=self.cuda, **kw)
            weights_id = os.path.basename(INCEPTION_URL) if weights_path is None else _file_digest(weights_path)
        finally:
            if tmp is not None:
                try:
                    os.remove(tmp)
                except OSError:
                    pass
        real_u8 = _to_uint8(real)
        self.cache = None
        if cache_url is not None:
            import hashlib

            key = hashlib.sha256(real_u8.numpy().tobytes() + str(tuple(real_u8.shape)).encode()
                                 + f"{FID_EXTRACTOR}/{self.layer}/{weights_id}".encode()).hexdigest()[:24]
            self.cache = storage.join(cache_url, f"fid_ref-{key}.npz")
        self.stats = self._load() if self.cache is not None and storage.exists(self.cache) else None
        if self.stats is None:
            self.stats = self._statistics_u8(real_u8)
            self.statistics_computed += 1
            if self.cache is not None:
                import io

                buf = io.BytesIO()
                np.savez(buf, mu=self.stats["mu"], sigma=self.stats["sigma"])
                storage.atomic_write_bytes(self.cache, buf.getvalue())

    def _load(self) -> dict | None:
        import io

        try:
            with np.load(io.BytesIO(storage.read_bytes(self.cache))) as z:
                return {"mu": z["mu"], "sigma": z["sigma"]}
        except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed and rewritten
            return None

    def _statistics_u8(self, images_u8: torch.Tensor) -> dict:
        from torch_fidelity.metric_fid import fid_features_to_statistics
        from torch_fidelity.utils import get_featuresdict_from_dataset

        feats = get_featuresdict_from_dataset(_UInt8Images(images_u8), self.extractor, self.batch_size, self.cuda,
                                              True, False)  # save_cpu_ram: no worker processes; not verbose
        return fid_features_to_statistics(feats[self.layer])

    def statistics(self, images: torch.Tensor) -> dict:
        """torch-fidelity's FID statistics {"mu", "sigma"} of images (N, C, H, W) in [-1, 1]."""
        return self._statistics_u8(_to_uint8(images))

    def fid(self, fake: torch.Tensor) -> float:
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

        return float(fid_statistics_to_metric(self.statistics(fake), self.stats, False)[KEY_METRIC_FID])


def fid_torch_fidelity(
    fake: torch.Tensor,
    real: torch.Tensor,
    inception_weights: str | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> float:
    """FID between image batches (N, C, H, W) in [-1, 1] (C = 1 is repeated to 3) via torch-fidelity.

    Images are quantised to uint8 and fed as in-memory Datasets to torch-fidelity's 'inception-v3-compat'
    extractor (2048-d pool features), no on-disk cache: ``FIDReference(real, ...).fid(fake)``; to compare many
    fake sets with one real set, build the :class:`FIDReference` once. ``inception_weights`` is a local path (or
    fsspec URL) to torch-fidelity's weight file; with ``None`` torch-fidelity's cached/downloaded weights are used
    and a RuntimeError explains where to put the file if they are missing and offline. ``device`` None means CUDA
    when available.
    """
    return FIDReference(real, inception_weights=inception_weights, batch_size=batch_size, device=device).fid(fake)
