"""The host-wide share of the cores among this project's torch processes: a registry of the live ones, and the
intra-op threads each process takes from it.

A process that trains or simulates pairs joins the registry (one file per process in a per-user runtime directory,
exclusively fcntl-locked by its process for as long as it lives, so a killed process's entry is found unlocked and
pruned by the next reader). At step boundaries, at most every RECHECK_SECONDS, it sets its torch threads to its
share, max(1, cores // live processes), never above what it would use alone: two runs started together on two cores
train with one thread each instead of two threads each spinning against the other's, and when one ends the survivor
goes back up. A run alone keeps its threads. REFLOW_THREADS, or OMP_NUM_THREADS in the environment (the user's, a
torchrun rank's or a Dask worker's, `host.worker_threads`), fixes the count instead (docs/performance.md, "Sharing").
"""
from __future__ import annotations

import atexit
import fcntl
import json
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .callbacks import Callback, NullCallback

log = logging.getLogger(__name__)

THREADS_ENV = "REFLOW_THREADS"  # n >= 1: every process of the project uses n intra-op threads, whatever else runs
MIN_WORK_ENV = "REFLOW_THREADS_MIN_WORK"  # the crossover below, when set in the environment
DIR_ENV = "REFLOW_CORES_DIR"  # the registry's directory (default: a per-user runtime directory)
RECHECK_SECONDS = 0.5
# A step whose work (`step_work`) is below this runs single-threaded: its ops are too small for a second thread to
# pay for its wake-ups. 0 = off, until benchmarks/sharing.py has measured the crossover on the target machines.
MIN_WORK = 0.0


def registry_dir() -> Path:
    """$REFLOW_CORES_DIR, else `reflow-cores` under $XDG_RUNTIME_DIR (per user), else /tmp/reflow-cores-<uid>."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.access(run, os.W_OK):
        return Path(run) / "reflow-cores"
    return Path(tempfile.gettempdir()) / f"reflow-cores-{os.getuid()}"


class Registry:
    """The project's live torch processes on this host: one locked file each in `path`. Imports no torch."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else registry_dir()
        self._fd: int | None = None
        self._name = ""
        self._lock = threading.Lock()

    def register(self) -> None:
        """Join (once per process; free when already joined). The file is locked before it gets its visible name,
        so no reader ever sees it unlocked while this process lives."""
        with self._lock:
            if self._fd is not None:
                return
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp = self.path / f".{name}"
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode())
            os.rename(tmp, self.path / name)
            self._fd, self._name = fd, name

    def unregister(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                os.unlink(self.path / self._name)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd, self._name = None, ""

    def forget(self) -> None:
        """In a forked child: drop the parent's entry without touching it (the lock stays the parent's)."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._name, self._lock = None, "", threading.Lock()

    @property
    def registered(self) -> bool:
        return self._fd is not None

    def live(self) -> int:
        """How many registered processes are alive (this one included when registered); a dead one's file is
        deleted on the way."""
        try:
            entries = [e for e in os.scandir(self.path) if not e.name.startswith(".")]
        except FileNotFoundError:
            return 0
        n = 0
        for e in entries:
            if e.name == self._name:
                n += 1
                continue
            try:
                fd = os.open(e.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                n += 1  # held: its process lives
            else:
                try:
                    os.unlink(e.path)  # its process is gone (a kill -9 leaves the file, never the lock)
                except FileNotFoundError:
                    pass
            finally:
                os.close(fd)
        return n


_registries: dict[Path, Registry] = {}
_registries_lock = threading.Lock()  # pair shards may start their loops in several threads at once


def registry() -> Registry:
    """This process's registry at `registry_dir()` (one object per directory, unregistered at exit)."""
    path = registry_dir()
    with _registries_lock:
        if path not in _registries:
            _registries[path] = Registry(path)
        return _registries[path]


@atexit.register
def _leave() -> None:
    for r in _registries.values():
        r.unregister()


def _forget_all() -> None:
    global _registries_lock
    _registries_lock = threading.Lock()
    for r in _registries.values():
        r.forget()


os.register_at_fork(after_in_child=_forget_all)


# --- the choice ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    threads: int
    reason: str
    live: int = 1


def fixed_threads(env=os.environ) -> int | None:
    """REFLOW_THREADS as a count, None when unset; a ValueError names a bad value."""
    text = env.get(THREADS_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{THREADS_ENV}={text!r}: expected a positive integer (threads per process)")
    return int(text)


def min_work(env=os.environ) -> float:
    return float(env.get(MIN_WORK_ENV) or MIN_WORK)


def choose(base: int, *, cores: int, live: int, work: float | None = None, env=os.environ) -> Choice:
    """The intra-op threads of a process that would use `base` alone, one of `live` registered processes on
    `cores` cores, running steps of `work` (None: unknown). Pure: the rule, with its reason."""
    fixed = fixed_threads(env)
    if fixed is not None:
        return Choice(fixed, f"{THREADS_ENV}={fixed}", live)
    if env.get("OMP_NUM_THREADS"):
        return Choice(base, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} set for this process", live)
    crossover = min_work(env)
    if work is not None and 0 < work < crossover:
        return Choice(1, f"a step's work {work:.3g} is below the crossover {crossover:.3g} ({MIN_WORK_ENV})", live)
    if live <= 1:
        return Choice(base, f"alone on {cores} cores", live)
    return Choice(min(base, max(1, cores // live)), f"{live} reflow processes share {cores} cores", live)


def step_work(n_params: int, x_shape) -> float:
    """A step's work as the crossover measures it: parameters x batch x positions (pixels; 1 for vectors), the
    multiply-adds of one forward of an MLP or a conv net at full resolution."""
    shape = tuple(x_shape)
    return float(n_params) * shape[0] * math.prod(shape[2:])


# --- applying it -----------------------------------------------------------------------------------------------------

class Share:
    """The calling thread's share of the cores during one loop (a training run, a pair shard). Made, it joins the
    process to the registry (for the process's lifetime); `tick(step)` at each step boundary applies `choose` again
    when RECHECK_SECONDS have passed (or the work changed) and reports a change through the callback (metrics
    `threads`, `threads_live`) and the `reflow_core.cores` logger; `close()` (or leaving it as a context) gives the
    thread back the count it had (torch's count is an OpenMP setting of the calling thread). A count the caller
    sets during the loop becomes the base the share lowers from."""

    def __init__(self, stage: str, callback: Callback | None = None, *, reg: Registry | None = None,
                 cores: int | None = None, every: float = RECHECK_SECONDS):
        from .host import available_cores

        self.stage, self.cb = stage, callback or NullCallback()
        self.reg = reg if reg is not None else registry()
        self.cores = cores if cores is not None else available_cores()
        self.every = every
        self._next, self._work, self._last = 0.0, None, None
        self.base, self.applied = 1, None
        self.choice: Choice | None = None
        self.reg.register()

    def close(self) -> None:
        import torch

        if self.applied is not None and torch.get_num_threads() == self.applied != self.base:
            torch.set_num_threads(self.base)
        self.applied = None

    def __enter__(self) -> Share:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tick(self, step: int, work: float | None = None) -> int:
        """Set this thread's torch threads to its share (every `every` seconds; free in between); returns them."""
        import torch

        now = torch.get_num_threads()
        if now == self.applied and work == self._work and time.monotonic() < self._next:
            return now
        if now != self.applied:  # the first tick, or the caller set its own count since
            self.base = now
        self._work, self._next = work, time.monotonic() + self.every
        c = self.choice = choose(self.base, cores=self.cores, live=self.reg.live(), work=work)
        if c.threads != now:
            torch.set_num_threads(c.threads)
        self.applied = c.threads
        if (c.threads, c.reason) != self._last:
            self._last = (c.threads, c.reason)
            log.info("%s: %d intra-op threads at step %d (%s)", self.stage, c.threads, step, c.reason)
            self.cb.on_metrics(self.stage, step, {"threads": float(c.threads), "threads_live": float(c.live)})
        return c.threads
