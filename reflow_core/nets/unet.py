"""A compact DDPM++-style U-Net velocity backbone (Song et al. 2021; EDM's `SongUNet`, trimmed).

Layout: conv_in -> [ResBlock x num_res_blocks (+attn)] per level, stride-2 conv between levels -> middle
(Res, Attn, Res) -> mirrored decoder with num_res_blocks + 1 blocks per level, each consuming one skip -> GN, SiLU,
zero-init conv_out. Time (+ class) embedding enters every ResBlock as a GroupNorm scale/shift (adaptive GN).

forward has no value-dependent Python control flow, so it traces cleanly under torch.compile; it uses only ops
that accept channels_last tensors and bf16 autocast (GroupNorm and the embeddings run in float32 there).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import broadcast_time, require_cond, require_labels, timestep_embedding


def num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= max_groups that divides `channels` (GroupNorm requires divisibility)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: residual branches then start as identity, which keeps deep nets stable."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)  # -> (scale, shift) for norm2
        self.norm2 = norm(cout)
        self.dropout = nn.Dropout(dropout)  # set_dropout() retargets this for reflow dropout (#4)
        self.conv2 = zero_(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        # DDPM++ "skip_rescale": keep the residual stream's variance ~constant through depth.
        return (self.skip(x) + h) * (1 / math.sqrt(2))


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions (SDPA picks flash / memory-efficient kernels)."""

    def __init__(self, channels: int, head_dim: int = 64):
        super().__init__()
        self.heads = channels // head_dim if channels % head_dim == 0 else 1
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hgt * wid)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, head_dim)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, hgt, wid)
        return (x + self.proj(h)) * (1 / math.sqrt(2))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """ResBlocks at one resolution, each optionally followed by attention. Keeps the module tree simple."""

    def __init__(self, block: ResBlock, attn: bool):
        super().__init__()
        self.block = block
        self.attn = Attention(block.conv2.out_channels) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.block(x, emb))


def check_unet_config(image_size: int, channel_mult, attn_resolutions) -> list[int]:
    """Return the resolution of each level; raise ValueError (naming the fix) when the config cannot fit."""
    n_down = len(channel_mult) - 1
    if not channel_mult or any(int(m) < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {list(channel_mult)}")
    if image_size % (2**n_down) or image_size // (2**n_down) < 2:
        max_levels = 1
        while image_size % (2**max_levels) == 0 and image_size // (2**max_levels) >= 2:
            max_levels += 1
        raise ValueError(
            f"U-Net channel_mult={list(channel_mult)} downsamples {n_down} times, which does not fit "
            f"image_size={image_size}: every level must halve the size exactly and the lowest resolution must be "
            f">= 2. Use at most {max_levels} entries in channel_mult for this image size."
        )
    resolutions = [image_size // 2**i for i in range(len(channel_mult))]
    unknown = sorted(set(attn_resolutions) - set(resolutions))
    if unknown:
        raise ValueError(
            f"attn_resolutions {unknown} never occur in this U-Net (image_size={image_size}, "
            f"channel_mult={list(channel_mult)} gives resolutions {resolutions}); pick from those or use []"
        )
    return resolutions


class UNet(nn.Module):
    """x (B, C, H, W), t (B,) -> velocity (B, C, H, W). Needs H == W == image_size."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: int = 32,
        channel_mult=(1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions=(8,),
        dropout: float = 0.1,
        num_classes: int = 0,
        cond_channels: int = 0,
    ):
        super().__init__()
        if cond_channels < 0:
            raise ValueError(f"UNet needs cond_channels >= 0, got {cond_channels}")
        resolutions = check_unet_config(image_size, channel_mult, attn_resolutions)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.time_dim = channels
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # num_classes + 1 rows: the last one is "no label" (CFG), picked by VelocityModel, not here
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        # Encoder; `skips` records the channel count of every tensor pushed for the decoder.
        self.down = nn.ModuleList()
        skips, ch = [channels], channels
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(Level(ResBlock(ch, channels * mult, emb_dim, dropout), resolutions[i] in attn_resolutions))
                ch = channels * mult
                skips.append(ch)
            if i < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), Attention(ch), ResBlock(ch, ch, emb_dim, dropout)])
        # Decoder: one more block per level than the encoder, so every skip is consumed exactly once.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                cin = ch + skips.pop()
                ch = channels * mult
                self.up.append(Level(ResBlock(cin, ch, emb_dim, dropout), resolutions[i] in attn_resolutions))
            if i > 0:
                self.up.append(Upsample(ch))
        assert not skips
        self.norm_out = norm(ch)
        # Zero-init output: the net starts as v = 0 (a sensible prior for a velocity field).
        self.conv_out = zero_(nn.Conv2d(ch, in_channels, 3, padding=1))
        # The condition's first-conv weights (the widened conv_in of OFTSR, kept as a separate bias-free kernel):
        # zeros, no RNG draw, so nets without a condition are built exactly as before and an unconditional
        # checkpoint loaded into a conditional net gives the same outputs for any condition.
        self.cond_channels = cond_channels
        self.conv_in_cond = nn.Parameter(torch.zeros(channels, cond_channels, 3, 3)) if cond_channels > 0 else None

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, label: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        t = broadcast_time(t, x)
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        if self.label_emb is not None:
            emb = emb + self.label_emb(require_labels(label, x, self))
        emb = F.silu(emb)

        h = self.conv_in(x)
        if self.conv_in_cond is not None:
            h = h + F.conv2d(require_cond(cond, x, self), self.conv_in_cond.to(h.dtype), padding=1)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else layer(h, emb)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
