"""The velocity model: a backbone net plus everything that makes it a flow's velocity (EDM's `EDMPrecond` pattern).

    VelocityModel(backbone, num_classes, amp=...)(x, t, label=None) -> v   (float32, x's shape)

Time convention: t = 0 data, t = 1 noise, x_t = (1 - t) x_data + t x_noise, v = x_noise - x_data; generation
integrates 1 -> 0. The backbones (`nets.MLP`, `nets.UNet`) are plain networks `backbone(x, t, label)`; this module
owns what used to be spread over the pipeline, the solvers and accel:

* the classifier-free-guidance null label (row `num_classes` of a class-conditional backbone's label embedding) and
  label handling (`label=None` on a class-conditional model means "no label": the null row for every sample);
* bf16 autocast of the backbone call (`amp=True`), with the output, and so the ODE state, kept in float32;
* CFG label dropout for training (`drop_labels`);
* the solver's `(x, t) -> v` view with labels bound and optional guidance (`solver_velocity`), and its cost in
  network evaluations (`evaluations_per_call`);
* generation with an NFE budget counted in *network* evaluations (`generate`), measured by counting backbone calls.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from . import accel, solvers
from .config import ConfigError, NetConfig

__all__ = ["VelocityModel", "GUIDANCE", "build_velocity_model", "velocity_model_from_state", "generate", "velocity_for"]

GUIDANCE = ("none", "cfg", "autoguidance")


def _check_guidance(guidance: str) -> None:
    if guidance not in GUIDANCE:
        raise ValueError(f"unknown guidance {guidance!r}; choose one of {GUIDANCE}")


class VelocityModel(nn.Module):
    """v(x, t, label) of a backbone: labels, the CFG null label and bf16 autocast live here, not in the backbone.

    num_classes: 0 for an unconditional backbone (labels are ignored); else the backbone has num_classes + 1 label
        rows and row `num_classes` (= `null_label`) is "no label". `label=None` maps to it.
    amp: run the backbone under bf16 autocast on the input's device type. The output is always float32, so the
        solvers keep the ODE state x in float32: an Euler/Heun update is x + h v with |h| ~ 1/NFE, and bf16's 8-bit
        mantissa (relative spacing 2^-8 ~ 0.004) would round away or badly quantise an increment h v of a few 1e-3
        on x ~ N(0, 1) at every step, compounding over the NFE steps. The expensive part (convolutions, attention)
        runs in bf16; the elementwise update costs nothing in fp32. The autocast weight cache is off, so the call is
        safe inside a CUDA-graph capture. With amp=False no autocast context is entered at all, so an outer one
        (the training loop's `TrainConfig.amp`) still applies.

    The state_dict is the backbone's under the prefix `backbone.`; a bare backbone state dict (checkpoints written
    before this class existed) also loads, its keys being prefixed on the way in.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 0, *, amp: bool = False):
        super().__init__()
        num_classes = int(num_classes)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        own = getattr(backbone, "num_classes", None)
        if isinstance(own, int) and own != num_classes:
            raise ValueError(f"the backbone was built for num_classes={own} but VelocityModel got "
                             f"num_classes={num_classes}; build both from the same NetConfig and data set")
        self.backbone = backbone
        self.num_classes = num_classes
        self.class_cond = num_classes > 0
        self.null_label: int | None = num_classes if self.class_cond else None
        self.amp = bool(amp)
        # image condition channels of the backbone (0: none); CFG's null condition is zeros
        self.cond_channels = int(getattr(backbone, "cond_channels", 0) or 0)
        self._register_load_state_dict_pre_hook(_prefix_bare_backbone_keys)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, amp={self.amp}"

    def with_backbone(self, backbone: nn.Module) -> "VelocityModel":
        """The same parametrisation around another callable backbone (a compiled or instrumented view of this one's;
        its parameters are not copied). E.g. `model.with_backbone(accel.prepare_model(model.backbone, compile=True))`
        to call a compiled net while checkpoints keep being written from `model`."""
        m = VelocityModel.__new__(VelocityModel)
        nn.Module.__init__(m)
        m.backbone = backbone
        m.num_classes, m.class_cond, m.null_label, m.amp = self.num_classes, self.class_cond, self.null_label, self.amp
        m.cond_channels = self.cond_channels
        m._register_load_state_dict_pre_hook(_prefix_bare_backbone_keys)
        m.training = self.training  # not m.train(): that would also switch the (shared) backbone's mode
        return m

    # --- labels ---------------------------------------------------------------------------------------------------

    def labels(self, label: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """The labels the backbone gets: None for an unconditional model; else a long tensor (B,) on x's device,
        the null label for every sample when `label` is None."""
        if not self.class_cond:
            return None
        if label is None:
            return torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return label.to(device=x.device, dtype=torch.long).reshape(x.shape[0])

    def drop_labels(self, label: torch.Tensor | None, p: float, generator: torch.Generator | None = None
                    ) -> torch.Tensor | None:
        """CFG training: replace each label by the null label with probability p (one uniform draw per label from
        `generator`). None passes through; p = 0 returns `label` itself and draws nothing (so the data stream of a
        run without label dropout is unchanged)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"label dropout p must be in [0, 1], got {p}")
        if label is None or p == 0:
            return label
        if not self.class_cond:
            raise ValueError("label dropout needs a class-conditional model (net.class_cond: true): an "
                             "unconditional one has no null label")
        gdev = generator.device if generator is not None else torch.device("cpu")
        drop = (torch.rand(label.shape[0], generator=generator, device=gdev) < p).to(label.device)
        return torch.where(drop, torch.full_like(label, self.num_classes), label)

    # --- the velocity ---------------------------------------------------------------------------------------------

    def check_cond(self, cond: torch.Tensor | None) -> None:
        """A condition is required by a conditional model and refused by one without condition channels."""
        if self.cond_channels > 0 and cond is None:
            raise ValueError(f"this model is conditioned on an image ({self.cond_channels} channels): pass cond "
                             "(B, C_cond, ...) (for super-resolution c = A^T y, reflow_core.sr)")
        if self.cond_channels == 0 and cond is not None:
            raise ValueError("this model has no condition channels (net.cond_channels: 0) but got a condition")

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, label: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        lab = self.labels(label, x)
        self.check_cond(cond)
        ctx = accel.autocast(x.device, True, cache_enabled=False) if self.amp else contextlib.nullcontext()
        with ctx:
            out = self.backbone(x, t, lab) if cond is None else self.backbone(x, t, lab, cond)
        return out.float()

    @staticmethod
    def evaluations_per_call(guidance: str = "none") -> int:
        """Network evaluations of one solver velocity: 2 when guided (the model and its guide), else 1."""
        _check_guidance(guidance)
        return 1 if guidance == "none" else 2

    def solver_velocity(self, label: torch.Tensor | None = None, *, guidance: str = "none", weight: float = 1.0,
                        guide: "VelocityModel | None" = None, cond: torch.Tensor | None = None) -> solvers.Velocity:
        """The `(x, t) -> v` the solvers integrate, with `label` bound (read at every call, so a caller may refill
        the same tensor in place between calls: CUDA-graph static buffers).

        guidance "none": v = model(x, t, label).
        "cfg": v = v_null + w (v_cond - v_null), v_null the same model with the null label (needs a class-conditional
            model and labels).
        "autoguidance": v = v_guide + w (v_cond - v_guide), v_guide the weaker `guide` model with the same labels.
        `cond` (an image condition) is bound like `label`; CFG's null condition is zeros.
        A guided velocity calls two networks (see `evaluations_per_call`). w = 1 is exactly v_cond, w = 0 exactly the
        guide's velocity (`solvers.guided` interpolates with torch.lerp, exact at both ends).
        """
        _check_guidance(guidance)
        self.check_cond(cond)
        if guidance != "none" and guide is not None and guidance != "autoguidance":
            raise ValueError(f"a guide model is only used by guidance='autoguidance', got guidance={guidance!r}")

        c = cond

        def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self(x, t, label, c)
        if guidance == "none":
            return conditional
        if guidance == "cfg":
            if not ((self.class_cond and label is not None) or c is not None):
                raise ConfigError("eval.guidance='cfg' needs a class-conditional net (net.class_cond: true) and "
                                  "labels to guide towards, or an image condition")

            def null(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self(x, t, None, None if c is None else torch.zeros_like(c))
            return solvers.guided(conditional, null, weight)
        if guide is None:
            raise ConfigError("eval.guidance='autoguidance' needs a guide model (eval.guide_checkpoint)")

        def weak(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guide(x, t, label, c)
        return solvers.guided(conditional, weak, weight)


def _prefix_bare_backbone_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                               error_msgs) -> None:
    """load_state_dict pre-hook: a bare backbone state dict (no `backbone.` keys) gets the prefix."""
    mine = [k for k in state_dict if k.startswith(prefix)]
    if mine and not any(k.startswith(prefix + "backbone.") for k in mine):
        for k in mine:
            state_dict[prefix + "backbone." + k[len(prefix):]] = state_dict.pop(k)


# --- construction ---------------------------------------------------------------------------------------------------

def build_velocity_model(cfg: NetConfig, data_shape: tuple[int, ...], num_classes: int = 0, amp: bool = False
                         ) -> VelocityModel:
    """`nets.build_net(cfg, data_shape, num_classes)` wrapped as a VelocityModel; num_classes counts only when
    cfg.class_cond (as in build_net), so the data set's class count can always be passed."""
    from .nets import build_net
    backbone = build_net(cfg, data_shape, num_classes)
    return VelocityModel(backbone, int(num_classes) if cfg.class_cond else 0, amp=amp)


def velocity_model_from_state(state: dict, *, ema: bool = True, device: str | torch.device = "cpu",
                              amp: bool = False) -> VelocityModel:
    """A VelocityModel from a loaded checkpoint dict alone, in eval mode: `state["meta"]` holds the net config
    ("net"), the per-sample data shape ("shape") and the data set's class count ("num_classes"); the weights are
    `state["ema"]` (or `state["net"]`). Both VelocityModel state dicts (`backbone.` keys) and older bare backbone
    state dicts load."""
    meta = state["meta"]
    if meta["net"].get("kind") == "diffusion_vp":  # a pretrained diffusion model adapted to our convention
        from .teachers import build_from_meta
        model = VelocityModel(build_from_meta(meta["net"]), meta.get("num_classes", 0), amp=amp)
    else:
        model = build_velocity_model(NetConfig.model_validate(meta["net"]), tuple(meta["shape"]),
                                     meta.get("num_classes", 0), amp=amp)
    model.load_state_dict(state["ema" if ema else "net"])
    return model.to(device).eval()


# --- sampling -------------------------------------------------------------------------------------------------------

class _CountingNet(nn.Module):
    """A backbone that counts its forward calls (one per batch evaluation): measured NFE, not assumed."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t, label=None, cond=None):
        self.calls += 1
        return self.net(x, t, label) if cond is None else self.net(x, t, label, cond)


def _counting(model: VelocityModel) -> tuple[VelocityModel, _CountingNet]:
    counter = _CountingNet(model.backbone)
    return model.with_backbone(counter), counter


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def generate(model: VelocityModel, noise: torch.Tensor, nfe: int, solver: str = "euler", grid: str = "uniform",
             rho: float = 1.0, label: torch.Tensor | None = None, batch_size: int = 1000,
             device: str | torch.device | None = None, *, times: list[float] | None = None, guidance: str = "none",
             weight: float = 1.0, guide: VelocityModel | None = None, return_nfe: bool = False,
             cond: torch.Tensor | None = None):
    """Samples (on the CPU) from `noise`, integrating t = 1 -> 0 with `nfe` *network* evaluations per sample.

    Guided (cfg / autoguidance), every velocity costs 2 network evaluations, so the solver gets nfe / 2 velocity
    evaluations; a budget that cannot be spent exactly (guided: odd nfe; heun: an even number of velocities) is a
    ValueError. `label` (n,) and `cond` (n, C_cond, ...) are sliced with the noise. device: where to integrate (default: the model's device).
    return_nfe=True also returns the network evaluations counted on the first batch, by counting the backbones'
    forward calls (a check of the accounting, not a formula)."""
    if not isinstance(model, VelocityModel):
        raise TypeError(f"generate needs a VelocityModel, got {type(model).__name__} (wrap a backbone with "
                        f"VelocityModel(backbone, num_classes))")
    _check_guidance(guidance)
    dev = torch.device(device) if device is not None else _model_device(model)
    guided = guidance != "none"
    n_solver = solvers.solver_nfe_for_budget(solver, nfe, guided)
    if n_solver is None:
        raise ValueError(f"{nfe} NFE cannot be spent exactly by {solver}"
                         f"{' with guidance (2 NFE a velocity)' if guided else ''}")
    out, counted = [], None
    for i in range(0, noise.shape[0], batch_size):
        lab = None if label is None else label[i:i + batch_size].to(dev)
        cnd = None if cond is None else cond[i:i + batch_size].to(dev, torch.float32)
        if counted is None:
            m, c = _counting(model)
            g, gc = _counting(guide) if guide is not None else (None, None)
        else:
            m, g = model, guide
        v = m.solver_velocity(lab, guidance=guidance, weight=weight, guide=g, cond=cnd)
        x = solvers.sample(v, noise[i:i + batch_size].to(dev, torch.float32), n_solver, solver, grid, rho, times)
        if counted is None:
            counted = c.calls + (gc.calls if gc is not None else 0)
        out.append(x.cpu())
    x = torch.cat(out) if out else noise.new_zeros(noise.shape)
    return (x, counted) if return_nfe else x


def velocity_for(model: VelocityModel, *, guidance: str = "none", weight: float = 1.0,
                 guide: VelocityModel | None = None, cuda_graph: bool = False, warmup_iters: int = 2,
                 max_graphs: int = 8) -> Callable[..., solvers.Velocity]:
    """`(label, cond=None) -> (x, t) -> v` for loops whose labels (and image conditions) change from batch to batch
    (pair simulation).

    Plain: `model.solver_velocity(label, ..., cond=cond)`. cuda_graph=True (on CUDA; elsewhere plain): one
    `accel.GraphedVelocity` per (batch shape, label shape, cond shape) key, each over `solver_velocity(buffers)` with
    its own static label and cond buffers; a returned velocity copies its labels and cond into them before every
    replay, so velocities of different batches never see each other's inputs. Beyond max_graphs keys it runs eager."""
    _check_guidance(guidance)
    graphs: dict = {}

    def make(label: torch.Tensor | None, cond: torch.Tensor | None = None) -> solvers.Velocity:
        def eager() -> solvers.Velocity:
            return model.solver_velocity(label, guidance=guidance, weight=weight, guide=guide, cond=cond)
        if not cuda_graph:
            return eager()

        def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not accel.cuda_graphs_available(x.device):
                return eager()(x, t)
            key = (tuple(x.shape), x.dtype, None if label is None else tuple(label.shape),
                   None if cond is None else tuple(cond.shape))
            entry = graphs.get(key)
            if entry is None:
                if len(graphs) >= max_graphs:
                    return eager()(x, t)
                buf = None if label is None else label.to(x.device).clone()
                cbuf = None if cond is None else cond.to(x.device).clone()
                gv = accel.GraphedVelocity(model.solver_velocity(buf, guidance=guidance, weight=weight, guide=guide,
                                                                 cond=cbuf), warmup_iters=warmup_iters, max_graphs=1)
                entry = graphs[key] = (buf, cbuf, gv)
            buf, cbuf, gv = entry
            if buf is not None:
                buf.copy_(label)
            if cbuf is not None:
                cbuf.copy_(cond)
            return gv(x, t)
        return v
    return make
