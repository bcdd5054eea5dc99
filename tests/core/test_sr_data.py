"""Super-resolution data and batches (data.sr): the held-out splits (digits 1500/297 in scikit-learn's order,
natural32 by disjoint column ranges of each photograph), the config refusals, `sr_batches` as a pure function of
(seed, step) with the documented draw order, a conditional teacher that learns, and the plan of an OFTSR run; an
unconditional config keeps its plan and batches.

Fast, CPU only, no network.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reflow_core import data as data_mod
from reflow_core import sr as sr_mod
from reflow_core import stages
from reflow_core.config import ConfigError, DataConfig, SRConfig
from reflow_core.data import DIGITS_TRAIN, HELDOUT_CROPS, load_data, load_heldout
from reflow_core.preset import load_preset
from reflow_core.rng import batch_seed, time_seed
from reflow_core.stages.batches import sr_batches, teacher_batches
from reflow_core.train import Batch, flow_matching_loss, train


def _digits(**kw) -> DataConfig:
    return DataConfig(name="digits", image_size=8, **kw)


@pytest.fixture(scope="module")
def sklearn_digits():
    """scikit-learn's own loader (not ours): images (1797, 8, 8) in [-1, 1], labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.as_tensor(d.images, dtype=torch.float32) / 8.0 - 1.0, torch.as_tensor(d.target)


# --- digits: train = first 1500 in scikit-learn's order, held out = last 297 ---------------------------------------

def test_digits_split_is_sklearn_order_first_1500_and_last_297(sklearn_digits):
    images, target = sklearn_digits
    assert DIGITS_TRAIN == 1500 and len(images) == 1797
    cfg = _digits(sr=SRConfig())
    train, test = load_data(cfg), load_heldout(cfg)
    assert train.x.shape == (1500, 1, 8, 8) and test.x.shape == (297, 1, 8, 8)
    assert torch.equal(train.x[:, 0], images[:1500]) and torch.equal(train.y, target[:1500])
    assert torch.equal(test.x[:, 0], images[1500:]) and torch.equal(test.y, target[1500:])
    # disjoint by index and complementary: together they are the whole set, in order
    assert torch.equal(torch.cat([train.x, test.x])[:, 0], images)
    assert test.num_classes == train.num_classes == 10 and test.kind == "image"


def test_heldout_is_not_capped_by_n_train(sklearn_digits):
    images, _ = sklearn_digits
    cfg = _digits(sr=SRConfig(), n_train=100)
    train, test = load_data(cfg), load_heldout(cfg)
    assert len(train) == 100 and torch.equal(train.x[:, 0], images[:100])  # the cap takes the first rows
    assert len(test) == 297 and torch.equal(test.x[:, 0], images[1500:])


def test_digits_without_sr_is_unchanged_all_1797(sklearn_digits):
    images, target = sklearn_digits
    ds = load_data(_digits())
    assert len(ds) == 1797 and torch.equal(ds.x[:, 0], images) and torch.equal(ds.y, target)
    with pytest.raises(ValueError, match="only with data.sr"):
        load_heldout(_digits())
    # 16x16: the same split of the same (per-image) upsampling as the whole set's
    big = load_data(DataConfig(name="digits", image_size=16))
    sr16 = DataConfig(name="digits", image_size=16, sr=SRConfig())
    assert torch.allclose(load_data(sr16).x, big.x[:1500], atol=1e-6)
    assert torch.allclose(load_heldout(sr16).x, big.x[1500:], atol=1e-6)


# --- natural32: train crops from the left 80% of each photograph, held-out crops from the right 20% -----------------

@pytest.fixture()
def column_ramp_photos(monkeypatch):
    """Two synthetic photographs of the same width whose channel 0 is the column coordinate (a linear ramp from -1
    to 1): a crop's channel-0 values tell which columns it came from (downscaling mixes neighbouring columns with
    non-negative weights, a flip reverses them: neither leaves the range of the columns it read)."""
    def photo(h, seed):
        p = torch.rand(3, h, 200, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        p[0] = torch.linspace(-1.0, 1.0, 200)[None, :].expand(h, 200)
        return p

    photos = (photo(80, 0), photo(96, 1))
    data_mod._photo_pyramid.cache_clear()
    monkeypatch.setattr(data_mod, "_sample_photos", lambda: photos)
    yield photos
    data_mod._photo_pyramid.cache_clear()


def test_natural32_train_and_heldout_crops_come_from_disjoint_columns(column_ramp_photos):
    cut = round(200 * (1 - data_mod.PHOTO_HELDOUT))
    assert cut == 160
    ramp = column_ramp_photos[0][0, 0]
    cfg = DataConfig(name="natural32", image_size=32, n_train=400, sr=SRConfig(scale=4))
    train, test = load_data(cfg), load_heldout(cfg)
    assert train.x.shape == (400, 3, 32, 32) and test.x.shape == (HELDOUT_CROPS, 3, 32, 32)
    assert train.y is None and test.num_classes == 0
    tr, te = train.x[:, 0], test.x[:, 0]
    assert tr.max().item() <= ramp[cut - 1].item() + 1e-6  # every training pixel from columns < cut
    assert te.min().item() >= ramp[cut].item() - 1e-6  # every held-out pixel from columns >= cut
    assert tr.min().item() < -0.95 and te.max().item() > 0.95  # ... and each split spans its whole part
    # without data.sr the whole photograph is cropped: both sides of the cut appear
    whole = load_data(DataConfig(name="natural32", image_size=32, n_train=400)).x[:, 0]
    assert whole.min().item() < -0.95 and whole.max().item() > 0.95


def test_natural32_real_photos_split_by_construction():
    photos = data_mod._sample_photos()
    for part, cols in (("train", lambda w: slice(0, 512)), ("heldout", lambda w: slice(512, w))):
        pyramid = data_mod._photo_pyramid(32, 4.0, 25, part)
        for photo, levels in zip(photos, pyramid):
            assert photo.shape[-1] == 640
            assert torch.equal(levels[0], photo[..., cols(640)])  # level 0: exactly that part's columns
            assert levels[-1].shape[-1] < levels[0].shape[-1]
    cfg = DataConfig(name="natural32", image_size=32, n_train=300, sr=SRConfig(scale=4))
    train, test = load_data(cfg).x, load_heldout(cfg).x
    assert torch.equal(test, data_mod._natural32(HELDOUT_CROPS, cfg.seed + 1, part="heldout"))
    # exact matching: no held-out crop is a training crop
    same = (test.flatten(1)[:, None, :] == train.flatten(1)[None, :, :]).all(-1)
    assert not same.any()


# --- config refusals -----------------------------------------------------------------------------------------------

SR = {"scale": 2, "degradation": "avgpool", "sigma_p": 0.2, "sigma_y": 0.0}


@pytest.mark.parametrize("preset,change,message", [
    ("toy2d", {"data.sr": SR}, "data.sr needs data.name digits or natural32"),
    ("digits_sr_tiny", {"data.sr.scale": 3}, "data.sr.scale=3 must divide data.image_size=8"),
    ("digits_sr_tiny", {"net.cond_channels": 3}, "data.sr needs net.cond_channels = the images' channels"),
    ("natural32_sr", {"net.cond_channels": 1}, "data.sr needs net.cond_channels = the images' channels"),
    ("digits", {"net.cond_channels": 1}, "net.cond_channels > 0 needs a condition: data.sr"),
    ("digits_sr_tiny", {"data.sr": None, "net.cond_channels": 0}, "distill.method='oftsr' and data.sr go together"),
    ("digits_sr_tiny", {"distill.method": "pairs"}, "distill.method='oftsr' and data.sr go together"),
    ("digits_sr_tiny", {"distill.fgd_weight": 1.0}, "distill.method='oftsr' trains the teacher-sized student alone"),
    ("digits_sr_tiny", {"distill.net": {"kind": "unet", "channels": 8},
                        "distill.anneal": {"steps": 10}}, "distill.method='oftsr' trains the teacher-sized student"),
    ("digits_sr_tiny", {"distill": None}, "reflow.rounds: 0 trains no reflow model"),
])
def test_sr_configs_that_cannot_work_are_refused_with_a_clear_message(preset, change, message):
    with pytest.raises(ConfigError) as exc:
        load_preset(preset, change)
    assert message in str(exc.value), str(exc.value)


def test_the_sr_presets_validate():
    for name in ("digits_sr_tiny", "digits_sr", "natural32_sr"):
        cfg = load_preset(name)
        assert cfg.data.sr is not None and cfg.distill.method == "oftsr" and cfg.reflow.rounds == 0
        assert cfg.net.cond_channels == (1 if cfg.data.name == "digits" else 3)
        assert cfg.data.image_size % cfg.data.sr.scale == 0


# --- sr_batches: a pure function of (seed, step), drawn as sr.draw documents ----------------------------------------

def _tc(**kw):
    return load_preset("digits_sr_tiny").teacher.train.model_copy(update=kw)


@pytest.fixture(scope="module")
def sr_train():
    cfg = load_preset("digits_sr_tiny")
    return cfg, load_data(cfg.data)


def test_sr_batches_are_a_pure_function_of_seed_and_step(sr_train):
    cfg, ds = sr_train
    tc = _tc(batch_size=12)
    a, b = sr_batches(ds, tc, cfg.data.sr), sr_batches(ds, tc, cfg.data.sr)
    for step in (0, 7, 123):
        x, y = a(step), b(step)
        for f in ("x_data", "x_noise", "cond"):
            assert torch.equal(getattr(x, f), getattr(y, f)), (step, f)
        assert x.label is None and x.x_data.shape == x.x_noise.shape == x.cond.shape == (12, 1, 8, 8)
    assert torch.equal(a(7).x_noise, a(7).x_noise)  # calling again (after other steps) gives the same batch
    assert not torch.equal(a(7).x_noise, a(8).x_noise) and not torch.equal(a(7).x_data, a(8).x_data)
    other = sr_batches(ds, _tc(batch_size=12, seed=1), cfg.data.sr)
    assert not torch.equal(other(7).x_noise, a(7).x_noise)


@pytest.mark.parametrize("sigma_y", [0.0, 0.1])
def test_sr_batch_noise_is_the_source_of_the_degraded_rows(sr_train, sigma_y):
    cfg, ds = sr_train
    sr = cfg.data.sr.model_copy(update={"sigma_y": sigma_y})
    tc = _tc(batch_size=10, seed=5)
    got = sr_batches(ds, tc, sr)(42)
    # recomputed: the step's generator draws the row indices, then (sr.draw) the measurement noise n, then eps
    g = torch.Generator().manual_seed(batch_seed(5, 42))
    idx = torch.randint(len(ds), (10,), generator=g)
    n = torch.randn(10, 1, 4, 4, generator=g)
    eps = torch.randn(10, 1, 8, 8, generator=g)
    x = ds.x[idx]
    c = sr_mod.lift(sr_mod.degrade(x, 2) + sigma_y * n, 2)
    assert torch.equal(got.x_data, x)
    assert torch.equal(got.cond, c)
    assert torch.equal(got.x_noise, sr_mod.source(c, eps, 0.2))
    # and by the formula, independently of reflow_core.sr: c = nearest-upsampled 2x2 block means (+ noise)
    want_c = F.interpolate(F.avg_pool2d(x, 2) + sigma_y * n, scale_factor=2, mode="nearest")
    assert torch.allclose(got.cond, want_c, atol=1e-6)
    assert torch.allclose(got.x_noise, math.sqrt(1 - 0.2 ** 2) * want_c + 0.2 * eps, atol=1e-6)
    if sigma_y == 0:  # A A^T = I: the condition has exactly the data's low-res image
        assert torch.allclose(sr_mod.degrade(got.cond, 2), sr_mod.degrade(x, 2), atol=1e-6)


def test_sr_batches_read_only_the_training_split(sklearn_digits):
    images, _ = sklearn_digits
    cfg = load_preset("digits_sr_tiny")
    ds = load_data(cfg.data)
    rows = torch.cat([sr_batches(ds, _tc(batch_size=64), cfg.data.sr)(s).x_data for s in range(50)])[:, 0]
    match = (rows.flatten(1)[:, None, :] == images.flatten(1)[None, :, :]).all(-1)  # (3200, 1797)
    first = match.float().argmax(1)  # the first sklearn index each row equals
    assert match.any(1).all() and int(first.max()) < DIGITS_TRAIN


def test_a_conditional_teacher_learns_on_digits(tmp_path, sr_train):
    """50 steps of the teacher's loop on sr_batches: the flow-matching loss on fixed held-out batches (fixed t)
    drops, and the trained net uses the condition (the true condition beats a shuffled one)."""
    cfg, ds = sr_train
    tc = _tc(steps=50, batch_size=32, lr=3e-3, warmup=5, ckpt_every=50, log_every=10)
    model = stages.base.new_model(cfg, ds, tc.seed)
    assert model.cond_channels == 1
    test = load_heldout(cfg.data)
    held = sr_batches(test, tc.model_copy(update={"batch_size": 256, "seed": 99}), cfg.data.sr)

    def loss(m, shuffle=False) -> float:
        m.eval()
        total = 0.0
        with torch.no_grad():
            for k in range(4):
                b = held(k)
                cond = b.cond[torch.randperm(256, generator=torch.Generator().manual_seed(k))] if shuffle else b.cond
                g = torch.Generator().manual_seed(time_seed(99, k))
                total += flow_matching_loss(m, Batch(b.x_data, b.x_noise, None, cond), tc, g).mean().item()
        m.train()
        return total / 4

    before = loss(model)
    url = train(net=model, batches=sr_batches(ds, tc, cfg.data.sr), cfg=tc, ckpt_dir=str(tmp_path / "t"),
                stage="teacher", meta=stages.base.model_meta(cfg, ds))
    trained = stages.load_model(url, ema=False)
    after = loss(trained)
    assert after < 0.7 * before, (before, after)
    assert loss(trained) < loss(trained, shuffle=True)
    assert torch.load(url.removeprefix("file://"), weights_only=False)["meta"]["sr"] == SR


# --- the plan of an OFTSR run; an unconditional run is unchanged -----------------------------------------------------

def test_plan_of_digits_sr_is_teacher_distill_evaluate():
    for preset in ("digits_sr", "digits_sr_tiny", "natural32_sr"):
        cfg = load_preset(preset)
        plan = stages.plan(cfg, stages.RunDir("/r", "s"))
        assert [(s.name, s.kind) for s in plan] == [("teacher", "teacher"), ("distill", "distill"),
                                                    ("evaluate", "evaluate")], preset
        teacher, distill, ev = plan
        assert distill.inputs == {"teacher": "teacher", "init": "teacher"} and distill.model == "distilled"
        assert ev.inputs == {"teacher": "teacher", "distilled": "distill"}
        assert [s.writes for s in plan] == ["/r/s/teacher", "/r/s/distill", "/r/s/eval"]
        assert stages.model_names(cfg) == ["teacher", "distilled"]


def _captured_teacher_batches(cfg, tmp_path, monkeypatch):
    """The `batches` the teacher stage trains on (its train() replaced by a recorder; one step: no guide snapshot)."""
    seen = {}

    def fake_train(**kw):
        seen.update(kw)
        return "unused"

    monkeypatch.setattr(stages.teacher, "train", fake_train)
    rundir = stages.RunDir.of(str(tmp_path), cfg.name)
    s = stages.find(stages.plan(cfg, rundir), "teacher")
    stages.teacher.run(s, stages.Context(cfg, rundir), {})
    return seen["batches"], seen["meta"]


def test_the_teacher_stage_of_an_sr_run_trains_on_sr_batches(tmp_path, monkeypatch):
    cfg = load_preset("digits_sr_tiny", {"teacher.train.steps": 1})
    batches, meta = _captured_teacher_batches(cfg, tmp_path, monkeypatch)
    want = sr_batches(stages.dataset(cfg), cfg.teacher.train, cfg.data.sr)
    for step in (0, 9):
        got, ref = batches(step), want(step)
        assert torch.equal(got.x_data, ref.x_data) and torch.equal(got.x_noise, ref.x_noise)
        assert torch.equal(got.cond, ref.cond) and got.label is None
    assert meta["sr"] == SR and meta["net"]["cond_channels"] == 1


@pytest.mark.parametrize("preset,over", [("digits", {"net.class_cond": False}), ("toy2d", {}),
                                         ("digits", {"teacher.train.label_dropout": 0.2})])
def test_an_unconditional_run_keeps_its_plan_and_batches(tmp_path, monkeypatch, preset, over):
    cfg = load_preset(preset, {"teacher.train.steps": 1, "teacher.train.batch_size": 24} | over)
    assert [s.name for s in stages.plan(cfg, stages.RunDir("/r", "x"))] == ["teacher", "pairs", "reflow", "evaluate"]
    batches, meta = _captured_teacher_batches(cfg, tmp_path, monkeypatch)
    assert "sr" not in meta and meta["net"]["cond_channels"] == 0
    ds, tc = stages.dataset(cfg), cfg.teacher.train
    model = stages.base.new_model(cfg, ds, tc.seed)
    for step in (0, 3, 250):
        # recomputed: indices, then (class-conditional) label dropout, then N(0, I) noise, from the step's generator
        g = torch.Generator().manual_seed(batch_seed(tc.seed, step))
        idx = torch.randint(len(ds), (24,), generator=g)
        label = model.drop_labels(ds.y[idx], tc.label_dropout, g) if cfg.net.class_cond else None
        noise = torch.randn((24, *ds.shape), generator=g)
        got = batches(step)
        assert torch.equal(got.x_data, ds.x[idx]) and torch.equal(got.x_noise, noise) and got.cond is None
        assert (got.label is None) if label is None else torch.equal(got.label, label)
        ref = teacher_batches(ds, model, tc, cfg.net.class_cond)(step)
        assert torch.equal(ref.x_noise, got.x_noise)
    if tc.label_dropout > 0:  # the dropout did draw: some labels are the null label
        labels = torch.cat([batches(s).label for s in range(20)])
        assert (labels == ds.num_classes).any() and (labels < ds.num_classes).any()
