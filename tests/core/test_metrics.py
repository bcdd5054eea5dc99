import math
import urllib.error

import numpy as np
import pytest
import torch
from scipy import linalg, stats

from reflow_core import metrics as M


# ------------------------------------------------------------------ straightness
def test_straightness_constant_field_is_zero():
    x1 = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([0.5, -1.0, 2.0])
    s = M.straightness(lambda x, t: c.expand_as(x), x1, steps=16)
    assert isinstance(s, float)
    assert abs(s) < 1e-10


def test_straightness_straight_coupling_is_zero():
    # v = x_noise - x_data for a fixed pairing: every path is a straight line
    g = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    s = M.straightness(lambda x, t: x1 - x0, x1, steps=8)
    assert abs(s) < 1e-10


def test_straightness_rotation_matches_closed_form():
    # v(x) = A x, A a rotation generator with angular speed w: |v| = w |x| along the path, the chord is
    # |x1 - x0| = 2 sin(w/2) |x1| and int v dt = x1 - x0, so S = |x1|^2 (w^2 - 4 sin^2(w/2)).
    w = math.pi / 2
    a = torch.tensor([[0.0, -w], [w, 0.0]])
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(64, 2, generator=g)
    s, per = M.straightness(lambda x, t: x @ a.T, x1, steps=256, return_per_sample=True)
    expected = (x1**2).sum(1) * (w**2 - 4 * math.sin(w / 2) ** 2)
    assert s > 0.1
    assert per.shape == (64,)
    assert abs(s - float(expected.mean())) / float(expected.mean()) < 0.1
    assert torch.allclose(per, expected.float(), rtol=0.1)
    assert abs(float(per.mean()) - s) < 1e-5


def test_straightness_passes_time_and_label():
    # one velocity signature (x, t) -> v: labels are bound by the caller (VelocityModel.solver_velocity(label))
    seen = []

    def fn(x, t, label):
        seen.append((t.shape, float(t[0]), label))
        return torch.zeros_like(x)

    lab = torch.zeros(4, dtype=torch.long)
    M.straightness(lambda x, t: fn(x, t, lab), torch.randn(4, 1, 2, 2), steps=4)
    with pytest.raises(TypeError):
        M.straightness(fn, torch.randn(4, 1, 2, 2), steps=4, label=lab)  # no label argument any more
    assert [s[0] for s in seen] == [torch.Size([4])] * 4
    assert [s[1] for s in seen] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert all(s[2] is lab for s in seen)


# ------------------------------------------------------------------ sliced W2
def test_sliced_w2_identical_is_zero():
    x = torch.randn(500, 5, generator=torch.Generator().manual_seed(0))
    v = M.sliced_w2(x, x.clone(), generator=torch.Generator().manual_seed(1))
    assert isinstance(v, float)
    assert v < 1e-6


def test_sliced_w2_translation():
    d = 4
    x = torch.randn(1000, d, generator=torch.Generator().manual_seed(0))
    m = torch.tensor([3.0, -1.0, 2.0, 0.5])
    expected = float(m.norm()) / math.sqrt(d)
    v = M.sliced_w2(x, x + m, n_proj=2048, generator=torch.Generator().manual_seed(1))
    assert v == pytest.approx(expected, rel=0.05)
    # independent samples, different sizes (quantile resampling)
    y = torch.randn(800, d, generator=torch.Generator().manual_seed(2)) + m
    v2 = M.sliced_w2(x, y, n_proj=1024, generator=torch.Generator().manual_seed(3))
    assert v2 == pytest.approx(expected, rel=0.15)
    same = M.sliced_w2(x, y - m, n_proj=512, generator=torch.Generator().manual_seed(3))
    assert same < 0.15 * expected


def test_sliced_w2_images_flattened_and_seeded():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 4, 4, generator=g), torch.randn(64, 1, 4, 4, generator=g)
    a = M.sliced_w2(x, y, generator=torch.Generator().manual_seed(5))
    b = M.sliced_w2(x, y, generator=torch.Generator().manual_seed(5))
    assert a == b > 0


# ------------------------------------------------------------------ energy distance / MMD
def test_energy_distance_same_vs_shifted_and_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 1, generator=g)
    y = torch.randn(3000, 1, generator=g)
    assert abs(M.energy_distance(x, x)) < 1e-2
    assert abs(M.energy_distance(x, y)) < 0.02
    # N(0,1) vs N(mu,1): 2 E|N(mu, 2)| - 2 E|N(0, 2)|
    mu, sd = 1.0, math.sqrt(2.0)
    e_abs = sd * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * sd**2)) + mu * (1 - 2 * stats.norm.cdf(-mu / sd))
    expected = 2 * e_abs - 2 * sd * math.sqrt(2 / math.pi)
    got = M.energy_distance(x, y + mu, chunk=512)  # chunked path
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=0.1)


def test_mmd_rbf_same_vs_shifted():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g)
    same = M.mmd_rbf(x, y)
    diff = M.mmd_rbf(x, y + 1.5)
    assert isinstance(same, float)
    assert abs(same) < 0.02
    assert diff > 10 * abs(same) and diff > 0.1


# ------------------------------------------------------------------ Frechet distance
def _random_spd(d, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_identical_is_zero():
    s = _random_spd(16, 0)
    mu = np.arange(16.0)
    assert abs(M.frechet_distance(mu, s, mu, s)) < 1e-6


def test_frechet_closed_forms():
    # 1-D: (mu1 - mu2)^2 + (sd1 - sd2)^2
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # diagonal covariances
    a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 1.0, 0.5])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, -2.0])
    expected = 5.0 + np.sum(a + b - 2 * np.sqrt(a * b))
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-8)
    # general (non-commuting) SPD: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2)
    s1, s2 = _random_spd(8, 1), _random_spd(8, 2)
    r = linalg.sqrtm(s1).real
    w = np.linalg.eigvalsh(r @ s2 @ r)
    m1, m2 = np.ones(8), np.zeros(8)
    expected = 8.0 + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(w, 0, None)).sum()
    got = M.frechet_distance(m1, s1, m2, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_near_singular_is_finite():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 1.0
    mu1, s1 = M.feature_stats(f1)
    mu2, s2 = M.feature_stats(torch.tensor(f2))
    fd = M.frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(fd) and fd > 0
    assert abs(M.frechet_distance(mu1, s1, mu1, s1)) < 1e-3


def test_feature_stats_matches_numpy():
    f = np.random.default_rng(0).normal(size=(100, 6))
    mu, s = M.feature_stats(torch.tensor(f, dtype=torch.float32))
    assert mu.shape == (6,) and s.shape == (6, 6)
    np.testing.assert_allclose(mu, f.mean(0), atol=1e-6)
    np.testing.assert_allclose(s, np.cov(f, rowvar=False), atol=1e-5)


# ------------------------------------------------------------------ digit features
@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # (1797, 1, 8, 8) in [-1, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


@pytest.fixture(scope="module")
def digit_net(digits):
    x, y = digits
    return M.train_digit_classifier(x[:1400], y[:1400], seed=0)


def test_digit_classifier_accuracy(digits, digit_net):
    x, y = digits
    acc = M.digit_accuracy(x[1400:], y[1400:], digit_net)
    assert isinstance(acc, float)
    assert acc > 0.9


def test_digit_net_shapes():
    net = M.DigitFeatureNet(feature_dim=64)
    for shape in [(5, 1, 8, 8), (5, 1, 16, 16), (5, 64), (5, 8, 8)]:
        x = torch.rand(shape) * 2 - 1
        assert net.features(x).shape == (5, 64)
        assert net(x).shape == (5, 10)


def test_digit_fd_real_vs_noise(digits, digit_net):
    x, _ = digits
    a, b = x[:800], x[800:1600]
    ref = M.FrechetReference("fd_digits", M.DigitFeatures(digit_net), b)  # the reference's statistics, once
    fd_real = ref.score(a)["fd_digits"]
    noise = torch.rand(800, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_noise = ref.score(noise)["fd_digits"]
    f_noise, f_b = M.digit_features(noise, digit_net), M.digit_features(b, digit_net)
    assert fd_noise == M.frechet_distance(*M.feature_stats(f_noise), *M.feature_stats(f_b))  # the plain formula
    assert isinstance(fd_real, float)
    assert fd_real >= 0
    assert fd_noise > 10 * fd_real
    # 16x16 inputs of the same digits give the same kind of features
    a16 = torch.nn.functional.interpolate(a, size=(16, 16), mode="bilinear", align_corners=False)
    assert ref.score(a16)["fd_digits"] < fd_noise / 5


def test_load_or_train_digit_classifier_caches(tmp_path, digits, monkeypatch):
    x, y = digits
    url = f"file://{tmp_path}/cache/digit_net.pt"
    net1 = M.load_or_train_digit_classifier(url, x[:256], y[:256], steps=5, seed=3)
    assert (tmp_path / "cache" / "digit_net.pt").stat().st_size > 0

    def boom(*a, **k):
        raise AssertionError("should load from cache, not train")

    monkeypatch.setattr(M.digits, "train_digit_classifier", boom)
    net2 = M.load_or_train_digit_classifier(url, x[:256], y[:256])
    for (k1, v1), (k2, v2) in zip(net1.state_dict().items(), net2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert not net2.training


# ------------------------------------------------------------------ FID (torch-fidelity)
def test_to_uint8_and_grey_to_rgb():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    u = M.inception.to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 2, 2)
    assert u[0, 0].flatten().tolist() == [0, 128, 255, 255]
    assert torch.equal(u[0, 0], u[0, 2])


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 architecture with a seeded random init, saved like the real weight file."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    d = tmp_path_factory.mktemp("inception")
    empty = d / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    # the constructor always loads a state dict; skip that to keep the random init (no download)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for m in fe.modules():  # variance-preserving init so the deep random net gives O(1) features
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = d / "inception-random.pth"
    torch.save(fe.state_dict(), path)
    return str(path)


@pytest.fixture
def single_thread():
    """Inception at 299x299 and a 2048x2048 eigen-decomposition on a busy CPU: one thread avoids thrashing."""
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(n)


def test_fid_torch_fidelity_random_weights(random_inception_weights, single_thread):
    # keep the image count tiny: the test checks the wiring (uint8 datasets, weights path, no cache, no download)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    same = M.fid_torch_fidelity(x, x, inception_weights=random_inception_weights, batch_size=8, device="cpu")
    shifted = M.fid_torch_fidelity(
        x, (x + 0.6).clamp(-1, 1), inception_weights=random_inception_weights, batch_size=8, device="cpu"
    )
    assert isinstance(same, float) and isinstance(shifted, float)
    assert abs(same) < 1e-3
    assert shifted > 1.0
    assert shifted > 1e4 * abs(same)


def test_fid_offline_error_message(tmp_path, monkeypatch):
    missing = str(tmp_path / "hub" / "checkpoints" / "weights-inception.pth")
    monkeypatch.setattr(M.inception, "inception_cache_path", lambda: missing)

    def no_network(*a, **k):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(RuntimeError) as ei:
        M.fid_torch_fidelity(x, x, inception_weights=None, device="cpu")
    msg = str(ei.value)
    assert M.INCEPTION_URL in msg and missing in msg


def test_fid_missing_weights_file(tmp_path):
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="not found"):
        M.fid_torch_fidelity(x, x, inception_weights=str(tmp_path / "nope.pth"), device="cpu")


def test_metrics_package_has_no_orchestration_imports():
    import ast
    from pathlib import Path

    names = set()
    for node in (n for f in Path(M.__file__).parent.glob("*.py") for n in ast.walk(ast.parse(f.read_text()))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"prefect", "mlflow"}


# ------------------------------------------------------------------ reference work done once
def test_toy_reference_equals_the_plain_distances():
    g = torch.Generator().manual_seed(0)
    real, x = torch.randn(700, 2, generator=g), torch.randn(500, 2, generator=g) * 1.3 + 0.2
    ref = M.ToyReference(real, n_proj=64, seed=4, chunk=256)
    for fake in (x, x[:300] - 0.5):
        got = ref(fake)
        assert got["sliced_w2"] == M.sliced_w2(fake, real, n_proj=64, generator=torch.Generator().manual_seed(4))
        assert got["energy"] == M.energy_distance(fake, real, chunk=256)


def test_straightness_callback_sees_every_step_before_it_is_taken():
    seen = []
    x1 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    M.straightness(lambda x, t: torch.ones_like(x), x1, steps=4,
                   callback=lambda i, t, x, v: seen.append((i, float(t), x)))
    assert [s[:2] for s in seen] == [(0, 1.0), (1, 0.75), (2, 0.5), (3, 0.25)]
    assert torch.allclose(seen[2][2], x1 - 0.5)


def test_fid_reference_matches_calculate_metrics_and_caches(random_inception_weights, single_thread, tmp_path):
    import torch_fidelity

    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, torch.rand(8, 3, 16, 16, generator=g) * 1.6 - 0.9
    want = torch_fidelity.calculate_metrics(
        input1=M.inception.UInt8Images(M.inception.to_uint8(fake)),
        input2=M.inception.UInt8Images(M.inception.to_uint8(real)), fid=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=random_inception_weights,
        batch_size=8, cuda=False, cache=False, save_cpu_ram=True, verbose=False)["frechet_inception_distance"]
    cache = f"file://{tmp_path}/cache"
    ref = M.FIDReference(real, inception_weights=random_inception_weights, batch_size=8, device="cpu", cache_url=cache)
    assert ref.statistics_computed == 1 and ref.fid(fake) == pytest.approx(want, rel=1e-6)
    again = M.FIDReference(real, inception_weights=random_inception_weights, batch_size=8, device="cpu",
                           cache_url=cache)
    assert again.statistics_computed == 0 and again.fid(fake) == pytest.approx(want, rel=1e-6)
    other = M.FIDReference(real[:6], inception_weights=random_inception_weights, batch_size=8, device="cpu",
                           cache_url=cache)  # another reference set: its own cache entry
    assert other.statistics_computed == 1 and len(list((tmp_path / "cache").glob("fid_ref-*.npz"))) == 2


_TINY_EVAL = {"eval.nfes": [1, 2], "eval.solvers": ["euler", "heun"], "eval.straightness_steps": 2,
              "pairs.solver": "euler", "pairs.nfe": 2, "pairs.grid": "uniform", "teacher.train.steps": 2,
              "teacher.train.warmup": 1, "teacher.train.ckpt_every": 1, "reflow.train.steps": 2,
              "reflow.train.warmup": 1, "reflow.train.ckpt_every": 1}
_TINY_IMAGE = {"net.channels": 8, "net.channel_mult": [1, 2], "net.num_res_blocks": 1, "net.attn_resolutions": [],
               "teacher.train.batch_size": 4, "reflow.train.batch_size": 4, "teacher.train.amp": False,
               "reflow.train.amp": False, "pairs.n_pairs": 8, "pairs.shard_size": 8, "pairs.chunk_size": 8,
               "pairs.batch_size": 8, "pairs.dtype": "float32", "eval.n_samples": 16}


def _count(monkeypatch, owner, name):
    calls = []
    orig = getattr(owner, name)

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.mark.parametrize("kind", ["toy", "digits", "fid"])
def test_evaluate_does_the_reference_work_once_per_stage(kind, tmp_path, monkeypatch, random_inception_weights,
                                                         single_thread):
    """Reference features/statistics once per evaluate stage, not once per (model, solver, NFE) row."""
    import torch_fidelity.utils

    from reflow_core.preset import load_preset
    from reflow_core.stages import run_local

    preset, over = {"toy": ("toy2d", {"net.hidden": 16, "net.depth": 1, "data.n_train": 256, "pairs.n_pairs": 64,
                                      "pairs.shard_size": 64, "pairs.chunk_size": 64, "eval.n_samples": 64}),
                    "digits": ("digits", _TINY_IMAGE),
                    # Inception on a CPU is the cost here: euler only (4 rows)
                    "fid": ("natural32", _TINY_IMAGE | {"data.n_train": 32, "eval.n_samples": 16,
                                                        "eval.solvers": ["euler"],
                                                        "eval.inception_weights": random_inception_weights})}[kind]
    if kind == "digits":  # a pre-trained (tiny) classifier in the root's cache: this test is not about training it
        from sklearn.datasets import load_digits

        d = load_digits()
        M.load_or_train_digit_classifier(f"file://{tmp_path}/_cache/digit_classifier.pt",
                                         torch.tensor(d.images[:64], dtype=torch.float32)[:, None] / 8 - 1,
                                         torch.tensor(d.target[:64]), steps=2)
    toy_plain = _count(monkeypatch, M, "sliced_w2") + _count(monkeypatch, M, "energy_distance")
    toy_refs = _count(monkeypatch, M, "ToyReference")
    stats = _count(monkeypatch, M.FrechetReference, "statistics")  # the digit classifier's and Inception's
    extractors = _count(monkeypatch, torch_fidelity.utils, "create_feature_extractor")

    rows = run_local(load_preset(preset, _TINY_EVAL | over), str(tmp_path), "r")
    n = len(rows)
    # teacher and reflow x (euler 1, euler 2, heun 1; fid: euler 1, 2): many rows, one reference
    assert n == (4 if kind == "fid" else 6)
    if kind == "toy":
        assert len(toy_refs) == 1 and toy_plain == []
    elif kind == "digits":
        assert len(stats) == n + 1  # each row's samples, and the reference once
    else:
        assert len(extractors) == 1 and len(stats) == n + 1
        assert all(r["fid"] >= 0 for r in rows)
        # (a re-evaluation loading the reference statistics from <root>/_cache instead: the test above)
