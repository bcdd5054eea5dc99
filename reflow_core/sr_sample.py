"""Super-resolving given low-res images with an SR run's model (`reflow sample --cond`): the input check, the knob or
NFE each model takes, the condition and source, and the teacher's ODE or OFTSR's one-call student output.

The low-res images are the measurement y (N, C, H / scale, W / scale), taken as given (no measurement noise added).
The run's degradation gives the condition c = A^T y (`sr.lift`) and the source (our t = 1 end)
x_src = sqrt(1 - sigma_p^2) c + sigma_p eps (`sr.source`), eps ~ N(0, I) of the outputs' shape from
torch.Generator().manual_seed(seed): the noise `reflow sample --seed` draws for an unconditional model. A flow model
(the teacher) integrates its ODE from x_src with `nfe` Euler steps (`velocity.generate`); OFTSR's student (the model
`distilled` of an SR run, distill.method oftsr) is one network call at the knob tau (`oftsr.student_output`): tau = 0
the fidelity end (the posterior mean), tau = 1 the realism end (the teacher's ODE endpoint). Outputs are clamped to
[-1, 1]. Pure torch: the CLI (flows/cli.py) reads the files and the run.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .config import SRConfig
from .oftsr import student_from_velocity, student_output
from .sr import lift, source
from .velocity import VelocityModel, generate

__all__ = ["STUDENT", "DEFAULT_KNOB", "DEFAULT_NFE", "check_lowres", "setting", "condition", "sources",
           "knob_output", "super_resolve"]

STUDENT = "distilled"  # the model name of OFTSR's knob student (distill.method oftsr)
DEFAULT_KNOB = 0.5  # the student's default: halfway between the fidelity (0) and realism (1) ends
DEFAULT_NFE = 32  # a flow model's default when the run names no eval NFE


def _sr(sr: SRConfig | Mapping) -> SRConfig:
    """The SR settings: a config, or its dump (a checkpoint's meta["sr"])."""
    return sr if isinstance(sr, SRConfig) else SRConfig.model_validate(dict(sr))


def check_lowres(lowres: torch.Tensor, shape: Sequence[int], sr: SRConfig | Mapping) -> None:
    """Refuse (one-line ValueError) low-res images that are not float (N, C, H / scale, W / scale) for high-res images
    of per-sample `shape` (C, H, W), N >= 1, or that hold NaN or inf (values outside [-1, 1] are allowed)."""
    scale = _sr(sr).scale
    c, h, w = (int(s) for s in shape)
    want = f"(N, {c}, {h // scale}, {w // scale})"
    got = tuple(lowres.shape)
    if lowres.ndim != 4:
        raise ValueError(f"low-res images must be 4-D {want}, got shape {got}")
    if not torch.is_floating_point(lowres):
        dtype = str(lowres.dtype).removeprefix("torch.")
        raise ValueError(f"low-res images must be float (float32 in [-1, 1]), got {dtype}")
    if got[1:] != (c, h // scale, w // scale):
        raise ValueError(f"low-res images must have shape {want} (image size {h}x{w} / scale {scale}), got {got}")
    if got[0] < 1:
        raise ValueError(f"no low-res images: shape {got}")
    if not bool(torch.isfinite(lowres).all()):
        raise ValueError(f"low-res images hold {int((~torch.isfinite(lowres)).sum())} NaN or infinite values")


def setting(model: str, *, knob: float | None = None, nfe: int | None = None,
            eval_nfes: Sequence[int] = ()) -> tuple[float | None, int | None]:
    """(knob, nfe) of a model of an SR run: the student (`STUDENT`) takes a knob in [0, 1] (default `DEFAULT_KNOB`)
    and no NFE; every other model an NFE >= 1 (default the last of `eval_nfes`, else `DEFAULT_NFE`) and no knob."""
    if model == STUDENT:
        if nfe is not None:
            raise ValueError(f"nfe is for a flow model (teacher): {STUDENT!r} is OFTSR's one-call student, give it a "
                             f"knob in [0, 1] instead")
        knob = DEFAULT_KNOB if knob is None else float(knob)
        if not 0.0 <= knob <= 1.0:
            raise ValueError(f"knob must lie in [0, 1] (0 fidelity, 1 realism), got {knob:g}")
        return knob, None
    if knob is not None:
        raise ValueError(f"knob is for OFTSR's student (model {STUDENT!r}); {model!r} is a flow model, give it an "
                         f"nfe instead")
    nfe = (int(eval_nfes[-1]) if len(eval_nfes) else DEFAULT_NFE) if nfe is None else int(nfe)
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return None, nfe


def condition(lowres: torch.Tensor, sr: SRConfig | Mapping) -> torch.Tensor:
    """c = A^T y: the low-res images brought to the high-res size by the run's degradation's lift (float32)."""
    s = _sr(sr)
    return lift(lowres.to(torch.float32), s.scale, s.degradation)


def sources(c: torch.Tensor, sr: SRConfig | Mapping, seed: int) -> torch.Tensor:
    """x_src = sqrt(1 - sigma_p^2) c + sigma_p eps, eps drawn on the CPU from torch.Generator().manual_seed(seed)."""
    eps = torch.randn(tuple(c.shape), generator=torch.Generator().manual_seed(int(seed)))
    return source(c, eps.to(c.device, c.dtype), _sr(sr).sigma_p)


@torch.no_grad()
def knob_output(model: VelocityModel, x_src: torch.Tensor, c: torch.Tensor, knob: float,
                batch_size: int = 1000) -> torch.Tensor:
    """OFTSR's one-call output at `knob` for every source row (on the CPU)."""
    dev = next(model.parameters()).device
    student = student_from_velocity(lambda x, t, cond: model(x, t, None, cond))
    return torch.cat([student_output(student, x_src[i:i + batch_size].to(dev), c[i:i + batch_size].to(dev),
                                     knob).cpu() for i in range(0, x_src.shape[0], batch_size)])


@torch.no_grad()
def super_resolve(model: VelocityModel, lowres: torch.Tensor, sr: SRConfig | Mapping, *, knob: float | None = None,
                  nfe: int | None = None, seed: int = 0, solver: str = "euler",
                  batch_size: int = 1000) -> torch.Tensor:
    """High-res images (N, C, H, W) in [-1, 1] (on the CPU) from low-res images `lowres` (N, C, H / scale, W / scale).

    knob given: OFTSR's student output at the knob, one network call (`model` the student); else the flow `model`'s
    ODE from the source with `nfe` steps of `solver` (default `DEFAULT_NFE`). Both from the same source per seed."""
    if knob is not None and nfe is not None:
        raise ValueError("give a knob (OFTSR's student) or an nfe (a flow model), not both")
    if knob is not None and not 0.0 <= float(knob) <= 1.0:
        raise ValueError(f"knob must lie in [0, 1] (0 fidelity, 1 realism), got {float(knob):g}")
    if not model.cond_channels:
        raise ValueError("this model takes no image condition (net.cond_channels: 0): not a super-resolution model")
    s = _sr(sr)
    size = tuple(int(n) * s.scale for n in lowres.shape[-2:])  # (a wrong size is the caller's check_lowres's)
    check_lowres(lowres, (model.cond_channels, *size) if lowres.ndim == 4 else (model.cond_channels, 0, 0), s)
    c = condition(lowres.cpu(), s)
    x_src = sources(c, s, seed)
    if knob is not None:
        out = knob_output(model, x_src, c, float(knob), batch_size)
    else:
        out = generate(model, x_src, DEFAULT_NFE if nfe is None else int(nfe), solver, cond=c, batch_size=batch_size)
    return out.clamp(-1, 1)
