"""Data sets (the t = 0 end of the flow) as float32 tensors: toy 2-D (drawn from `toy.py`) and images.

Every loader is offline except CIFAR-10's optional download:

* ``toy2d``       -- ``cfg.n_train`` points of ``sample_toy(cfg.toy)`` (seeded by ``cfg.seed``), shape (N, 2).
* ``digits``      -- scikit-learn's bundled 8x8 digits (1797 images), (N, 1, 8, 8) or bilinearly upsampled to 16x16,
                     labels 0..9.
* ``natural32``   -- random 32x32 RGB crops (random downscale in [1, 4], random horizontal flip) of scikit-learn's two
                     bundled photographs (china.jpg, flower.jpg); (N, 3, 32, 32), no labels.
* ``cifar10``     -- torchvision's CIFAR-10 train split from ``cfg.path`` (local path or fsspec URL, copied to a local
                     cache when remote) or ``~/.cache/reflow/cifar10``; labels 0..9.
* ``imagefolder`` -- png/jpg images found recursively under the fsspec URL ``cfg.path``, centre-cropped and resized to
                     ``cfg.image_size``; labels from immediate subfolders when there are at least two.

Images are always in [-1, 1]. ``n_train`` is the number of points/crops for toy2d/natural32 and a cap otherwise.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

from . import storage
from .config import DataConfig
from .toy import TOY_NAMES, gen_device, sample_toy

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DEFAULT_CIFAR10_ROOT = "~/.cache/reflow/cifar10"
REMOTE_CACHE_ROOT = "~/.cache/reflow/remote"


class DataUnavailableError(RuntimeError):
    """The requested dataset is not on disk and could not be fetched; the message says where to put it."""


@dataclass
class DataSet:
    """A whole dataset held in memory.

    x: float32; toy (N, 2), images (N, C, H, W) in [-1, 1].  y: long (N,) class labels or None.
    name: the toy distribution's name for ``kind == "toy"`` (e.g. "8gaussians"), else the dataset name.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    kind: Literal["toy", "image"]
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.kind not in ("toy", "image"):
            raise ValueError(f"DataSet.kind must be 'toy' or 'image', got {self.kind!r}")
        if self.y is not None and self.y.shape[0] != self.x.shape[0]:
            raise ValueError(f"DataSet: {self.x.shape[0]} samples but {self.y.shape[0]} labels")
        if (self.y is None) != (self.num_classes == 0):
            raise ValueError("DataSet: num_classes must be 0 exactly when there are no labels")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (2,) or (3, 32, 32)."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


# --------------------------------------------------------------------------------------------------- images


def _uint8_hwc_to_tensor(arr) -> torch.Tensor:
    """(N, H, W, C) or (H, W, C) uint8 array -> float32 (N, C, H, W) / (C, H, W) in [-1, 1]."""
    t = torch.as_tensor(arr)
    t = t.permute(0, 3, 1, 2) if t.ndim == 4 else t.permute(2, 0, 1)
    return (t.to(torch.float32) / 127.5 - 1.0).contiguous()


def _cap(x: torch.Tensor, y: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.shape[0] <= n:
        return x, y
    return x[:n].contiguous(), (y[:n].contiguous() if y is not None else None)


def _sklearn_datasets_dir() -> str | None:
    """scikit-learn's ``datasets`` package directory, found without importing scikit-learn (about 2 s)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets")


def _digits_arrays():
    """(images (1797, 8, 8) float 0..16, target (1797,) int): scikit-learn's bundled digits, read directly from its
    ``digits.csv.gz`` (what ``load_digits`` reads) with ``load_digits`` as the fallback."""
    import numpy as np

    root = _sklearn_datasets_dir()
    csv = os.path.join(root, "data", "digits.csv.gz") if root else None
    if csv and os.path.exists(csv):
        try:
            a = np.loadtxt(csv, delimiter=",")
            if a.ndim == 2 and a.shape[1] == 65:
                return a[:, :-1].reshape(-1, 8, 8), a[:, -1].astype(np.int64)
        except Exception:  # noqa: BLE001 -- fall back to the official loader
            pass
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


DIGITS_TRAIN = 1500  # data.sr: train on the first 1,500 digits in scikit-learn's order, evaluate on the last 297


def _load_digits(cfg: DataConfig, heldout: bool = False) -> DataSet:
    images, target = _digits_arrays()
    x = torch.as_tensor(images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    y = torch.as_tensor(target, dtype=torch.long)
    if cfg.sr is not None:
        part = slice(DIGITS_TRAIN, None) if heldout else slice(0, DIGITS_TRAIN)
        x, y = x[part], y[part]
    if cfg.image_size == 16:
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(-1.0, 1.0)
    x, y = (x.contiguous(), y) if heldout else _cap(x.contiguous(), y, cfg.n_train)
    return DataSet(x=x, y=y, kind="image", num_classes=10, name="digits")


@lru_cache(maxsize=1)
def _sample_photos() -> tuple[torch.Tensor, ...]:
    """china.jpg and flower.jpg (427 x 640 RGB) as (3, H, W) in [-1, 1]: the files ``load_sample_images`` reads,
    opened directly with Pillow (fast), with ``load_sample_images`` as the fallback."""
    import numpy as np

    root = _sklearn_datasets_dir()
    paths = [os.path.join(root, "images", f) for f in ("china.jpg", "flower.jpg")] if root else []
    if paths and all(os.path.exists(p) for p in paths):
        try:
            from PIL import Image

            arrays = []
            for p in paths:
                with Image.open(p) as im:
                    arrays.append(np.array(im.convert("RGB"), dtype=np.uint8))
            return tuple(_uint8_hwc_to_tensor(a) for a in arrays)
        except Exception:  # noqa: BLE001 -- fall back to the official loader
            pass
    from sklearn.datasets import load_sample_images

    return tuple(_uint8_hwc_to_tensor(np.array(img, dtype=np.uint8)) for img in load_sample_images().images)


PHOTO_HELDOUT = 0.2  # data.sr: the right 20% of each photograph's columns is never cropped for training


def _photo_part(photo: torch.Tensor, part: str) -> torch.Tensor:
    """The whole photograph ("all"), its left 80% ("train") or its right 20% ("heldout")."""
    cut = round(photo.shape[-1] * (1.0 - PHOTO_HELDOUT))
    return {"all": photo, "train": photo[..., :cut], "heldout": photo[..., cut:]}[part]


@lru_cache(maxsize=2)
def _photo_pyramid(size: int, max_scale: float, levels: int, part: str = "all"
                   ) -> tuple[tuple[torch.Tensor, ...], ...]:
    """[photo][level]: each photograph (or its `part`) downscaled (antialiased) by linspace(1, max_scale, levels)
    (about 40 MB)."""
    pyramid = []
    for photo in (_photo_part(p, part).contiguous() for p in _sample_photos()):
        h, w = photo.shape[1:]
        row = []
        for s in torch.linspace(1.0, max_scale, levels).tolist():
            hh, ww = max(size, round(h / s)), max(size, round(w / s))
            if (hh, ww) == (h, w):
                row.append(photo)
            else:
                row.append(F.interpolate(photo[None], size=(hh, ww), mode="bilinear", align_corners=False,
                                         antialias=True)[0].contiguous())
        pyramid.append(tuple(row))
    return tuple(pyramid)


def _natural32(n: int, seed: int, size: int = 32, max_scale: float = 4.0, levels: int = 25,
               part: str = "all") -> torch.Tensor:
    """n random size x size crops of the bundled photographs, each from the photograph downscaled (antialiased) by
    a random factor in [1, max_scale] (quantised to ``levels`` values, so each (photo, factor) resize is done once),
    randomly flipped horizontally."""
    g = torch.Generator().manual_seed(seed)
    pyramid = _photo_pyramid(size, max_scale, levels, part)
    which = torch.randint(len(pyramid), (n,), generator=g)
    level = torch.randint(levels, (n,), generator=g)
    u_top, u_left = torch.rand(n, generator=g), torch.rand(n, generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.empty(n, 3, size, size)
    ar = torch.arange(size)
    for p, row in enumerate(pyramid):
        for lv, img in enumerate(row):
            idx = torch.nonzero((which == p) & (level == lv)).flatten()
            if idx.numel() == 0:
                continue
            hh, ww = img.shape[1:]
            top = (u_top[idx] * (hh - size + 1)).long().clamp_max(hh - size)
            left = (u_left[idx] * (ww - size + 1)).long().clamp_max(ww - size)
            rows = (top[:, None] + ar)[:, :, None]  # (k, size, 1)
            cols = (left[:, None] + ar)[:, None, :]  # (k, 1, size)
            out[idx] = img[:, rows, cols].permute(1, 0, 2, 3)  # (C, k, size, size) -> (k, C, size, size)
    out[flip] = out[flip].flip(-1)
    return out.clamp_(-1.0, 1.0)


def _load_natural32(cfg: DataConfig, heldout: bool = False) -> DataSet:
    part = "all" if cfg.sr is None else "heldout" if heldout else "train"
    n, seed = (cfg.n_train, cfg.seed) if not heldout else (HELDOUT_CROPS, cfg.seed + 1)
    return DataSet(x=_natural32(n, seed, part=part), y=None, kind="image", num_classes=0, name="natural32")


def _cifar_root(path: str | None) -> str:
    """Local directory holding (or to hold) ``cifar-10-batches-py``; remote URLs are copied to a local cache."""
    if not path:
        return os.path.expanduser(DEFAULT_CIFAR10_ROOT)
    import fsspec

    fs, fpath = fsspec.core.url_to_fs(path)
    if storage.fs_is_local(fs):
        return os.path.expanduser(fpath)
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    local_root = os.path.join(os.path.expanduser(REMOTE_CACHE_ROOT), f"cifar10-{digest}")
    local_batches = os.path.join(local_root, "cifar-10-batches-py")
    if os.path.isdir(local_batches) and os.listdir(local_batches):
        return local_root
    fpath = fpath.rstrip("/")
    src = fpath if fpath.endswith("cifar-10-batches-py") else f"{fpath}/cifar-10-batches-py"
    try:
        if not fs.isdir(src):
            raise FileNotFoundError(src)
        os.makedirs(local_root, exist_ok=True)
        tmp = f"{local_batches}.partial"
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted copy
        fs.get(src.rstrip("/") + "/", tmp, recursive=True)
        os.replace(tmp, local_batches)
    except Exception as err:  # noqa: BLE001 -- any fsspec/network failure means "unavailable"
        raise DataUnavailableError(
            f"could not copy CIFAR-10 from {path!r} (expected a 'cifar-10-batches-py' directory at {src!r}): "
            f"{type(err).__name__}: {err}. Extract {CIFAR10_URL} there, or set data.path to a local directory."
        ) from err
    return local_root


def _open_cifar10(root: str, download: bool):
    """torchvision's CIFAR-10 train split (an object with ``.data`` (N, 32, 32, 3) uint8 and ``.targets``)."""
    from torchvision.datasets import CIFAR10

    return CIFAR10(root=root, train=True, download=download)


def _load_cifar10(cfg: DataConfig) -> DataSet:
    root = _cifar_root(cfg.path)
    batches = os.path.join(root, "cifar-10-batches-py")
    if not cfg.download and not os.path.isdir(batches):
        raise DataUnavailableError(
            f"CIFAR-10 not found: the directory {batches!r} does not exist (data.download=False). Download "
            f"{CIFAR10_URL} and extract it into {root!r} so that {batches!r} exists (containing data_batch_1..5, "
            f"test_batch, batches.meta), or set data.path to a directory that contains cifar-10-batches-py."
        )
    try:
        ds = _open_cifar10(root, cfg.download)
    except Exception as err:  # noqa: BLE001 -- offline download failure or files absent
        how = "download failed" if cfg.download else "download=False"
        raise DataUnavailableError(
            f"CIFAR-10 not found in {root!r} ({how}: {type(err).__name__}: {err}). Download {CIFAR10_URL} "
            f"and extract it so that the directory {batches!r} exists (containing data_batch_1..5, test_batch, "
            f"batches.meta), or set data.path to a directory that contains cifar-10-batches-py."
        ) from err
    x = _uint8_hwc_to_tensor(ds.data)  # (50000, 32, 32, 3) uint8
    y = torch.as_tensor(ds.targets, dtype=torch.long)
    x, y = _cap(x, y, cfg.n_train)
    return DataSet(x=x, y=y, kind="image", num_classes=10, name="cifar10")


def _load_image(fs, path: str, size: int) -> torch.Tensor:
    from PIL import Image

    with fs.open(path, "rb") as f:
        img = Image.open(io.BytesIO(f.read()))
        img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    import numpy as np

    return _uint8_hwc_to_tensor(np.asarray(img, dtype=np.uint8).copy())


def _load_imagefolder(cfg: DataConfig) -> DataSet:
    import fsspec

    assert cfg.path is not None  # enforced by DataConfig
    fs, root = fsspec.core.url_to_fs(cfg.path)
    root = root.rstrip("/")
    try:
        found = fs.find(root)
    except FileNotFoundError:
        found = []
    files = sorted(p for p in found if p.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataUnavailableError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {cfg.path!r} (searched recursively)"
        )
    rels = [p[len(root):].lstrip("/") for p in files]
    in_sub = ["/" in r for r in rels]
    classes = sorted({r.split("/", 1)[0] for r, s in zip(rels, in_sub) if s})
    y = None
    if len(classes) >= 2:
        if all(in_sub):
            index = {c: i for i, c in enumerate(classes)}
            y = torch.tensor([index[r.split("/", 1)[0]] for r in rels], dtype=torch.long)
        else:
            warnings.warn(f"{cfg.path}: images both at the top level and in subfolders; loading without labels")
    if len(files) > cfg.n_train:  # seeded random subset, kept in file order
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n_train]
        keep = keep.sort().values
        files = [files[i] for i in keep.tolist()]
        y = y[keep] if y is not None else None
    x = torch.stack([_load_image(fs, p, cfg.image_size) for p in files])
    num_classes = len(classes) if y is not None else 0
    return DataSet(x=x, y=y, kind="image", num_classes=num_classes, name="imagefolder")


def load_data(cfg: DataConfig) -> DataSet:
    """Load (or draw) the whole training set described by ``cfg``."""
    if cfg.name == "toy2d":
        g = torch.Generator().manual_seed(cfg.seed)
        x = sample_toy(cfg.toy, cfg.n_train, g)
        return DataSet(x=x, y=None, kind="toy", num_classes=0, name=cfg.toy)
    if cfg.name == "digits":
        return _load_digits(cfg)
    if cfg.name == "natural32":
        return _load_natural32(cfg)
    if cfg.name == "cifar10":
        return _load_cifar10(cfg)
    if cfg.name == "imagefolder":
        return _load_imagefolder(cfg)
    raise ValueError(f"unknown dataset {cfg.name!r}")


HELDOUT_CROPS = 1000  # natural32 with data.sr: evaluation crops from the held-out part of the photographs


def load_heldout(cfg: DataConfig) -> DataSet:
    """The evaluation split training never sees (data.sr): digits' last 297 images, or HELDOUT_CROPS crops of the
    held-out right part of each photograph (natural32)."""
    if cfg.sr is None:
        raise ValueError("a held-out split exists only with data.sr")
    return _load_digits(cfg, heldout=True) if cfg.name == "digits" else _load_natural32(cfg, heldout=True)


# --------------------------------------------------------------------------------------------------- sampling


def _indices(total: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    if total <= 0:
        raise ValueError("cannot sample from an empty dataset")
    dev = gen_device(generator)
    if n <= total:
        return torch.randperm(total, generator=generator, device=dev)[:n].cpu()
    return torch.randint(total, (n,), generator=generator, device=dev).cpu()


def sample_batch(
    ds: DataSet, n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n random rows (without replacement when n <= len(ds), else with replacement) and their labels (or None)."""
    idx = _indices(len(ds), n, generator).to(ds.x.device)
    x = ds.x[idx]
    y = ds.y[idx.to(ds.y.device)] if ds.y is not None else None
    return x, y


def real_reference(ds: DataSet, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n real samples for metrics: for toy data FRESH draws from the distribution (not the training set);
    for images a random subset of the data (with replacement only if n > len(ds))."""
    if ds.kind == "toy":
        return sample_toy(ds.name.split("/")[-1], n, generator).to(ds.x.device)
    return sample_batch(ds, n, generator)[0]


__all__ = [
    "CIFAR10_URL",
    "DataSet",
    "DataUnavailableError",
    "TOY_NAMES",
    "load_data",
    "load_heldout",
    "real_reference",
    "sample_batch",
    "sample_toy",
]
