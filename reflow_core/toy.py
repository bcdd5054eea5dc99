"""The toy 2-D distributions (8 Gaussians, moons, checkerboard, circles, spirals): seeded float32 point clouds, the
data of the toy presets and, drawn fresh, the reference their samples are measured against."""
from __future__ import annotations

import math

import torch

TOY_NAMES: tuple[str, ...] = ("8gaussians", "moons", "checkerboard", "circles", "spirals")


def gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(n: int, generator: torch.Generator | None, *size: int) -> torch.Tensor:
    return torch.rand(n, *size, generator=generator, device=gen_device(generator)).cpu()


def _randn(n: int, generator: torch.Generator | None, *size: int) -> torch.Tensor:
    return torch.randn(n, *size, generator=generator, device=gen_device(generator)).cpu()


def _randint(high: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(high, (n,), generator=generator, device=gen_device(generator)).cpu()


def _eight_gaussians(n: int, g: torch.Generator | None) -> torch.Tensor:
    radius, std = 2.0 * math.sqrt(2.0), 0.25  # FFJORD's layout: centres at radius 2.83
    k = _randint(8, n, g).float()
    angle = k * (2.0 * math.pi / 8.0)
    centres = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) * radius
    return centres + std * _randn(n, g, 2)


def _moons(n: int, g: torch.Generator | None) -> torch.Tensor:
    # sklearn.make_moons in torch (so the torch generator seeds it), noise 0.1, centred and scaled by 2.
    upper = _randint(2, n, g).bool()
    t = _rand(n, g) * math.pi
    outer = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    inner = torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
    pts = torch.where(upper[:, None], outer, inner) + 0.1 * _randn(n, g, 2)
    return (pts - torch.tensor([0.5, 0.25])) * 2.0


def _checkerboard(n: int, g: torch.Generator | None) -> torch.Tensor:
    # FFJORD's checkerboard on [-2, 2]^2: 8 occupied unit squares of the 4x4 board.
    x1 = _rand(n, g) * 4.0 - 2.0
    x2 = _rand(n, g) - _randint(2, n, g).float() * 2.0
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1)


def _circles(n: int, g: torch.Generator | None) -> torch.Tensor:
    # sklearn.make_circles(factor=0.5) in torch: radii 3 and 1.5, noise 0.1.
    outer = _randint(2, n, g).bool()
    r = torch.where(outer, torch.tensor(3.0), torch.tensor(1.5))
    t = _rand(n, g) * (2.0 * math.pi)
    pts = torch.stack([torch.cos(t), torch.sin(t)], dim=1) * r[:, None]
    return pts + 0.1 * _randn(n, g, 2)


def _spirals(n: int, g: torch.Generator | None) -> torch.Tensor:
    # FFJORD's two spirals, range about [-4, 4].
    s = torch.sqrt(_rand(n, g)) * (540.0 * 2.0 * math.pi / 360.0)
    jitter = _rand(n, g, 2) * 0.5
    arm = torch.stack([-torch.cos(s) * s, torch.sin(s) * s], dim=1) + jitter
    sign = torch.where(_randint(2, n, g).bool(), 1.0, -1.0)
    pts = arm * sign[:, None] + 0.1 * _randn(n, g, 2)
    return pts / 3.0


_TOYS = {
    "8gaussians": _eight_gaussians,
    "moons": _moons,
    "checkerboard": _checkerboard,
    "circles": _circles,
    "spirals": _spirals,
}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points (float32, shape (n, 2), on the CPU) of a named toy 2-D distribution."""
    if name not in _TOYS:
        raise ValueError(f"unknown toy distribution {name!r}; valid names: {', '.join(TOY_NAMES)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _TOYS[name](int(n), generator).to(torch.float32).contiguous()
