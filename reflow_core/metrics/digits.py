"""The digit classifier: a small CNN trained on scikit-learn's digits whose penultimate features stand in for Inception
on 8x8 / 16x16 digits (an offline Frechet distance, `fd_digits`), cached as a hash-checked file."""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint, storage


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


class DigitFeatures:
    """The classifier's penultimate features as a `FeatureExtractor` (`reference.FrechetReference("fd_digits", ...)`);
    its name carries the weights' hash, so cached reference statistics follow the classifier."""

    def __init__(self, net: DigitFeatureNet, batch_size: int = 1024):
        self.net, self.batch_size = net, batch_size
        h = hashlib.sha256()
        for k, v in sorted(net.state_dict().items()):
            h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
        self.name = f"digit-classifier/{h.hexdigest()[:16]}"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return digit_features(x, self.net, self.batch_size)
