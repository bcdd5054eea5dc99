"""Velocity MLP backbone for 2-D toy data, plus the time / label helpers the U-Net shares.

Contract (every backbone): `forward(x, t, label=None, cond=None) -> velocity of x's shape`; t = 0 is data, t = 1 is
noise. `cond` (a backbone built with cond_channels > 0) is an image-like condition concatenated to x's channels.
A class-conditional backbone needs a label tensor (row num_classes of its embedding is CFG's "no label", chosen by
`reflow_core.velocity.VelocityModel`); an unconditional one ignores `label`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# t in [0, 1] is multiplied by this before the sinusoids, so the fastest frequency completes ~160 periods over
# [0, 1] and the slowest (max_period 10_000) ~0.016: the DDPM recipe, which resolves t finely near both ends.
TIME_SCALE = 1000.0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of t (B,) -> (B, dim), computed in float32 (bf16 would alias nearby t)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * TIME_SCALE)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd dims: pad so the output width is exactly `dim`
        emb = F.pad(emb, (0, 1))
    return emb


def broadcast_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Accept a python float, a 0-dim tensor, or (B,) and return a float tensor of shape (B,) on x's device.

    Branches depend only on types and shapes (static under torch.compile), never on values.
    """
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), device=x.device)
    t = t.to(device=x.device, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(x.shape[0])


def require_labels(label: torch.Tensor | None, x: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """A class-conditional backbone's labels as a long tensor (B,) on x's device; None is an error.

    Backbones know nothing of classifier-free guidance: "no label" (the null row, index num_classes) is chosen by
    `reflow_core.velocity.VelocityModel`, which maps label=None to it."""
    if label is None:
        raise ValueError(f"{type(net).__name__} is class-conditional (num_classes={net.num_classes}): pass a label "
                         f"tensor (B,) with values in [0, {net.num_classes}] (row {net.num_classes} = no label), or "
                         "call it through reflow_core.velocity.VelocityModel, which maps label=None to that row")
    return label.to(device=x.device, dtype=torch.long).reshape(x.shape[0])


def require_cond(cond: torch.Tensor | None, x: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """A conditional backbone's condition, checked: (B, cond_channels, *x's spatial shape) on x's device and dtype.

    Backbones know nothing of guidance: the null condition (zeros) is chosen by `reflow_core.velocity.VelocityModel`."""
    want = (x.shape[0], net.cond_channels, *x.shape[2:])
    if cond is None:
        raise ValueError(f"{type(net).__name__} has cond_channels={net.cond_channels}: pass a condition of shape {want}")
    if tuple(cond.shape) != want:
        raise ValueError(f"{type(net).__name__}: condition of shape {tuple(cond.shape)}, expected {want}")
    return cond.to(device=x.device, dtype=x.dtype)


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block; the time (+label) embedding is added between the two linears."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.dropout = nn.Dropout(dropout)  # p = 0 by default; set_dropout() turns it on for reflow (#4)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.fc1(F.silu(self.norm(h))) + self.emb(emb)
        y = self.fc2(self.dropout(F.silu(y)))
        return h + y


class MLP(nn.Module):
    """x (B, dim), t (B,) -> velocity (B, dim). `depth` residual blocks of width `hidden`."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, num_classes: int = 0, dropout: float = 0.0,
                 cond_channels: int = 0):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1 or num_classes < 0:
            raise ValueError(f"MLP needs dim, hidden, depth >= 1 and num_classes >= 0, got {dim}, {hidden}, {depth}, {num_classes}")
        if cond_channels < 0:
            raise ValueError(f"MLP needs cond_channels >= 0, got {cond_channels}")
        self.dim, self.num_classes, self.cond_channels = dim, num_classes, cond_channels
        self.time_dim = max(32, min(hidden, 256))
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # num_classes + 1 rows: the last one is "no label" (CFG), picked by VelocityModel, not here
        self.label_emb = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, hidden, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        # Zero-init output: the net starts as v = 0, so early training is not dominated by a random field.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # Condition input weights: zeros (no RNG draw, so nets without a condition are built exactly as before),
        # and an unconditional checkpoint loaded into a conditional net gives the same outputs for any condition.
        self.inp_cond = nn.Parameter(torch.zeros(hidden, cond_channels)) if cond_channels > 0 else None

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, label: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        t = broadcast_time(t, x)
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(require_labels(label, x, self))
        emb = F.silu(emb)  # blocks project silu(emb), as in DDPM/EDM
        h = self.inp(x)
        if self.inp_cond is not None:
            h = h + F.linear(require_cond(cond, x, self), self.inp_cond)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))
