"""One training loop for the teacher (1-rectified flow) and the reflow fine-tune.

`train()` is a function with keyword arguments (EDM's training_loop style): the CLI, the Prefect task and the tests
call the same thing. Resume is by construction: rerunning with the same checkpoint directory continues from the
latest checkpoint (model, EMA, optimizer, step, torch RNG). Batches are drawn by `batches(step)`, a function of the
step alone, so the data stream after a resume is the one an uninterrupted run would have seen.
"""
from __future__ import annotations

import copy
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import accel, checkpoint, cores, distributed, storage
from .callbacks import Callback, NullCallback
from .config import TrainConfig
from .losses import HighPass, huber_c, mse, normalise, pseudo_huber
from .paths import path_sample, sample_time
from .rng import time_seed


@dataclass
class Batch:
    x_data: torch.Tensor
    x_noise: torch.Tensor
    label: torch.Tensor | None = None
    cond: torch.Tensor | None = None  # an image condition (super-resolution: c = A^T y), concatenated to x by the net


class NonFiniteLossError(RuntimeError):
    pass


def flow_matching_loss(net: nn.Module, batch: Batch, cfg: TrainConfig, generator: torch.Generator,
                       hpf: HighPass | None = None) -> torch.Tensor:
    """Per-sample loss of v_theta(x_t, t) against v = x_noise - x_data, with Simple ReFlow's switches (#1-#3).

    `net(x, t, label)`: a `velocity.VelocityModel` (or a compiled / DDP wrapper of one), which maps label=None or
    dropped labels to the CFG null label itself; labels are dropped by the caller (`VelocityModel.drop_labels`)."""
    n = batch.x_data.shape[0]
    t = sample_time(cfg.time_dist, n, generator, cfg.time_dist_param, device=batch.x_data.device)
    ps = path_sample(batch.x_data, batch.x_noise, t)
    out = net(ps.x_t, ps.t, batch.label) if batch.cond is None else net(ps.x_t, ps.t, batch.label, batch.cond)
    residual = out.float() - ps.v.float()
    if hpf is not None:
        residual = hpf(residual)
    if cfg.loss == "pseudo_huber":
        per = pseudo_huber(residual, huber_c(cfg.huber_scale, residual[0].numel()))
    else:
        per = mse(residual)
    return normalise(per) if cfg.loss_norm else per


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


class _EMA:
    """`ema_update` for the loop: the tensor lists are built once and updated with one `_foreach_lerp_` (the same
    per-tensor lerp, bit-identical) instead of walking both module trees and launching a lerp per tensor every step."""

    def __init__(self, ema: nn.Module, net: nn.Module):
        self.pe, self.p = list(ema.parameters()), [p.detach() for p in net.parameters()]
        self.be, self.b = list(ema.buffers()), list(net.buffers())

    @torch.no_grad()
    def __call__(self, decay: float) -> None:
        if self.pe:
            torch._foreach_lerp_(self.pe, self.p, 1.0 - decay)
        for be, b in zip(self.be, self.b):
            be.copy_(b)


# --- the loop ------------------------------------------------------------------------------------------------------

def _lr(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def _fault_requested(stage: str, step: int) -> bool:
    """Fault injection for the resume tests: REFLOW_FAULT_STAGE=<stage> REFLOW_FAULT_AT_STEP=<n> (after the step's
    checkpoint: an exception, or with REFLOW_FAULT_KILL=1 a SIGKILL of this process, as a preempted worker dies)."""
    return os.environ.get("REFLOW_FAULT_STAGE") == stage and os.environ.get("REFLOW_FAULT_AT_STEP") == str(step)


# loss(model, batch, step, generator) -> per-sample loss (B,); model is the forward module (DDP/compiled wrapper)
LossFn = Callable[[nn.Module, Batch, int, torch.Generator], torch.Tensor]


def train(*, net: nn.Module, batches: Callable[[int], Batch], cfg: TrainConfig, ckpt_dir: str, stage: str = "train",
          meta: dict | None = None, callback: Callback | None = None, device: torch.device | str = "cpu",
          ema_init: nn.Module | None = None, loss_fn: LossFn | None = None) -> str:
    """Train `net` for cfg.steps steps (resuming from ckpt_dir if it holds a checkpoint); returns the final checkpoint.

    batches(step) -> Batch on any device; meta (net config, data shape, ...) is stored in every checkpoint so a
    checkpoint is loadable on its own (nanoGPT's model_args). loss_fn(model, batch, step, generator) -> per-sample
    loss replaces the flow-matching loss (a distillation objective); it may depend on the step, never on wall time.
    """
    dinfo = distributed.init_from_env()  # torchrun with WORLD_SIZE > 1: DDP; otherwise a no-op
    cb = callback if (callback is not None and dinfo.is_main) else NullCallback()  # rank 0 reports
    device = distributed.device_for(dinfo, torch.device(device))
    net = net.to(device)
    ema = copy.deepcopy(ema_init if ema_init is not None else net).to(device).eval().requires_grad_(False)
    params = list(net.parameters())
    # foreach: one multi-tensor kernel per Adam op instead of a Python loop over tensors (the default off CUDA);
    # on CPU it computes the same per-element arithmetic (bit-identical, tests/core/test_train.py)
    opt = torch.optim.Adam(params, lr=cfg.lr, foreach=True)
    step, bad = 0, 0
    latest = checkpoint.latest(ckpt_dir)
    if latest is not None:
        state = checkpoint.load(latest)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        for g in opt.param_groups:  # load_state_dict restores the saved group options, foreach included
            g["foreach"] = True
        step, bad = state["step"], state.get("bad_steps", 0)
        checkpoint.set_rng_state(state["rng"])  # CPU and (when saved) CUDA generators
        if step >= cfg.steps:
            return latest
    else:  # dropout draws from the global generator: a fresh run starts it from the seed, a resumed one restores it
        torch.manual_seed(cfg.seed)
    cb.on_metrics(stage, step, {"resumed_from_step": float(step)})
    gen = torch.Generator().manual_seed(cfg.seed)
    hpf = HighPass(cfg.hpf) if cfg.hpf > 0 else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)

    def save_ckpt() -> str:
        # always from `net` (the plain module), never from the DDP/compiled wrapper: its keys load anywhere
        url = storage.join(ckpt_dir, f"ckpt-{step:07d}.pt")
        if dinfo.is_main:
            url = checkpoint.save(ckpt_dir, {"net": net.state_dict(), "ema": ema.state_dict(),
                                             "opt": opt.state_dict(), "step": step, "bad_steps": bad,
                                             "rng": checkpoint.rng_state(),
                                             "train_config": cfg.model_dump(mode="json"), "meta": meta or {}})
        distributed.barrier(dinfo)
        return url

    # The module the forward pass calls: channels_last / DDP / torch.compile wrappers around `net`, which keeps the
    # parameters (optimizer, EMA, clipping and checkpoints all use `net`). Built at the first step, probing the
    # compiled module on that step's shapes (falls back to eager with a warning when compilation fails).
    fwd: nn.Module | None = None

    def forward_module(b: Batch) -> nn.Module:
        base = distributed.wrap_ddp(accel.prepare_model(net, channels_last=cfg.channels_last), dinfo, device)
        if not cfg.compile:
            return base
        t = torch.full((b.x_data.shape[0],), 0.5, device=device)
        with amp:
            example = (b.x_data, t, b.label) if b.cond is None else (b.x_data, t, b.label, b.cond)
            return accel.prepare_model(base, compile=True, example=example, probe_backward=True)

    net.train()
    ema_step = _EMA(ema, net)
    t0, seen, url, work = time.perf_counter(), 0, latest, None
    # this process's share of the host's cores, re-checked at step boundaries (cores.py)
    with cores.Share(stage, cb) as share:
        while step < cfg.steps:
            key = distributed.batch_key(step, dinfo)  # = step in one process; distinct per (step, rank) under DDP
            gen.manual_seed(time_seed(cfg.seed, key))  # the step's time draws depend on (step, rank) alone
            b = batches(key)
            mf = torch.channels_last if (cfg.channels_last and b.x_data.dim() == 4) else torch.contiguous_format
            b = Batch(b.x_data.to(device, memory_format=mf), b.x_noise.to(device, memory_format=mf),
                      None if b.label is None else b.label.to(device),
                      None if b.cond is None else b.cond.to(device, memory_format=mf))
            if work is None:
                work = cores.step_work(sum(p.numel() for p in params), b.x_data.shape)
            share.tick(step, work)
            if fwd is None:
                fwd = forward_module(b)
            for g in opt.param_groups:
                g["lr"] = _lr(step, cfg)
            with amp:
                per = (flow_matching_loss(fwd, b, cfg, gen, hpf) if loss_fn is None else loss_fn(fwd, b, step, gen))
                loss = per.mean()
            opt.zero_grad(set_to_none=True)
            if not distributed.all_finite(loss, dinfo):
                bad += 1
                cb.on_metrics(stage, step, {"nonfinite_steps": float(bad)})
                if bad > cfg.max_bad_steps:
                    raise NonFiniteLossError(f"{stage}: {bad} non-finite losses (limit max_bad_steps="
                                             f"{cfg.max_bad_steps}) at step {step}; lower the learning rate or "
                                             f"check the data")
                step += 1
                continue
            loss.backward()
            log_step = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
            if cfg.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
            elif log_step:  # clipping off: the norm is only reported (scaling by 1.0 would change nothing)
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
            opt.step()
            # EMA with a short-run warm-up (decay grows toward cfg.ema_decay), so small runs get a useful average
            ema_step(min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            seen += b.x_data.shape[0]
            if log_step:
                dt = time.perf_counter() - t0
                cb.on_metrics(stage, step, {"loss": loss.item(), "lr": _lr(step - 1, cfg), "grad_norm": float(gnorm),
                                            "samples_per_s": seen / max(dt, 1e-9)})
                t0, seen = time.perf_counter(), 0
            cb.on_progress(stage, step, cfg.steps)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                url = save_ckpt()
            if _fault_requested(stage, step):
                save_ckpt()
                if os.environ.get("REFLOW_FAULT_KILL") == "1":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault in stage {stage!r} at step {step}")
    return url if url is not None else save_ckpt()
