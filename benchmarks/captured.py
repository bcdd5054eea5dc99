"""The GPU benchmark's whole-loop sampler: fixed-step generation of one batch shape replayed from one CUDA graph (or
one graph per evaluation). The pipeline itself graphs per velocity evaluation (`accel.GraphedVelocity`); this is the
upper bound benchmarks/gpu.py compares it with, tested for CPU equality in tests/core/test_accel.py."""
from __future__ import annotations

from typing import Sequence

import torch

from reflow_core import solvers
from reflow_core.accel import GraphedVelocity, cuda_graphs_available, warmup


class CapturedSampler:
    """Fixed-step Euler/Heun generation (t = 1 -> 0) of a velocity `(x, t) -> v` for one batch shape, replayed from
    a CUDA graph.

    On CUDA (and graph=True) the whole NFE loop is captured once into a single graph (`per_step=False`) or one
    graph per velocity evaluation (`per_step=True`, less memory for the captured activations); a call copies the
    noise into a static buffer and replays. Anywhere else it is exactly `solvers.integrate` with the same velocity,
    so CPU results are bit-identical to the plain sampler.

    Labels, bf16 and guidance belong to the velocity: build it with `VelocityModel(..., amp=True).solver_velocity(lab)`
    where `lab` is a tensor the caller keeps and refills in place (`lab.copy_(labels)`) before each call; the
    captured graph reads that memory.
    """

    def __init__(self, velocity: solvers.Velocity, shape: Sequence[int], nfe: int, solver: str = "euler",
                 grid: str = "uniform", rho: float = 1.0, *, device: torch.device | str = "cpu", graph: bool = True,
                 per_step: bool = False, warmup_iters: int = 2):
        self.velocity, self.shape, self.nfe, self.solver = velocity, tuple(int(s) for s in shape), nfe, solver
        self.grid = solvers.time_grid(solvers.steps_for_nfe(solver, nfe), grid, rho)
        self.device, self.per_step = torch.device(device), per_step
        self.use_graph = graph and cuda_graphs_available(self.device)
        self.warmup_iters = warmup_iters
        self._graph: torch.cuda.CUDAGraph | None = None
        self.captured = False

    def _capture(self) -> None:
        self._x = torch.randn(self.shape, device=self.device)
        v = self.velocity
        if self.per_step:
            # one graph for one evaluation; the solver loop stays in Python and calls the graphed velocity
            self._gv = GraphedVelocity(v, warmup_iters=self.warmup_iters)
            self.captured = True
            return
        warmup(lambda: solvers.integrate(v, self._x, self.grid, self.solver), self.warmup_iters)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = solvers.integrate(v, self._x, self.grid, self.solver)
        self.captured = True

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor) -> torch.Tensor:
        if tuple(noise.shape) != self.shape:
            raise ValueError(f"CapturedSampler was built for shape {self.shape}, got {tuple(noise.shape)}")
        if not self.use_graph:
            return solvers.integrate(self.velocity, noise.to(self.device, torch.float32), self.grid, self.solver)
        if not self.captured:
            self._capture()
        self._x.copy_(noise)
        if self.per_step:
            return solvers.integrate(self._gv, self._x, self.grid, self.solver)
        self._graph.replay()
        return self._out.clone()
