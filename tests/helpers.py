"""Helpers shared by test files (importable by name: pyproject's pytest `pythonpath`)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch

from reflow_core.solvers import Velocity


REPO = Path(__file__).resolve().parent.parent  # the repository root


class NFECounter:
    """Wraps a velocity function and counts evaluations (one per call, whatever the batch size)."""

    def __init__(self, fn: Velocity):
        self.fn, self.nfe = fn, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.fn(x, t)


def tiny(changes: dict | None = None) -> dict:
    """The `toy2d_tiny` preset as dotted overrides of `toy2d` (so a run keeps toy2d's name and registered model names),
    with `changes` on top: the one place the tests' tiny pipeline is written."""
    from flows.params import OVERRIDE_KEYS
    from reflow_core.preset import load_preset

    toy, small = load_preset("toy2d").model_dump(mode="json"), load_preset("toy2d_tiny").model_dump(mode="json")

    def leaf(d: dict, key: str):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    out = {k: leaf(small, k) for k in sorted(OVERRIDE_KEYS) if k != "name" and leaf(small, k) != leaf(toy, k)}
    return out | dict(changes or {})


def assert_same(a, b, where="state"):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def wait_for_line(proc: subprocess.Popen, wanted: str, *, exact: bool = False, timeout: float = 120) -> str:
    """The first line of a worker's stdout that starts with `wanted` (exact: that is `wanted`, stripped); an
    AssertionError with the worker's stderr if it exits first, or after `timeout` seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited before {wanted!r}: rc={proc.wait()} {proc.stderr.read()[-3000:]}")
        if (line.strip() == wanted) if exact else line.startswith(wanted):
            return line
    raise AssertionError(f"no {wanted!r} from the worker within {timeout}s")
