"""FID: InceptionV3 features through torch-fidelity, where its weights come from (offline: a clear error), images fed
to it as uint8 in memory, and its statistics and distance. torch-fidelity is imported only when an extractor is built."""
from __future__ import annotations

import hashlib
import os
import tempfile

import torch

from .. import storage
from .reference import FeatureStats, FrechetReference

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


def inception_cache_path() -> str:
    """Where torch-fidelity (via torch.hub) looks for / caches the InceptionV3 weights when none are given."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
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


class UInt8Images(torch.utils.data.Dataset):
    """torch-fidelity input: a Dataset whose items are uint8 (3, H, W) tensors."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def offline_message(path: str) -> str:
    return (
        "InceptionV3 weights for FID are not available and could not be downloaded. Download\n"
        f"  {INCEPTION_URL}\n"
        f"on a machine with network access and either put it at\n  {path}\n"
        "(torch.hub's cache; set TORCH_HOME to move it) or pass its path as inception_weights= "
        "(EvalConfig / fid_torch_fidelity)."
    )


def resolve_inception_weights(inception_weights: str | None) -> tuple[str | None, str | None]:
    """Return (local path or None for torch-fidelity's default, temp file to delete afterwards or None)."""
    if inception_weights is None:
        path = inception_cache_path()
        if not os.path.exists(path):
            try:
                torch.hub.load_state_dict_from_url(INCEPTION_URL, progress=False, map_location="cpu",
                                               weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure here means "offline / no weights"
                raise RuntimeError(offline_message(path)) from e
        return None, None
    if inception_weights.startswith("file://"):
        inception_weights = inception_weights[len("file://"):]
    if "://" in inception_weights:  # remote fsspec URL: copy to a local temp file for torch.load
        fd, tmp = tempfile.mkstemp(suffix=".pth")
        with os.fdopen(fd, "wb") as f:
            f.write(storage.read_bytes(inception_weights))
        return tmp, tmp
    if not os.path.exists(inception_weights):
        raise RuntimeError(f"inception_weights file not found: {inception_weights}\n" + offline_message(inception_cache_path()))
    return inception_weights, None


FID_EXTRACTOR = "inception-v3-compat"


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class InceptionFeatures:
    """torch-fidelity's 'inception-v3-compat' extractor, built once: `features(x)` of images (N, C, H, W) in [-1, 1]
    (quantised to uint8 as torch-fidelity reads image files). `name` identifies extractor, layer and weights."""

    def __init__(self, weights: str | None = None, batch_size: int = 64, device: str | torch.device | None = None):
        from torch_fidelity.utils import create_feature_extractor, resolve_feature_layer_for_metric

        self.cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        self.batch_size = int(batch_size)
        weights_path, tmp = resolve_inception_weights(weights)
        try:
            kw = {"feature_extractor": FID_EXTRACTOR, "fid": True, "verbose": False,
                  "feature_extractor_weights_path": weights_path}
            self.layer = resolve_feature_layer_for_metric("fid", **kw)
            self.extractor = create_feature_extractor(FID_EXTRACTOR, [self.layer], cuda=self.cuda, **kw)
            weights_id = os.path.basename(INCEPTION_URL) if weights_path is None else file_digest(weights_path)
        finally:
            if tmp is not None:
                try:
                    os.remove(tmp)
                except OSError:
                    pass
        self.name = f"{FID_EXTRACTOR}/{self.layer}/{weights_id}"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        from torch_fidelity.utils import get_featuresdict_from_dataset

        feats = get_featuresdict_from_dataset(UInt8Images(to_uint8(x)), self.extractor, self.batch_size, self.cuda,
                                              True, False)  # save_cpu_ram: no worker processes; not verbose
        return feats[self.layer]


def fidelity_statistics(features: torch.Tensor) -> FeatureStats:
    """torch-fidelity's own FID statistics of Inception features (so a score equals its `calculate_metrics`)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features)
    return FeatureStats(stats["mu"], stats["sigma"])


def fidelity_distance(a: FeatureStats, b: FeatureStats) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma},
                                          False)[KEY_METRIC_FID])


class FIDReference(FrechetReference):
    """FID against one set of real images, the numbers of `torch_fidelity.calculate_metrics(input1=fake, input2=real,
    fid=True, feature_extractor='inception-v3-compat')` with the extractor built once and the reference statistics
    computed once (cached as `fid_ref-<key>.npz` under `cache_url`: two 2048-d moments, not every image's features as
    torch-fidelity's own cache keeps)."""

    def __init__(self, real: torch.Tensor, inception_weights: str | None = None, batch_size: int = 64,
                 device: str | torch.device | None = None, cache_url: str | None = None):
        super().__init__("fid", InceptionFeatures(inception_weights, batch_size, device), real, cache_url,
                         statistics=fidelity_statistics, distance=fidelity_distance)

    def fid(self, fake: torch.Tensor) -> float:
        return self.score(fake)["fid"]


def fid_torch_fidelity(fake: torch.Tensor, real: torch.Tensor, inception_weights: str | None = None,
                       batch_size: int = 64, device: str | torch.device | None = None) -> float:
    """FID between image batches (N, C, H, W) in [-1, 1] (C = 1 is repeated to 3) via torch-fidelity, no cache.

    ``inception_weights``: a local path (or fsspec URL) of torch-fidelity's weight file; None: torch-fidelity's
    cached/downloaded weights, with a RuntimeError saying where to put the file when they are missing and offline.
    To compare many fake sets with one real set, build the `FIDReference` once."""
    return FIDReference(real, inception_weights=inception_weights, batch_size=batch_size, device=device).fid(fake)
