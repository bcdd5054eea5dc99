"""A trained reflow model as a diffusers pipeline: the velocity net as a ModelMixin, sampled by diffusers'
FlowMatchEulerDiscreteScheduler.

`reflow export --format diffusers OUT` copies this file into the folder twice: as `OUT/pipeline.py` (the pipeline
class `model_index.json` names) and as `OUT/velocity/reflow_velocity.py` (the velocity component), so
`DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)` finds both; the net itself is built by `reflow_core`
from the component's config (the package must be importable where the folder is loaded).

Convention: our t (0 data, 1 noise) is the scheduler's sigma, and its timestep is sigma * num_train_timesteps
(1000); the net is called with t = sigma. The pipeline passes the sigmas of a uniform grid from 1 to 0 (the
terminal 0 is appended by the scheduler) with shift 1, so `num_inference_steps` Euler steps are exactly the
project's Euler solver at that NFE. The scheduler's own default grid (timesteps linspace(1000, 1)) stops at sigma
1/1000 before its last step and would not be.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from reflow_core.config import NetConfig
from reflow_core.velocity import build_velocity_model


class ReflowVelocityNet(ModelMixin, ConfigMixin):
    """v(x, t, label) of a reflow model, built from its net config, per-sample shape and class count."""

    @register_to_config
    def __init__(self, net: dict, shape: list[int], num_classes: int = 0):
        super().__init__()
        self.model = build_velocity_model(NetConfig.model_validate(net), tuple(shape), num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t, label)


@dataclass
class ReflowPipelineOutput(BaseOutput):
    """samples: (N, *shape) in data space (images in [-1, 1], not clamped)."""

    samples: torch.Tensor


class ReflowPipeline(DiffusionPipeline):
    """Noise -> data with `num_inference_steps` Euler steps of FlowMatchEulerDiscreteScheduler (1 NFE each).

    A class-conditional net without `labels` gets labels drawn uniformly (never the untrained "no label" row)."""

    def __init__(self, velocity: ModelMixin, scheduler):
        super().__init__()
        self.register_modules(velocity=velocity, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 1, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> ReflowPipelineOutput:
        cfg = self.velocity.config
        x = noise if noise is not None else torch.randn((batch_size, *cfg.shape), generator=generator)
        x = x.to(torch.float32)
        if cfg.num_classes and labels is None:
            labels = torch.randint(cfg.num_classes, (x.shape[0],), generator=generator)
        sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        self.scheduler.set_timesteps(sigmas=sigmas, device=x.device)
        for i, timestep in enumerate(self.scheduler.timesteps):
            t = self.scheduler.sigmas[i].to(x.device).expand(x.shape[0])
            v = self.velocity(x, t, labels)
            x = self.scheduler.step(v, timestep, x).prev_sample
        return ReflowPipelineOutput(samples=x)
