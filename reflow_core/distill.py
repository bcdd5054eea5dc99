"""One-step students: distillation losses, SlimFlow's flow-guided distillation and annealing reflow (pure torch).

Time convention (as everywhere here): t = 0 data, t = 1 noise, x_t = (1 - t) x_data + t x_noise,
v = x_noise - x_data, generation integrates 1 -> 0. A model is a `velocity.VelocityModel` called `model(x, t, label)`.

One step
--------
A student's one-step sample is one Euler step of its velocity from t = 1 to t = 0:

    one_step(x_noise) = x_noise - v_s(x_noise, 1).

Distillation (`distill_loss`): d(one_step(x_noise), x_data) on the teacher's stored pairs (x_data, x_noise), d a
per-sample distance (`pseudo_huber` as the reflow loss, `l2`, or `lpips` with local weights).

Flow-guided distillation (FGD; SlimFlow, Zhu, Liu & Liu, ECCV 2024, arXiv:2407.12718)
------------------------------------------------------------------------------------
The pairs cover only the stored noise; FGD also supervises the student on *fresh* noise e ~ N(0, I) through the
frozen teacher v_T. Let v_s = v_s(e, 1) (so the student's one-step sample is e - v_s). The student's straight line
from e is

    x_t = e - (1 - t) sg(v_s)          (t = 1: e;  t = 0: e - v_s, the one-step sample)

i.e. x_t = (1 - t) (e - v_s) + t e, the interpolation between the student's sample and its noise. At a time
t ~ U[t_range] (default [0.2, 0.8]) the teacher takes over and finishes the trajectory with one Euler step to t = 0:

    x0_T = x_t - t v_T(x_t, t),

and the loss is d(e - v_s, sg(x0_T)): the gradient flows only through the student's one-step prediction e - v_s
(x_t uses sg(v_s), the teacher is frozen).

Fixed point. If the student is exact for a *straight* teacher (every teacher trajectory a line x_t = (1-t) T(x1) +
t x1, so v_T(x_t, t) = x1 - T(x1) and one Euler step from any t lands on T(x1) exactly), then for e - v_s = T(e)
the point x_t = (1 - t) T(e) + t e lies on the teacher's line from e, v_T(x_t, t) = e - T(e), and
x0_T = (1-t) T(e) + t e - t (e - T(e)) = T(e): the target is the student's own output and the loss is 0 for every t.
Conversely a student that is off the teacher's map gets a target between its own output and the teacher's
(`tests/core/test_distill.py` derives it in closed form for a linear-Gaussian teacher and shows gradient descent on FGD
alone converges to the teacher's map). For a curved teacher one Euler step from t is an approximation whose error
shrinks as t -> 0; t_range keeps away from t = 1 (the target would be the teacher's one-step map, not the student's)
and from t = 0 (the target would be the student's own output: no signal).

Annealing reflow (SlimFlow section 3.2)
---------------------------------------
A small student trained from scratch on a teacher's reflow pairs first learns on *independent* (noise, data)
couplings and is annealed into the teacher's coupling: the stored noise is replaced by

    x_noise' = sqrt(1 - beta^2) x_noise + beta e,    e ~ N(0, I) fresh,     beta = beta(step) : 1 -> 0,

(unit variance whenever x_noise and e are independent N(0, I)) and the pair (x_data, x_noise') is fed to the ordinary
flow-matching loss. With beta = 1 that is 1-rectified flow on the reflow samples; with beta = 0 it is reflow. Both
tensors of a pair may be flipped horizontally together (`joint_hflip`): a flipped Gaussian is Gaussian, and the
flipped pair is (approximately, for a teacher trained with flip augmentation) a pair of the teacher too, so this
doubles the pairs. The schedules (`beta`): linear, cosine, and a rescaled exponential, all 1 at step 0 and exactly
0 from `steps` on.

LPIPS
-----
`lpips_distance` uses the `lpips` package (optional extra `reflow[lpips]`; its linear-layer weights ship inside the
package) on a torchvision ImageNet backbone (AlexNet by default) whose weights torchvision keeps in torch hub's cache,
`$TORCH_HOME/hub/checkpoints/<file>` (`torch.hub.get_dir()`). This module never downloads: the file must be there, or
a FileNotFoundError names it and its download URL. Inputs are images (B, C, H, W) in [-1, 1]; 1-channel images
(digits) are repeated to 3 channels and images smaller than `min_size` (32 px) are upsampled bilinearly so their
short side is `min_size` (8x8 digits -> 32x32; AlexNet's five LPIPS feature maps are then 7, 3, 1, 1 and 1 px
wide: coarse, but defined). SlimFlow's code upsamples to 64 px before VGG-LPIPS; pass `min_size=64` (or 224,
consistency models' choice) for that.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import losses

__all__ = [
    "one_step", "l2", "pseudo_huber", "lpips_distance", "lpips_weights_path", "lpips_prepare", "DISTANCES",
    "distance_fn", "distill_loss", "fgd_target", "fgd_loss", "slim_distill_loss", "SCHEDULES", "beta",
    "anneal_source", "joint_hflip", "anneal_batch",
]

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DISTANCES = ("pseudo_huber", "l2", "lpips")
SCHEDULES = ("linear", "cosine", "exponential")
EXP_RATE = 5.0  # the exponential schedule's decay: exp(-5) ~ 0.0067 before rescaling


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _time(x: torch.Tensor, value: float) -> torch.Tensor:
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    return torch.full((x.shape[0],), float(value), dtype=dtype, device=x.device)


# --- one step -------------------------------------------------------------------------------------------------------

def one_step(model: nn.Module, x_noise: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
    """The student's one-step sample x_noise - v_s(x_noise, t=1) (one Euler step from t = 1 to t = 0)."""
    return x_noise - model(x_noise, _time(x_noise, 1.0), label)


# --- distances: (B, ...) x (B, ...) -> (B,) -------------------------------------------------------------------------

def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample (`losses.mse` of x - y; the mean, not the sum, over dimensions)."""
    return losses.mse(x - y)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, huber_scale: float = 0.00054) -> torch.Tensor:
    """sqrt(||x - y||^2 + c^2) - c per sample with c = huber_scale * sqrt(d) (`losses.pseudo_huber`, `losses.huber_c`:
    the same per-sample pseudo-Huber as the reflow loss)."""
    r = x - y
    return losses.pseudo_huber(r, losses.huber_c(huber_scale, r[0].numel()))


_LPIPS_WEIGHTS = {  # lpips net name -> (torchvision weights enum, torchvision constructor)
    "alex": ("AlexNet_Weights", "alexnet"),
    "vgg": ("VGG16_Weights", "vgg16"),
    "squeeze": ("SqueezeNet1_1_Weights", "squeezenet1_1"),
}
_LPIPS_CACHE: dict = {}


def lpips_weights_path(net: str = "alex") -> tuple[str, str]:
    """(path, url): where torchvision keeps the ImageNet backbone of LPIPS `net` ('alex', 'vgg', 'squeeze'), i.e.
    `torch.hub.get_dir()/checkpoints/<file>` ($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth for 'alex'), and
    the URL torchvision would download it from. The file name is read from torchvision's weights enum."""
    if net not in _LPIPS_WEIGHTS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {tuple(_LPIPS_WEIGHTS)}")
    import torchvision.models as tvm
    url = getattr(tvm, _LPIPS_WEIGHTS[net][0]).IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)), url


def _lpips_module(net: str, device: torch.device) -> nn.Module:
    """The frozen lpips.LPIPS(net) in eval mode on `device`, built without any download: the backbone is built with
    random weights (lpips' `pnet_rand=True`) and its feature layers are then loaded from the local torch hub file,
    whose absence is an error naming it. Cached per (net, file, device)."""
    path, url = lpips_weights_path(net)
    key = (net, path, str(device))
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS ({net}) needs the torchvision ImageNet weights at {path} and this code never downloads them: "
            f"fetch {url} on a connected machine and copy it to that path (the directory is $TORCH_HOME/hub/"
            f"checkpoints, TORCH_HOME defaulting to ~/.cache/torch), or choose another distance")
    try:
        import lpips
    except ImportError as e:
        raise RuntimeError("distance 'lpips' needs the lpips package: pip install 'reflow[lpips]' "
                           "(or pip install 'lpips>=0.1.4')") from e
    lin = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth")
    if not os.path.isfile(lin):
        raise FileNotFoundError(f"the lpips package's own linear-layer weights are missing at {lin}; reinstall lpips")
    with warnings.catch_warnings():  # torchvision's deprecation warning for lpips' legacy `pretrained=False`
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, version="0.1", pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    loaded = 0
    for slice_ in (m for name, m in model.net.named_children() if name.startswith("slice")):
        for idx, layer in slice_.named_children():  # lpips names each slice's layers by their index in `features`
            prefix = f"features.{idx}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            layer.load_state_dict(sub, strict=True)
            loaded += len(sub)
    n_features = sum(k.startswith("features.") for k in state)
    if loaded == 0 or loaded != n_features:
        raise RuntimeError(f"{path} is not torchvision's {_LPIPS_WEIGHTS[net][1]} ImageNet checkpoint: {loaded} of its "
                           f"{n_features} `features.*` tensors fit LPIPS' backbone")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _LPIPS_CACHE[key] = model
    return model


def lpips_prepare(x: torch.Tensor, min_size: int = 32) -> torch.Tensor:
    """LPIPS input from images (B, C, H, W) in [-1, 1]: 1 channel repeated to 3, then bilinear upsampling so the
    short side is at least `min_size` (8x8 digits -> 32x32). Values are not rescaled (LPIPS expects [-1, 1])."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"LPIPS needs images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if min(h, w) < min_size:
        s = min_size / min(h, w)
        x = F.interpolate(x, size=(max(min_size, round(h * s)), max(min_size, round(w * s))), mode="bilinear",
                          align_corners=False)
    return x


def lpips_distance(x: torch.Tensor, y: torch.Tensor, *, net: str = "alex", min_size: int = 32) -> torch.Tensor:
    """LPIPS(x, y) per sample (B,) on images in [-1, 1] (see `lpips_prepare`); differentiable in x and y, the
    network frozen. Needs local weights (`lpips_weights_path`): FileNotFoundError naming the file otherwise."""
    model = _lpips_module(net, x.device)
    return model(lpips_prepare(x.float(), min_size), lpips_prepare(y.float(), min_size)).reshape(x.shape[0])


def distance_fn(distance: str | Distance = "pseudo_huber", *, huber_scale: float = 0.00054, lpips_net: str = "alex",
                lpips_min_size: int = 32) -> Distance:
    """The per-sample distance `(x, y) -> (B,)` named by `distance` (one of DISTANCES; a callable passes through).
    'lpips' loads its network here, so a missing weights file is an error when the loss is built, not mid-run."""
    if callable(distance):
        return distance
    if distance == "pseudo_huber":
        return lambda x, y: pseudo_huber(x, y, huber_scale)
    if distance == "l2":
        return l2
    if distance == "lpips":
        _lpips_module(lpips_net, torch.device("cpu"))  # fail early (FileNotFoundError naming the file)
        return lambda x, y: lpips_distance(x, y, net=lpips_net, min_size=lpips_min_size)
    raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")


# --- distillation on the stored pairs -------------------------------------------------------------------------------

def distill_loss(model: nn.Module, batch, *, distance: str | Distance = "pseudo_huber",
                 huber_scale: float = 0.00054) -> torch.Tensor:
    """Per-sample d(one_step(model, batch.x_noise, batch.label), batch.x_data) (B,) on a `train.Batch` of pairs."""
    d = distance_fn(distance, huber_scale=huber_scale)
    return d(one_step(model, batch.x_noise, batch.label), batch.x_data)


# --- flow-guided distillation (SlimFlow) ----------------------------------------------------------------------------
# SlimFlow's code (original Rectified Flow convention: t' = 0 noise, t' = 1 data, v' = data - noise, so t' = 1 - t and
# v' = -v) computes, for fresh noise z0 and the student's v'_s = v'_s(z0, 0):
#     z_t' = z0 + t' sg(v'_s),     target z1 = z_t' + (1 - t') v'_T(z_t', t'),     loss d(z0 + v'_s, sg(z1)),
# with t' ~ U[0.2, 0.8]. In our convention (t = 1 - t', v = -v'): z_t' = e - (1 - t) sg(v_s) = x_t and
# z1 = x_t - t v_T(x_t, t) = x0_T, the formulas of the module docstring.

def fgd_target(student: nn.Module, teacher: nn.Module, x_noise: torch.Tensor, t: torch.Tensor,
               label: torch.Tensor | None = None) -> torch.Tensor:
    """The FGD target x0_T = x_t - t v_T(x_t, t) with x_t = x_noise - (1 - t) v_s(x_noise, 1) (no gradient)."""
    with torch.no_grad():
        return _fgd_end(teacher, x_noise, student(x_noise, _time(x_noise, 1.0), label), t, label)


@torch.no_grad()
def _fgd_end(teacher: nn.Module, e: torch.Tensor, v_s: torch.Tensor, t: torch.Tensor,
             label: torch.Tensor | None) -> torch.Tensor:
    """x0_T = x_t - t v_T(x_t, t) at x_t = e - (1 - t) sg(v_s): the teacher's one Euler step from the student's line."""
    t = t.to(device=e.device)
    tt = _expand(t, e)
    x_t = e - (1 - tt) * v_s.detach()
    return x_t - tt * teacher(x_t, t, label)


def fgd_loss(student: nn.Module, teacher: nn.Module, batch, generator: torch.Generator | None, *,
             t_range: tuple[float, float] = (0.2, 0.8), distance: str | Distance = "pseudo_huber",
             huber_scale: float = 0.00054) -> torch.Tensor:
    """Per-sample FGD loss (B,): fresh noise e ~ N(0, I) of x_noise's shape, then t ~ U[t_range] per sample, both
    drawn from `generator` (in that order); d(e - v_s(e, 1), sg(x0_T)) with the target of `fgd_target`. One student
    evaluation (its output is used with gradient for the prediction and detached for x_t) and one teacher's."""
    lo, hi = float(t_range[0]), float(t_range[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"t_range must satisfy 0 <= lo <= hi <= 1, got {t_range}")
    x = batch.x_noise
    gdev = generator.device if generator is not None else torch.device("cpu")
    e = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    t = (lo + (hi - lo) * torch.rand(x.shape[0], generator=generator, device=gdev, dtype=torch.float64))
    t = t.to(device=x.device, dtype=_time(x, 1.0).dtype)
    v_s = student(e, _time(e, 1.0), batch.label)
    target = _fgd_end(teacher, e, v_s, t, batch.label)
    d = distance_fn(distance, huber_scale=huber_scale)
    return d(e - v_s, target)


def slim_distill_loss(student: nn.Module, teacher: nn.Module, batch, generator: torch.Generator | None, *,
                      fgd_weight: float = 1.0, distance: str | Distance = "pseudo_huber",
                      huber_scale: float = 0.00054, t_range: tuple[float, float] = (0.2, 0.8)) -> torch.Tensor:
    """SlimFlow's distillation loss (B,): distill_loss on the pairs + fgd_weight * fgd_loss on fresh noise.
    fgd_weight = 0 skips FGD entirely (no teacher call, nothing drawn from `generator`)."""
    d = distance_fn(distance, huber_scale=huber_scale)
    loss = distill_loss(student, batch, distance=d)
    if fgd_weight:
        loss = loss + fgd_weight * fgd_loss(student, teacher, batch, generator, t_range=t_range, distance=d)
    return loss


# --- annealing reflow (SlimFlow) ------------------------------------------------------------------------------------
# SlimFlow (their t' = 1 - t, but the noise mixing does not involve time): z0' = sqrt(1 - beta^2) z0 + beta * xi,
# xi ~ N(0, I), beta annealed from 1 to 0 over the first `steps` (their code: linear 1 - min(1, s/S), cosine
# (1 + cos(pi min(1, s/S))) / 2, exponential exp(-s/S), the last never reaching 0; ours is rescaled to end at 0), and a
# horizontal flip of data and noise together (their code flips the whole batch with probability 1/2; we flip each
# pair with probability p).

def beta(step: int, steps: int, schedule: str = "linear") -> float:
    """Annealing weight of fresh noise: 1 at step 0, non-increasing, exactly 0 for step >= steps (steps <= 0: 0).
    linear 1 - s; cosine (1 + cos(pi s)) / 2; exponential (exp(-5 s) - exp(-5)) / (1 - exp(-5)); s = step / steps
    clipped to [0, 1]."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown annealing schedule {schedule!r}; choose one of {SCHEDULES}")
    if steps <= 0 or step >= steps:
        return 0.0
    s = min(1.0, max(0.0, step / steps))
    if schedule == "linear":
        return 1.0 - s
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * s))
    floor = math.exp(-EXP_RATE)
    return (math.exp(-EXP_RATE * s) - floor) / (1.0 - floor)


def anneal_source(x_noise: torch.Tensor, fresh: torch.Tensor, beta: float) -> torch.Tensor:
    """sqrt(1 - beta^2) x_noise + beta fresh: unit variance when both are independent N(0, I); beta = 0 gives
    x_noise, beta = 1 gives fresh (exactly)."""
    b = float(beta)
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return math.sqrt(1.0 - b * b) * x_noise + b * fresh


def joint_hflip(x_data: torch.Tensor, x_noise: torch.Tensor, generator: torch.Generator | None, p: float = 0.5
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip the last axis (width) of the same samples in both tensors, each sample with probability p (one uniform
    per sample from `generator`). Images (4-D) only: other tensors are returned unchanged and nothing is drawn."""
    if x_data.dim() != 4:
        return x_data, x_noise
    if x_noise.shape != x_data.shape:
        raise ValueError(f"x_data {tuple(x_data.shape)} and x_noise {tuple(x_noise.shape)} differ in shape")
    gdev = generator.device if generator is not None else torch.device("cpu")
    flip = (torch.rand(x_data.shape[0], generator=generator, device=gdev) < p).to(x_data.device)
    m = flip.reshape(-1, 1, 1, 1)
    return torch.where(m, x_data.flip(-1), x_data), torch.where(m, x_noise.flip(-1), x_noise)


def anneal_batch(batch, step: int, steps: int, schedule: str = "linear", generator: torch.Generator | None = None,
                 flip: bool = True, p: float = 0.5):
    """The annealed `train.Batch` for the flow-matching loss: fresh noise (x_noise's shape, always drawn from
    `generator`, so the stream does not depend on the step), then (flip=True, images) the joint flip's coins; the
    noise becomes anneal_source(x_noise, fresh, beta(step, steps, schedule)); labels are kept."""
    x = batch.x_noise
    gdev = generator.device if generator is not None else torch.device("cpu")
    fresh = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    x_noise = anneal_source(x, fresh, beta(step, steps, schedule))
    x_data = batch.x_data
    if flip:
        x_data, x_noise = joint_hflip(x_data, x_noise, generator, p)
    return dataclasses.replace(batch, x_data=x_data, x_noise=x_noise)
