"""SR metrics (PSNR peak 2, consistency, LPIPS from local weights, `sr_row`) and the fidelity-realism plot."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reflow_core import plots, storage
from reflow_core.distill import lpips_weights_path
from reflow_core.metrics import FrechetReference, Identity, PairedMetric, frechet_distance, feature_stats
from reflow_core.metrics.sr import PSNR, Consistency, consistency, lpips, lpips_available, psnr, sr_row


def down(x):
    return F.avg_pool2d(x, 2)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_psnr_known_mse():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[0] += 0.1          # MSE 0.01 -> 10 log10(4 / 0.01) = 26.0206 dB
    y[1, 0, 0, 0] = 2.0  # MSE 4 / 16 = 0.25 -> 10 log10(16) = 12.0412 dB
    p = psnr(y, x)
    assert p.dtype == torch.float64
    assert p[0].item() == pytest.approx(10 * math.log10(400.0), abs=1e-6)
    assert p[1].item() == pytest.approx(10 * math.log10(16.0), abs=1e-9)
    assert PSNR().score(y, x)["psnr"] == pytest.approx(float(p.mean()))
    assert math.isinf(psnr(x, x)[0].item())


def test_psnr_matches_numpy_definition(gen):
    """The textbook formula with data_range 2 (skimage's peak_signal_noise_ratio, which is not installed here)."""
    a = torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1
    b = (a + 0.2 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    want = [10 * np.log10(2.0 ** 2 / np.mean((ai.numpy().astype(np.float64) - bi.numpy()) ** 2))
            for ai, bi in zip(a, b)]
    np.testing.assert_allclose(psnr(b, a).numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, b[:, :1])


def test_consistency_avg_pool(gen):
    x = torch.randn(4, 1, 8, 8, generator=gen)
    y = down(x)
    assert consistency(x, y, down).abs().max().item() < 1e-6
    # adding a constant c to every pixel moves each of the 16 pooled pixels by c: norm = 4 |c|
    assert torch.allclose(consistency(x + 0.5, y, down), torch.full((4,), 2.0, dtype=torch.float64), atol=1e-6)
    # a perturbation in the pooling's null space (+d, -d within each 2x2 block) leaves A x unchanged
    null = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4)[None, None]
    assert consistency(x + 0.3 * null, y, down).max().item() < 1e-5
    assert Consistency(down).score(x + 0.5, x)["consistency"] == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError, match="low-res input"):
        consistency(x, x, down)


def test_paired_metrics_satisfy_protocol():
    assert isinstance(PSNR(), PairedMetric) and isinstance(Consistency(down), PairedMetric)


def test_lpips_local_only():
    if lpips_available("alex"):
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        d = lpips(x, x.flip(-1))
        assert d.shape == (2,) and (d > 0).all() and lpips(x, x).abs().max() < 1e-6
    else:
        with pytest.raises((FileNotFoundError, RuntimeError), match="never downloads|lpips package"):
            lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
        assert lpips_weights_path("alex")[0].endswith(".pth")


def test_sr_row(gen, tmp_path):
    n, k = 16, 3
    x_true = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1
    y = down(x_true)
    noise = 0.1 * torch.randn(k, n, 1, 8, 8, generator=gen)
    x_hat = x_true + noise
    real = torch.rand(64, 1, 8, 8, generator=gen) * 2 - 1
    ref = FrechetReference("fd_test", Identity(), real, cache_url=str(tmp_path))
    row = sr_row(x_hat, x_true, y, down, reference=ref, lpips_net=None)
    flat = x_hat.reshape(k * n, 1, 8, 8)
    assert row["psnr"] == pytest.approx(float(psnr(flat, x_true.repeat(k, 1, 1, 1)).mean()), rel=1e-12)
    assert row["psnr_of_mean"] == pytest.approx(float(psnr(x_hat.mean(0), x_true).mean()), rel=1e-6)
    assert row["psnr_of_mean"] > row["psnr"]  # averaging independent draws lowers the error
    want_cons = float(consistency(flat, y.repeat(k, 1, 1, 1), down).mean())
    assert row["consistency"] == pytest.approx(want_cons, rel=1e-12)
    want_fd = frechet_distance(*feature_stats(flat.flatten(1)), *feature_stats(real.flatten(1)))
    assert row["fd"] == row["fd_test"] == pytest.approx(float(want_fd), rel=1e-6)
    assert row["draws"] == k and "lpips" not in row
    with pytest.raises(ValueError, match="x_hat must be"):
        sr_row(flat, x_true, y, down)


TEACHER = [{"nfe": n, "psnr": p, "fd": f} for n, p, f in ((1, 24.0, 9.0), (2, 23.0, 6.0), (4, 22.0, 4.0),
                                                          (8, 21.5, 3.0), (32, 21.0, 2.5))]
STUDENT = [{"knob": k, "psnr": p, "fd": f} for k, p, f in ((0.99, 21.2, 2.8), (0.01, 23.8, 8.5), (0.5, 22.4, 4.5),
                                                           (0.25, 23.1, 6.0), (0.75, 21.8, 3.5))]


def test_fidelity_realism_plot(tmp_path):
    fig = plots.fidelity_realism_figure(TEACHER, STUDENT + [{"knob": 0.3, "psnr": None, "fd": 1.0}])
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    teacher_line, student_line = ax.lines
    assert list(teacher_line.get_xdata()) == [24.0, 23.0, 22.0, 21.5, 21.0]  # by NFE
    assert list(student_line.get_xdata()) == [23.8, 23.1, 22.4, 21.8, 21.2]  # by knob: fidelity end first
    assert list(student_line.get_ydata()) == [8.5, 6.0, 4.5, 3.5, 2.8]
    texts = [t.get_text() for t in ax.texts]
    assert texts == [f"NFE {n}" for n in (1, 2, 4, 8, 32)] + [f"knob {k:g}" for k in (0.01, 0.25, 0.5, 0.75, 0.99)]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["teacher (NFE)", "student, 1 NFE (knob)"]
    assert ax.get_xlabel().startswith("PSNR") and "fd" in ax.get_ylabel()
    import matplotlib.pyplot as plt
    plt.close(fig)
    url = plots.fidelity_realism(TEACHER, STUDENT, str(tmp_path / "fr.png"))
    data = storage.read_bytes(url)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
