"""reflow_core.data: toy distributions, offline image datasets, CIFAR-10 error path, imagefolder, sampling helpers.

Fast, CPU only, no network.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from reflow_core import data as data_mod
from reflow_core.config import DataConfig
from reflow_core.data import (
    TOY_NAMES,
    DataSet,
    DataUnavailableError,
    load_data,
    real_reference,
    sample_batch,
    sample_toy,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ toy


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_shape_dtype_scale_and_determinism(name):
    a = sample_toy(name, 4000, gen(0))
    b = sample_toy(name, 4000, gen(0))
    c = sample_toy(name, 4000, gen(1))
    assert a.shape == (4000, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # roughly unit-to-few scale, roughly centred
    assert 0.5 < a.std(0).min() and a.std(0).max() < 3.0
    assert a.abs().max() < 6.0
    assert a.mean(0).abs().max() < 0.3


def test_toy_without_generator_and_zero_points():
    assert sample_toy("moons", 10).shape == (10, 2)
    assert sample_toy("circles", 0, gen(0)).shape == (0, 2)


def test_unknown_toy_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        sample_toy("swissroll", 10, gen(0))
    for name in TOY_NAMES:
        assert name in str(err.value)


def test_8gaussians_near_eight_centres():
    x = sample_toy("8gaussians", 8000, gen(3))
    angles = torch.arange(8) * (2 * math.pi / 8)
    radius = x.norm(dim=1).mean()
    assert 2.0 < radius < 4.0
    centres = torch.stack([torch.cos(angles), torch.sin(angles)], 1) * radius
    d = torch.cdist(x, centres)
    nearest = d.min(1)
    assert nearest.values.mean() < 0.6  # small spread around each centre
    counts = torch.bincount(nearest.indices, minlength=8).float()
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000  # all 8 modes, balanced


def test_moons_two_clusters():
    x = sample_toy("moons", 6000, gen(4))
    # two interleaved half-moons: the upper one opens downward, the lower one upward;
    # kmeans-free check: split by which moon curve each point is closest to
    t = torch.linspace(0, math.pi, 400)
    upper = (torch.stack([torch.cos(t), torch.sin(t)], 1) - torch.tensor([0.5, 0.25])) * 2
    lower = (torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1) - torch.tensor([0.5, 0.25])) * 2
    du, dl = torch.cdist(x, upper).min(1).values, torch.cdist(x, lower).min(1).values
    assert torch.minimum(du, dl).mean() < 0.3
    frac_upper = (du < dl).float().mean()
    assert 0.4 < frac_upper < 0.6
    # centroids of the two groups are well apart
    cu, cl = x[du < dl].mean(0), x[du >= dl].mean(0)
    assert (cu - cl).norm() > 1.0


def test_circles_two_radii_and_checkerboard_squares():
    r = sample_toy("circles", 4000, gen(5)).norm(dim=1)
    inner, outer = r[r < 2.25], r[r >= 2.25]
    assert 0.4 < inner.numel() / r.numel() < 0.6
    assert abs(inner.mean() - 1.5) < 0.1 and abs(outer.mean() - 3.0) < 0.1
    cb = sample_toy("checkerboard", 4000, gen(6))
    assert cb.abs().max() <= 2.0
    cell = torch.floor(cb[:, 0]) + torch.floor(cb[:, 1])
    assert ((cell % 2) == 0).all()  # only the "black" squares are occupied


def test_load_data_toy():
    cfg = DataConfig(name="toy2d", toy="spirals", n_train=500, seed=7)
    ds = load_data(cfg)
    assert isinstance(ds, DataSet)
    assert ds.kind == "toy" and ds.y is None and ds.num_classes == 0
    assert ds.shape == (2,) and len(ds) == 500 and ds.x.dtype == torch.float32
    assert torch.equal(ds.x, load_data(cfg).x)
    assert not torch.equal(ds.x, load_data(cfg.model_copy(update={"seed": 8})).x)
    assert torch.equal(ds.x, sample_toy("spirals", 500, gen(7)))


# ------------------------------------------------------------------------------------------------ digits


def test_digits_8x8():
    ds = load_data(DataConfig(name="digits", n_train=5000))
    assert ds.kind == "image" and ds.x.shape == (1797, 1, 8, 8) and ds.shape == (1, 8, 8)
    assert ds.x.dtype == torch.float32 and ds.x.min() >= -1 and ds.x.max() <= 1
    assert ds.x.min() == -1 and ds.x.max() == 1
    assert ds.y is not None and ds.y.dtype == torch.long and ds.num_classes == 10
    assert set(ds.y.unique().tolist()) == set(range(10))


def test_digits_match_sklearn_and_16x16_and_cap():
    ds = load_data(DataConfig(name="digits", n_train=100))
    assert len(ds) == 100 and ds.y.shape == (100,)
    # scikit-learn's load_digits(): images[0] is a 0 whose first two rows are these; targets start 0..9
    first_rows = torch.tensor([[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0]], dtype=torch.float32)
    assert torch.allclose(ds.x[0, 0, :2], first_rows / 8.0 - 1.0)
    assert ds.y[:10].tolist() == list(range(10))
    big = load_data(DataConfig(name="digits", image_size=16, n_train=100))
    assert big.x.shape == (100, 1, 16, 16) and big.x.min() >= -1 and big.x.max() <= 1
    # a 16x16 upsample downsampled back looks like the original
    back = torch.nn.functional.avg_pool2d(big.x, 2)
    assert (back - ds.x).abs().mean() < 0.15
    assert torch.equal(big.y, ds.y)


# ------------------------------------------------------------------------------------------------ natural32


def test_natural32_shape_range_determinism():
    cfg = DataConfig(name="natural32", n_train=300, seed=0)
    ds = load_data(cfg)
    assert ds.kind == "image" and ds.x.shape == (300, 3, 32, 32) and ds.x.dtype == torch.float32
    assert ds.y is None and ds.num_classes == 0
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    assert ds.x.std() > 0.2  # not constant
    per_crop_std = ds.x.flatten(1).std(1)
    assert (per_crop_std > 0).float().mean() > 0.95
    assert (ds.x[0] - ds.x[1]).abs().max() > 0.1  # crops differ from each other
    assert torch.equal(ds.x, load_data(cfg).x)
    other = load_data(cfg.model_copy(update={"seed": 1})).x
    assert not torch.equal(ds.x, other)


# ------------------------------------------------------------------------------------------------ cifar10


def test_cifar10_missing_raises_with_path(tmp_path):
    missing = tmp_path / "no_such_cifar_dir"
    cfg = DataConfig(name="cifar10", path=str(missing), download=False)
    with pytest.raises(DataUnavailableError) as err:
        load_data(cfg)
    msg = str(err.value)
    assert str(missing) in msg
    assert "cifar-10-batches-py" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert isinstance(err.value, RuntimeError)


class _FakeCIFAR10:
    """Stands in for torchvision's CIFAR10 (whose md5 checks need the real files)."""

    seen_root: str | None = None

    def __init__(self, root, download=False):
        if not os.path.isfile(os.path.join(root, "cifar-10-batches-py", "data_batch_1")):
            raise RuntimeError("Dataset not found or corrupted.")
        type(self).seen_root = root
        rng = np.random.default_rng(0)
        self.data = rng.integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(40)]


def test_cifar10_local_conversion_and_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_open_cifar10", _FakeCIFAR10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    ds = load_data(DataConfig(name="cifar10", path=str(tmp_path), download=False, n_train=16))
    assert ds.x.shape == (16, 3, 32, 32) and ds.x.dtype == torch.float32
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    assert ds.y.dtype == torch.long and ds.num_classes == 10 and ds.y.tolist() == [i % 10 for i in range(16)]
    raw = _FakeCIFAR10(str(tmp_path)).data[:16]
    expect = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(ds.x, expect)


def test_cifar10_remote_url_copied_to_local_cache(tmp_path, monkeypatch):
    import fsspec
    monkeypatch.setattr(data_mod, "_open_cifar10", _FakeCIFAR10)
    monkeypatch.setattr(data_mod, "REMOTE_CACHE_ROOT", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe("/reflow-test-bucket/cifar/cifar-10-batches-py/data_batch_1", b"x")
    try:
        ds = load_data(DataConfig(name="cifar10", path="memory://reflow-test-bucket/cifar", n_train=16))
        assert len(ds) == 16
        assert _FakeCIFAR10.seen_root.startswith(str(tmp_path / "cache"))
        # a remote URL without the dataset is "unavailable", naming the URL
        with pytest.raises(DataUnavailableError, match="memory://reflow-test-bucket/empty"):
            load_data(DataConfig(name="cifar10", path="memory://reflow-test-bucket/empty", download=False))
    finally:
        fs.rm("/reflow-test-bucket", recursive=True)


# ------------------------------------------------------------------------------------------------ imagefolder


def _write_pngs(root, n_per_class=3, classes=("cats", "dogs"), size=(20, 12)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        d = root / c if c else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"img{i}.png")


def test_imagefolder_two_classes_via_file_url(tmp_path):
    _write_pngs(tmp_path / "data")
    # a grayscale jpg in a nested folder of one class is found recursively and converted to RGB
    from PIL import Image

    (tmp_path / "data" / "dogs" / "nested").mkdir()
    Image.fromarray(np.full((10, 10), 200, dtype=np.uint8), mode="L").save(tmp_path / "data" / "dogs" / "nested" / "g.JPG")
    (tmp_path / "data" / "dogs" / "notes.txt").write_text("not an image")
    cfg = DataConfig(name="imagefolder", path=f"file://{tmp_path / 'data'}", image_size=8, n_train=100)
    ds = load_data(cfg)
    assert ds.kind == "image" and ds.x.shape == (7, 3, 8, 8) and ds.x.dtype == torch.float32
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    assert ds.num_classes == 2 and ds.y.dtype == torch.long
    assert sorted(ds.y.tolist()) == [0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(ds.x, load_data(cfg).x)


def test_imagefolder_no_subfolders_no_labels_and_cap(tmp_path):
    _write_pngs(tmp_path, n_per_class=20, classes=("",))
    ds = load_data(DataConfig(name="imagefolder", path=str(tmp_path), image_size=16, n_train=16))
    assert ds.x.shape == (16, 3, 16, 16) and ds.y is None and ds.num_classes == 0


def test_imagefolder_empty_is_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailableError, match="no images"):
        load_data(DataConfig(name="imagefolder", path=f"file://{tmp_path / 'empty'}"))
    with pytest.raises(DataUnavailableError, match="no images"):
        load_data(DataConfig(name="imagefolder", path=str(tmp_path / "does_not_exist")))


# ------------------------------------------------------------------------------------------------ sampling


def test_sample_batch_with_and_without_replacement():
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    ds = DataSet(x=x, y=torch.arange(20), kind="toy", num_classes=20, name="8gaussians")
    bx, by = sample_batch(ds, 20, gen(0))
    assert bx.shape == (20, 2) and by.shape == (20,)
    assert sorted(by.tolist()) == list(range(20))  # without replacement: a permutation
    assert torch.equal(bx[:, 0], by.float() * 2)  # rows stay aligned with labels
    bx2, by2 = sample_batch(ds, 50, gen(0))
    assert bx2.shape == (50, 2) and by2.max() < 20
    a, _ = sample_batch(ds, 5, gen(1))
    b, _ = sample_batch(ds, 5, gen(1))
    assert torch.equal(a, b)
    unlabeled = DataSet(x=x, y=None, kind="toy", num_classes=0, name="8gaussians")
    assert sample_batch(unlabeled, 4, gen(0))[1] is None


def test_real_reference_toy_is_fresh_and_images_are_subset():
    ds = load_data(DataConfig(name="toy2d", toy="8gaussians", n_train=64, seed=0))
    ref = real_reference(ds, 200, gen(99))
    assert ref.shape == (200, 2)
    assert torch.equal(ref, sample_toy("8gaussians", 200, gen(99)))
    assert torch.cdist(ref, ds.x).min(1).values.max() > 0  # new points, not training rows
    img = load_data(DataConfig(name="digits", n_train=50))
    r = real_reference(img, 10, gen(0))
    assert r.shape == (10, 1, 8, 8)
    assert all(any(torch.equal(row, d) for d in img.x) for row in r)


def test_dataset_validation():
    with pytest.raises(ValueError):
        DataSet(x=torch.zeros(3, 2), y=torch.zeros(2, dtype=torch.long), kind="toy", num_classes=2, name="t")
    with pytest.raises(ValueError):
        DataSet(x=torch.zeros(3, 2), y=None, kind="toy", num_classes=3, name="t")
