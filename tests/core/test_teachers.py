"""reflow_core.teachers: a pretrained discrete-VP diffusion model as a velocity in our convention.

1. closed form: the exact Gaussian eps / x0 / v predictor through the adapter is the exact rectified-flow velocity;
2. diffusers' own DDIM (eta 0) loop == our Euler solver on the adapted velocity, in float64;
3. from_diffusers on local folders, the no-download error, class labels;
4. weights_hash and build_from_meta.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from reflow_core import solvers, teachers
from reflow_core.teachers import DiffusionVelocity, log_snr_at_timestep, log_snr_table
from reflow_core.velocity import VelocityModel

diffusers = pytest.importorskip("diffusers")


def _betas_linear(T=1000):
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)


def _ab(T=1000):
    return torch.cumprod(1 - _betas_linear(T), 0)


# --- 1. closed form -------------------------------------------------------------------------------------------------

class ExactGaussianPredictor(nn.Module):
    """The exact predictor for x0 ~ N(mu, s^2 I), x_tau = alpha x0 + sigma eps, at a fractional timestep index,
    using the schedule table and the same log-SNR interpolation as the adapter.
    E[eps | x] = sigma (x - alpha mu) / D, E[x0 | x] = mu + alpha s^2 (x - alpha mu) / D, D = alpha^2 s^2 + sigma^2."""

    def __init__(self, ab, mu, s, kind):
        super().__init__()
        self.lam, self.mu, self.s, self.kind = log_snr_table(ab), mu, s, kind

    def forward(self, x, k):
        lam = log_snr_at_timestep(self.lam, k)
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, sg = torch.sigmoid(lam).sqrt().reshape(shape), torch.sigmoid(-lam).sqrt().reshape(shape)
        D = a ** 2 * self.s ** 2 + sg ** 2
        eps = sg * (x - a * self.mu) / D
        x0 = self.mu + a * self.s ** 2 * (x - a * self.mu) / D
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - sg * x0}[self.kind]


def exact_rf_velocity(y, t, mu, s):
    """v*(y, t) = E[eps - x0 | (1-t) x0 + t eps = y] = -mu + (t - (1-t) s^2) / ((1-t)^2 s^2 + t^2) (y - (1-t) mu)."""
    t = t.reshape((-1,) + (1,) * (y.dim() - 1))
    var = (1 - t) ** 2 * s ** 2 + t ** 2
    return -mu + (t - (1 - t) * s ** 2) / var * (y - (1 - t) * mu)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_closed_form_gaussian(kind):
    g = torch.Generator().manual_seed(0)
    ab = _ab()
    mu = torch.randn(1, 4, 4, generator=g, dtype=torch.float64)
    s = 0.7
    adapter = DiffusionVelocity(ExactGaussianPredictor(ab, mu, s, kind), ab, kind)
    a, sg = ab.sqrt(), (1 - ab).sqrt()
    t_knots = (sg / (a + sg))[torch.tensor([0, 1, 10, 250, 500, 998, 999])]
    t_min, t_max = adapter.t_range()
    t_between = t_min + (t_max - t_min) * torch.rand(9, generator=g, dtype=torch.float64)
    t = torch.cat([t_knots, t_between])
    y = torch.randn(t.numel(), 1, 4, 4, generator=g, dtype=torch.float64)
    v = adapter(y, t)
    assert v.dtype == torch.float64
    ref = exact_rf_velocity(y, t, mu, s)
    torch.testing.assert_close(v, ref, rtol=1e-9, atol=1e-9)


def test_clamping_outside_the_schedule():
    ab = _ab()
    mu, s = torch.zeros(2, dtype=torch.float64), 0.5
    adapter = DiffusionVelocity(ExactGaussianPredictor(ab, mu, s, "epsilon"), ab, "epsilon")
    t_min, t_max = adapter.t_range()
    y = torch.randn(2, 2, dtype=torch.float64)
    for t_out, t_in in ((0.0, t_min), (1.0, t_max), (1e-9, t_min), (1 - 1e-12, t_max)):
        v_out = adapter(y, torch.full((2,), t_out, dtype=torch.float64))
        assert torch.isfinite(v_out).all()
        torch.testing.assert_close(v_out, adapter(y, torch.full((2,), t_in, dtype=torch.float64)),
                                   rtol=1e-12, atol=1e-12)


# --- 2. diffusers' DDIM == our Euler --------------------------------------------------------------------------------

def _tiny_unet(**kw):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, **kw).eval()


def _alpha_sigma(ab):
    ab = torch.as_tensor(ab, dtype=torch.float64)
    return ab.sqrt(), (1 - ab).sqrt()


@pytest.mark.parametrize("beta_schedule,prediction_type,set_alpha_to_one", [
    ("linear", "epsilon", True), ("squaredcos_cap_v2", "epsilon", True),
    ("linear", "v_prediction", False), ("squaredcos_cap_v2", "v_prediction", True)])
@torch.no_grad()
def test_ddim_is_euler_in_our_coordinates(beta_schedule, prediction_type, set_alpha_to_one):
    unet = _tiny_unet().double()
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                    prediction_type=prediction_type, clip_sample=False,
                                    set_alpha_to_one=set_alpha_to_one)
    # diffusers keeps its table in float32 and takes alpha_prod ** 0.5 in float32: run its own step code on the
    # same table in float64 so the comparison is limited by float64 rounding only
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).double()
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) * sched.init_noise_sigma

    x = x_T.clone()
    for ts in sched.timesteps:
        out = unet(x, ts).sample
        x = sched.step(out, ts, x, eta=0.0).prev_sample
    x_ddim = x

    ab = sched.alphas_cumprod
    adapter = DiffusionVelocity(unet, ab, prediction_type)
    a_k, s_k = _alpha_sigma(ab[sched.timesteps.long()])
    a_f, s_f = _alpha_sigma(sched.final_alpha_cumprod)
    grid = torch.cat([s_k / (a_k + s_k), (s_f / (a_f + s_f)).reshape(1)])
    assert torch.all(grid.diff() <= 0)

    def v(y, t32):
        # solvers pass t as float32; recover the float64 grid time it came from (float64 exactness check only)
        t64 = grid[(grid - t32[:1].double()).abs().argmin()].expand(y.shape[0])
        return adapter(y, t64)

    y = x_T / (a_k[0] + s_k[0])
    y = solvers.integrate(v, y, grid, "euler")
    x_ours = (a_f + s_f) * y
    err = ((x_ours - x_ddim).abs().max() / x_ddim.abs().max()).item()
    assert err < 1e-10, err


# --- 3. from_diffusers ----------------------------------------------------------------------------------------------

def _no_hub(monkeypatch):
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    monkeypatch.setattr(teachers, "_hub_snapshot", boom)


@pytest.mark.parametrize("layout", ["pipeline", "flat"])
def test_from_diffusers_local_roundtrip(tmp_path, monkeypatch, layout):
    _no_hub(monkeypatch)
    unet = _tiny_unet()
    sched = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    if layout == "pipeline":
        unet.save_pretrained(tmp_path / "unet")
        sched.save_config(tmp_path / "scheduler")
    else:
        unet.save_pretrained(tmp_path)
        sched.save_config(tmp_path)
    loaded = teachers.from_diffusers(tmp_path)
    assert loaded.prediction_type == "v_prediction"
    ref = DiffusionVelocity(unet, sched.alphas_cumprod, "v_prediction")
    y, t = torch.randn(4, 1, 8, 8), torch.tensor([0.05, 0.3, 0.6, 0.95])
    with torch.no_grad():
        torch.testing.assert_close(loaded(y, t), ref(y, t))
        assert loaded(y, t).dtype == torch.float32
    assert teachers.weights_hash(loaded) == teachers.weights_hash(ref)
    assert teachers.from_diffusers(tmp_path, prediction_type="epsilon").prediction_type == "epsilon"


def test_missing_local_dir_is_a_clear_error_without_download(tmp_path, monkeypatch):
    _no_hub(monkeypatch)
    missing = tmp_path / "teachers" / "ddpm"
    with pytest.raises(teachers.TeacherNotFoundError, match="teacher directory .*ddpm.* does not exist"):
        teachers.from_diffusers(missing)
    with pytest.raises(teachers.TeacherNotFoundError, match="does not exist"):
        teachers.from_diffusers("./relative/missing")


def test_hub_id_offline_reads_only_the_cache(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        raise LocalEntryNotFoundError("not cached")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(teachers.TeacherNotFoundError, match="offline.*pass that directory"):
        teachers.from_diffusers("some-org/some-ddpm")
    assert calls and calls[0][0] == "some-org/some-ddpm" and calls[0][1]["local_files_only"] is True


def test_class_conditional_unet_gets_labels():
    num_classes = 3
    unet = _tiny_unet(num_class_embeds=num_classes + 1)
    adapter = DiffusionVelocity(unet, _ab(), "epsilon")
    assert adapter.class_conditional
    model = VelocityModel(adapter, num_classes)
    y, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    with torch.no_grad():
        v0 = model(y, t, torch.tensor([0, 0]))
        v1 = model(y, t, torch.tensor([1, 1]))
        v_null = model(y, t, None)
        v_null_explicit = model(y, t, torch.tensor([num_classes, num_classes]))
    assert not torch.allclose(v0, v1)
    torch.testing.assert_close(v_null, v_null_explicit)
    with pytest.raises(ValueError, match="class-conditional"):
        adapter(y, t)
    # unconditional: labels ignored; the parameters are the UNet's (fine-tunable)
    plain = DiffusionVelocity(_tiny_unet(), _ab(), "epsilon")
    assert not plain.class_conditional
    assert {n for n, _ in plain.named_parameters()} == {"model." + n for n, _ in plain.model.named_parameters()}
    vm = VelocityModel(plain, 0)
    with torch.no_grad():
        torch.testing.assert_close(vm(y, t, torch.tensor([1, 2])), plain(y, t))


# --- 4. identity and rebuilding -------------------------------------------------------------------------------------

def test_weights_hash_and_build_from_meta():
    ab = _ab()
    unet = _tiny_unet(num_class_embeds=3)
    adapter = DiffusionVelocity(unet, ab, "epsilon")
    h = teachers.weights_hash(adapter)
    assert h == teachers.weights_hash(DiffusionVelocity(unet, ab, "epsilon"))
    assert h != teachers.weights_hash(DiffusionVelocity(unet, ab, "v_prediction"))
    assert teachers.weights_hash(VelocityModel(adapter, 2)) != teachers.weights_hash(
        VelocityModel(DiffusionVelocity(unet, ab, "sample"), 2))
    meta = json.loads(json.dumps({"teacher": adapter.config()}))  # what a checkpoint's meta stores
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    with torch.no_grad():
        next(unet.parameters()).view(-1)[0] += 1e-3
    assert teachers.weights_hash(adapter) != h

    rebuilt = teachers.build_from_meta(meta)
    assert rebuilt.prediction_type == "epsilon" and rebuilt.num_train_timesteps == 1000
    torch.testing.assert_close(rebuilt.alphas_cumprod, ab, rtol=0, atol=0)
    rebuilt.load_state_dict(state)
    assert teachers.weights_hash(rebuilt) == h
    with torch.no_grad():
        unet.load_state_dict({k[len("model."):]: v for k, v in state.items()})
        y, t, lab = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.8]), torch.tensor([0, 2])
        torch.testing.assert_close(rebuilt.eval()(y, t, lab), adapter.eval()(y, t, lab), rtol=0, atol=0)


def test_bad_settings():
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionVelocity(nn.Identity(), _ab(), "x0")
    bad = _ab().clone()
    bad[-1] = 0.0
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        DiffusionVelocity(nn.Identity(), bad, "epsilon")
    with pytest.raises(ValueError, match="unet_config"):
        teachers.build_from_meta(DiffusionVelocity(nn.Identity(), _ab(), "epsilon").config())


# --- the pipeline from a pretrained diffusers model (teacher.source: diffusers) ----------------------------------------

@pytest.mark.slow
def test_pipeline_runs_from_a_pretrained_diffusers_teacher(tmp_path):
    """A tiny random class-conditional UNet2DModel saved in diffusers' layout is the teacher: imported once as a
    step-0 checkpoint that rebuilds offline, pairs tied to its hash, reflow fine-tunes its weights, evaluate and
    `reflow sample` use it like any model."""
    from diffusers import DDPMScheduler, UNet2DModel

    from flows import cli
    from reflow_core import checkpoint, stages, storage
    from reflow_core.preset import load_preset
    from reflow_core.pairs import PairStore

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11)
    folder = tmp_path / "pretrained"
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_config(folder / "scheduler")
    cfg = load_preset("digits_diffusers", {
        "teacher.path": str(folder), "pairs.n_pairs": 200, "pairs.shard_size": 100, "pairs.chunk_size": 50,
        "pairs.batch_size": 100, "pairs.nfe": 3, "reflow.train.steps": 6, "reflow.train.ckpt_every": 3,
        "reflow.train.batch_size": 16, "eval.n_samples": 64, "eval.nfes": [1, 2], "eval.straightness_steps": 2})
    root = str(tmp_path / "runs")
    rows = stages.run_local(cfg, root, "d")
    assert {r["model"] for r in rows} == {"teacher", "reflow"} and all(r["fd_digits"] > 0 for r in rows)
    rundir = stages.RunDir.of(root, "d")
    teacher = checkpoint.load(stages.model_checkpoint(rundir, "teacher"))
    assert teacher["step"] == 0 and teacher["meta"]["net"]["kind"] == "diffusion_vp"
    assert teacher["meta"]["weights_hash"] == teachers.weights_hash(teachers.from_diffusers(str(folder)))
    store = PairStore.open(storage.join(root, "d", "pairs.zarr"))
    assert store.attrs["teacher_hash"] == storage.sha256(storage.read_bytes(stages.model_checkpoint(rundir, "teacher")))
    reflow = checkpoint.load(stages.model_checkpoint(rundir, "reflow"))
    assert reflow["step"] == 6 and reflow["meta"]["net"] == teacher["meta"]["net"]  # the same network, fine-tuned
    assert any(not torch.equal(reflow["ema"][k], teacher["ema"][k]) for k in teacher["ema"])
    # the imported teacher integrated by our Euler solver is the pretrained model's own sampler (DDIM, eta 0)
    m = stages.load_model(stages.model_checkpoint(rundir, "teacher")).double()
    direct = teachers.from_diffusers(str(folder)).double()
    y, t = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    lab = torch.tensor([0, 3, 7, 10])
    assert torch.allclose(m(y, t, lab).double(), direct(y, t, lab), atol=1e-6)
    out = tmp_path / "x.npy"
    assert cli.main(["sample", "--root", root, "--run", "d", "--model", "reflow", "--n", "8", "--out", str(out)]) == 0
    assert out.exists()
