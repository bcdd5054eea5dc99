import math

import pytest
import torch

from reflow_core import plots, storage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(url: str) -> bool:
    data = storage.read_bytes(url)
    return len(data) > 100 and data[:8] == PNG_MAGIC


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_backend_is_agg():
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"


def test_trajectory_plot(tmp_path, gen):
    t = torch.linspace(1, 0, 9)[:, None, None]
    x1 = torch.randn(1, 50, 2, generator=gen)
    x0 = torch.randn(1, 50, 2, generator=gen) * 0.3 + 2
    straight = t * x1 + (1 - t) * x0  # (9, 50, 2)
    curved = straight + torch.sin(math.pi * t) * torch.tensor([0.5, -0.5])
    target = torch.randn(300, 2, generator=gen) * 0.3 + 2
    path = str(tmp_path / "sub" / "traj.png")  # parent folder is created
    out = plots.trajectory_plot({"teacher": curved, "reflow": straight}, target, path, title="toy")
    assert out == path and _is_png(path)
    # no target, single model, fsspec URL
    url = f"file://{tmp_path}/traj2.png"
    assert plots.trajectory_plot({"teacher": curved}, None, url) == url and _is_png(url)


def test_trajectory_plot_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError):
        plots.trajectory_plot({"teacher": torch.zeros(5, 2)}, None, str(tmp_path / "bad.png"))


@pytest.mark.parametrize("c", [1, 3])
def test_sample_grid(tmp_path, gen, c):
    x = torch.rand(10, c, 8, 8, generator=gen) * 2 - 1
    path = str(tmp_path / f"grid{c}.png")
    assert plots.sample_grid(x, path, title="samples") == path and _is_png(path)
    path2 = str(tmp_path / f"grid{c}_n.png")
    assert plots.sample_grid(x * 3, path2, nrow=5) == path2 and _is_png(path2)  # out of range values are clipped


def test_scatter_samples(tmp_path, gen):
    samples = {"teacher": torch.randn(200, 2, generator=gen), "reflow": torch.randn(200, 2, generator=gen) + 1}
    target = torch.randn(500, 2, generator=gen)
    path = str(tmp_path / "scatter.png")
    assert plots.scatter_samples(samples, target, path, title="samples") == path and _is_png(path)


def test_quality_vs_nfe(tmp_path):
    rows = []
    for model, base in [("teacher", 1.0), ("reflow", 0.3)]:
        for solver in ["euler", "heun"]:
            for nfe in [1, 2, 4, 8, 16]:
                rows.append({"model": model, "solver": solver, "nfe": nfe, "sw2": base / nfe + 0.01})
    rows.append({"model": "teacher", "solver": "euler", "nfe": 32})  # metric missing: skipped
    rows.append({"model": "teacher", "solver": "euler", "nfe": 64, "sw2": float("nan")})  # skipped
    path = str(tmp_path / "q.png")
    assert plots.quality_vs_nfe(rows, "sw2", path, title="sliced W2") == path and _is_png(path)
    empty = str(tmp_path / "q_empty.png")
    assert plots.quality_vs_nfe(rows, "fid", empty) == empty and _is_png(empty)


def test_loss_curve(tmp_path):
    steps = list(range(0, 1000, 10))
    vals = [1.0 / (1 + s / 100) for s in steps]
    path = str(tmp_path / "loss.png")
    assert plots.loss_curve(steps, vals, path) == path and _is_png(path)
    path2 = str(tmp_path / "loss2.png")
    assert plots.loss_curve(torch.tensor(steps), {"train": vals, "ema": [v * 0.9 for v in vals]}, path2) == path2
    assert _is_png(path2)


def test_memory_filesystem(gen):
    url = "memory://reflow-test-plots/grid.png"
    plots.sample_grid(torch.rand(4, 1, 8, 8, generator=gen), url)
    assert _is_png(url)
