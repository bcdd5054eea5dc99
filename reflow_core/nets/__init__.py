"""Velocity backbones: `MLP` for 2-D toys, `UNet` for images, and the helpers the pipeline uses on them.

Every backbone: `forward(x, t, label=None, cond=None) -> velocity of x's shape`, t (B,) in [0, 1] (t = 0 data, t = 1 noise).
Class-conditional backbones have num_classes + 1 label rows and require a label tensor; row `num_classes` is the
CFG null label, but backbones know nothing of guidance: `reflow_core.velocity.VelocityModel` wraps a backbone and
owns the null label (label=None -> that row), bf16 autocast and guidance. `velocity.build_velocity_model(cfg, ...)`
builds the wrapped model; `build_net` builds the bare backbone.
"""
from __future__ import annotations

from torch import nn

from ..config import NetConfig
from .mlp import MLP
from .unet import UNet, check_unet_config

__all__ = ["MLP", "UNet", "build_net", "set_dropout", "count_params", "check_unet_config"]


def build_net(cfg: NetConfig, data_shape: tuple[int, ...], num_classes: int = 0) -> nn.Module:
    """Build the net `cfg` describes for per-sample `data_shape` ((D,) for toys, (C, H, W) for images).

    `num_classes` is used only when cfg.class_cond (and must then be >= 1). `cfg.dropout` applies to the U-Net;
    the MLP is built with dropout 0 (toy teachers fit better without it) but has Dropout modules, so
    `set_dropout` can still turn on reflow dropout for it.
    """
    data_shape = tuple(int(s) for s in data_shape)
    n_cls = int(num_classes) if cfg.class_cond else 0
    if cfg.class_cond and n_cls < 1:
        raise ValueError(f"net.class_cond=True needs num_classes >= 1 (is the data set labelled?), got {num_classes}")
    if cfg.kind == "mlp":
        if len(data_shape) != 1:
            raise ValueError(f"net.kind='mlp' needs flat data of shape (D,), got data_shape={data_shape}")
        return MLP(dim=data_shape[0], hidden=cfg.hidden, depth=cfg.depth, num_classes=n_cls,
                   cond_channels=cfg.cond_channels)
    if cfg.kind == "unet":
        if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
            raise ValueError(f"net.kind='unet' needs square images of shape (C, H, H), got data_shape={data_shape}")
        return UNet(
            in_channels=data_shape[0],
            image_size=data_shape[1],
            channels=cfg.channels,
            channel_mult=tuple(cfg.channel_mult),
            num_res_blocks=cfg.num_res_blocks,
            attn_resolutions=tuple(cfg.attn_resolutions),
            dropout=cfg.dropout,
            num_classes=n_cls,
            cond_channels=cfg.cond_channels,
        )
    raise ValueError(f"unknown net.kind {cfg.kind!r}; choose 'mlp' or 'unet'")


def set_dropout(module: nn.Module, p: float) -> None:
    """Set the drop probability of every nn.Dropout in `module` (reflow dropout, Simple ReFlow improvement #4)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = float(p)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
