"""Speed knobs in one place: channels_last, torch.compile (with an eager fallback), bf16 autocast, CUDA graphs for
fixed-shape sampling, and a batch-size probe. Every knob is off by default and every CUDA path is guarded, so the
same code runs (and is tested) on a CPU.

Numerics of bf16 sampling: only the *velocity* is computed under bf16 autocast (convs/matmuls on tensor cores);
the ODE state x is kept and accumulated in float32 (see `reflow_core.velocity.VelocityModel`, amp=True).
The CUDA-graph helpers take the solvers' one velocity signature `(x, t) -> v`; labels are bound by the caller
(`VelocityModel.solver_velocity(label)`, with `label` a static buffer refilled in place between calls).
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Callable, Sequence

import torch
from torch import nn

from . import solvers

log = logging.getLogger(__name__)

COMPILE_MODES = ("max-autotune-no-cudagraphs", "default", "reduce-overhead", "max-autotune")


class CompileFallbackWarning(RuntimeWarning):
    """torch.compile was asked for but is unavailable or failed; the eager module is used instead."""


def _is_image_net(net: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in net.modules())


def _probe(module: nn.Module, example: Sequence, backward: bool) -> None:
    """One call (optionally forward + backward) with the RNG forked, so a probe never shifts the training stream."""
    devices = [example[0].device.index or 0] if example and example[0].is_cuda else []
    with torch.random.fork_rng(devices=devices):
        if backward:
            out = module(*example)
            out.float().sum().backward()
            for p in module.parameters():
                p.grad = None
        else:
            with torch.no_grad():
                module(*example)


def prepare_model(net: nn.Module, *, channels_last: bool = False, compile: bool = False,
                  mode: str = "max-autotune-no-cudagraphs", example: Sequence | None = None,
                  probe_backward: bool = False, dynamic: bool | None = False,
                  backend: str | None = None) -> nn.Module:
    """Return the module to *call* (the forward pass); `net` itself keeps its parameters and its state_dict keys.

    channels_last: converts conv weights to NHWC (in place on `net`) when the net has 2-D convolutions (4-D image
        nets); ignored for MLPs. Inputs are converted by the caller or by the conv itself (PyTorch propagates it).
    compile: torch.compile(net, mode=mode). The default mode autotunes Triton kernels but leaves CUDA graphs to us
        (`GraphedVelocity`): inductor's own graphs ("reduce-overhead") cannot live inside an outer capture.
        With `example` (a tuple of call arguments) the compiled module is probed once (forward, or forward +
        backward when probe_backward); any failure there, or torch.compile missing, logs a
        CompileFallbackWarning and returns the eager module. Without `example` compilation is lazy (first call).

    backend: torch.compile's backend, default $REFLOW_COMPILE_BACKEND or "inductor" ("aot_eager" traces the same
        graphs without generating kernels: the tests use it to check the wrapping cheaply on a CPU).

    Checkpoints must be written from `net`, never from the returned module: a compiled module's state_dict keys
    carry an `_orig_mod.` prefix.
    """
    if channels_last and _is_image_net(net):
        net = net.to(memory_format=torch.channels_last)
    if not compile:
        return net
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES}")
    if not hasattr(torch, "compile"):
        warnings.warn("torch.compile is unavailable in this torch build; running eager", CompileFallbackWarning,
                      stacklevel=2)
        return net
    try:
        backend = backend or os.environ.get("REFLOW_COMPILE_BACKEND", "inductor")
        kw = {"mode": mode} if backend == "inductor" else {}
        compiled = torch.compile(net, backend=backend, dynamic=dynamic, **kw)
        if example is not None:
            _probe(compiled, example, probe_backward)
        return compiled
    except Exception as e:  # inductor missing a compiler, an unsupported op, ...: eager still gives right answers
        msg = f"torch.compile(mode={mode!r}) failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); running eager"
        log.warning(msg)
        warnings.warn(msg, CompileFallbackWarning, stacklevel=2)
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        return net


def autocast(device: torch.device | str, enabled: bool = True, cache_enabled: bool = True):
    """bf16 autocast on `device` (cuda or cpu); a no-op context when disabled. Use cache_enabled=False for code
    that is captured into a CUDA graph (autocast's weight-cast cache must not outlive the capture)."""
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache_enabled)


# --- CUDA graphs -----------------------------------------------------------------------------------------------------

def cuda_graphs_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and hasattr(torch.cuda, "CUDAGraph")


def warmup(fn: Callable[[], object], iters: int = 3) -> None:
    """Warm-up on a side stream, as torch.cuda.graphs requires (compilation, cuDNN autotuning, allocator)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(iters):
            fn()
    torch.cuda.current_stream().wait_stream(s)


class GraphedVelocity:
    """A velocity `fn(x, t) -> v` replayed from a CUDA graph per input shape (one graph per (shape, dtype) key).

    Each evaluation copies x and t into static buffers and replays. Labels are bound inside `fn`
    (`reflow_core.velocity.velocity_for(model, cuda_graph=True)` does the bookkeeping for loops
    whose labels change per batch, such as the pair simulation). Off CUDA it is `fn` itself. The returned tensor
    is cloned from the graph's static output (which the next replay overwrites)."""

    def __init__(self, fn: solvers.Velocity, warmup_iters: int = 2, max_graphs: int = 8):
        self.fn, self.warmup_iters, self.max_graphs = fn, warmup_iters, max_graphs
        self._graphs: dict = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not cuda_graphs_available(x.device):
            return self.fn(x, t)
        key = (tuple(x.shape), x.dtype)
        g = self._graphs.get(key)
        if g is None:
            if len(self._graphs) >= self.max_graphs:
                return self.fn(x, t)
            sx, st = x.clone(), t.clone()
            warmup(lambda: self.fn(sx, st), self.warmup_iters)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(sx, st)
            g = self._graphs[key] = (graph, sx, st, out)
        graph, sx, st, out = g
        sx.copy_(x)
        st.copy_(t)
        graph.replay()
        return out.clone()


# --- batch size ------------------------------------------------------------------------------------------------------

def largest_fitting(fn: Callable[[int], object], start: int, limit: int,
                    cleanup: Callable[[], None] = lambda: None) -> int | None:
    """Largest b in {start, 2 start, 4 start, ...} <= limit for which fn(b) returns without a CUDA OOM (None when
    even `start` does not fit). The search itself, device-free; `find_max_batch` runs it on a GPU."""
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    best, b = None, start
    while b <= limit:
        try:
            fn(b)
            best = b
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            cleanup()
        b *= 2
    return best


def find_max_batch(fn: Callable[[int], object], start: int, limit: int, device: torch.device | str | None = None) -> int:
    """Largest batch in {start, 2 start, 4 start, ...} <= limit for which fn(batch) runs without CUDA OOM.

    On a CPU (or when CUDA is unavailable) nothing is probed and `start` (the configured value) is returned.
    Raises if even `start` does not fit."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return start

    def run(b: int) -> None:
        fn(b)
        torch.cuda.synchronize(dev)
    best = largest_fitting(run, start, limit, cleanup=torch.cuda.empty_cache)
    if best is None:
        raise RuntimeError(f"find_max_batch: even batch {start} does not fit in GPU memory")
    return best
