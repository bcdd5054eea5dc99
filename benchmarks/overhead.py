"""Our overhead against plain torch loops doing the same maths, measured side by side in one process.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/overhead.py --quick    # a few minutes on 2 cores
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/overhead.py            # longer runs, more repeats
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/overhead.py --smoke    # seconds: the code paths only (a test)

(i)   training, steps/s, on the toy2d MLP (2-D, hidden 256, depth 4, batch 512) and the digits U-Net (1x8x8,
      class-conditional, batch 64), both with their presets' TrainConfig (Adam, warm-up, grad clip, EMA):
      * ours, memory: `train.train` fed by the teacher stage's batches (data rows + fresh noise drawn per step);
      * ours, pairs: `train.train` fed by the reflow stage's `pair_batches` (a `PairSampler` over a PairStore);
      * plain: a minimal loop over the same in-memory tensors: one generator, randint/randn (or a per-epoch
        randperm of the pairs), x_t = (1 - t) x + t z, MSE to z - x, Adam, clip_grad_norm_, EMA by lerp_.
      Each is one whole call (ours includes its setup and the final checkpoint); the nets are built outside timing.
(ii)  pair simulation, pairs/s: `pairs.simulate_shard` (per-row seeded noise, zarr writer, done marker) vs a plain
      loop of the same velocity model, the same solver (Heun, EDM style) and NFE and batch, noise from one generator,
      .npy written at the end.
(iii) pipeline wall time: `reflow run --preset toy2d --local` vs `reflow run --preset toy2d` (its temporary Prefect
      API server + sqlite MLflow) as subprocesses, same config, one PREFECT_HOME for the benchmark: the size's
      small overrides, or with `--flow-config preset` the shipped toy2d preset as `make demo` runs it; after one
      untimed tiny run of each (the first flow on a machine creates Prefect's database). Each runner's runs share
      one root, whose MLflow store that run created, as a team's root does; `--flow-store new` gives every run a
      fresh root instead, so each flow run also creates its MLflow store's tables. `--flow-config tiny` runs the
      shipped toy2d_tiny preset (seconds of stages: the flow's fixed cost stands out). The flow's output lines are
      time-stamped into its log, and `flow_parts_s` gives, per flow run (medians): the command's start to the flow's
      first line (imports, the temporary API server, the flow run's creation), the plan to the teacher's first step,
      the evaluation's end to the publish task's (MLflow results, the model logged and registered), that to exit.
      `--flow-server running` points every flow run at one lasting `prefect server start` (started before, untimed,
      on the same PREFECT_HOME) as on a worker's host, instead of each `reflow run` starting its temporary server.

Ours and plain alternate (ours first on even repeats, plain first on odd ones) so drift hits both; every figure is a
median over repeats with the min and max. Ratios are ours / plain (higher is better; 1 = no overhead), for training
and simulation computed per net; the headline keys take the worse net. `flow_vs_local` = local wall / flow wall.
The last line is `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prefect_stack import PREFECT, free_port, stop, wait_healthy  # noqa: E402 (benchmarks/, beside this file)
from reflow_core import host, solvers  # noqa: E402
from reflow_core.preset import load_preset  # noqa: E402
from reflow_core.pairs import PairStore, simulate_shard, store_for_config  # noqa: E402
from reflow_core.stages.base import dataset, new_model  # noqa: E402
from reflow_core.stages.batches import pair_batches, teacher_batches  # noqa: E402
from reflow_core.train import train  # noqa: E402
from reflow_core.velocity import velocity_for  # noqa: E402

# name -> (preset, train steps, sim rows, sim batch, sim NFE) per size
SIZES = {
    "full": {"toy2d": (400, 5000, 5000, 63), "digits": (300, 2000, 1000, 31), "reps": 5},
    "quick": {"toy2d": (150, 2000, 1000, 31), "digits": (100, 1000, 500, 15), "reps": 3},
    "smoke": {"toy2d": (4, 64, 32, 3), "digits": (3, 32, 16, 3), "reps": 1},
}
# the pipeline run of part (iii): --set overrides per size
FLOW_SETS = {
    "full": ["teacher.train.steps=600", "reflow.train.steps=600", "pairs.n_pairs=10000", "pairs.nfe=31",
             "eval.n_samples=1000", "teacher.train.ckpt_every=300", "reflow.train.ckpt_every=300"],
    "quick": ["teacher.train.steps=200", "reflow.train.steps=200", "pairs.n_pairs=5000", "pairs.nfe=15",
              "eval.n_samples=500", "teacher.train.ckpt_every=100", "reflow.train.ckpt_every=100"],
    "smoke": ["teacher.train.steps=5", "reflow.train.steps=5", "pairs.n_pairs=200", "pairs.shard_size=100",
              "pairs.chunk_size=100", "pairs.batch_size=100", "pairs.nfe=3", "eval.n_samples=100", "eval.nfes=[1]",
              "eval.straightness_steps=4"],
}


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _ab(reps: int, ours, plain) -> dict:
    """ours() and plain() return a rate (higher is better); alternated ABBA... so drift affects both."""
    a, b = [], []
    for i in range(reps):
        if i % 2 == 0:
            a.append(ours())
            b.append(plain())
        else:
            b.append(plain())
            a.append(ours())
    ratios = [x / y for x, y in zip(a, b)]
    return {"ours": _stats(a), "plain": _stats(b), "ratio": statistics.median(a) / statistics.median(b),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "ours_all": a, "plain_all": b}


# --- (i) training ---------------------------------------------------------------------------------------------------

class _TrainCase:
    def __init__(self, preset: str, steps: int, tmp: str):
        self.cfg = load_preset(preset)
        self.ds = dataset(self.cfg)
        self.tc = self.cfg.teacher.train.model_copy(update={"steps": steps, "ckpt_every": steps})
        self.rc = self.cfg.reflow.train.model_copy(update={"steps": steps, "ckpt_every": steps})
        self.steps, self.tmp, self.runs, self.name = steps, tmp, 0, preset
        self.cond = self.cfg.net.class_cond
        self.model0 = new_model(self.cfg, self.ds, self.tc.seed)
        # a pair store like the reflow stage reads: sample rows = data rows, noise = N(0, I), labels
        pc = self.cfg.pairs
        n = pc.n_pairs
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(len(self.ds), (n,), generator=g)
        self.p_noise = torch.randn((n, *self.ds.shape), generator=g)
        self.p_sample = self.ds.x[idx].float().contiguous()
        self.p_label = self.ds.y[idx].long() if self.cond else None
        self.store = PairStore.create(os.path.join(tmp, f"{preset}-pairs.zarr"), shape=self.ds.shape, n_backward=n,
                                      n_forward=0, chunk_size=pc.chunk_size, shard_size=n, dtype="float32",
                                      attrs={"teacher_hash": "bench"})
        self.store.write_shard(0, self.p_noise, self.p_sample,
                               self.p_label if self.cond else torch.full((n,), -1, dtype=torch.long))

    def _model(self):
        return copy.deepcopy(self.model0).train()

    def _dir(self) -> str:
        self.runs += 1
        return os.path.join(self.tmp, f"ckpt-{self.name}-{self.runs}")

    def ours_mem(self, steps: int | None = None) -> float:
        tc, ds, model = self.tc, self.ds, self._model()
        if steps is not None:
            tc = tc.model_copy(update={"steps": steps, "ckpt_every": steps})
        batches = teacher_batches(ds, model, tc, self.cond)
        t0 = time.perf_counter()
        train(net=model, batches=batches, cfg=tc, ckpt_dir=self._dir(), stage="bench")
        return tc.steps / (time.perf_counter() - t0)

    def ours_pairs(self, steps: int | None = None) -> float:
        rc, model = self.rc, self._model()
        if steps is not None:
            rc = rc.model_copy(update={"steps": steps, "ckpt_every": steps})
        t0 = time.perf_counter()
        with pair_batches(self.store, model, rc, 0.0, self.cfg.reflow.ram_budget_mb) as (batches, mode):
            assert mode == "memory", mode
            train(net=model, batches=batches, cfg=rc, ckpt_dir=self._dir(), stage="bench")
        return rc.steps / (time.perf_counter() - t0)

    def plain(self, pairs: bool, steps: int | None = None) -> float:
        """The minimal loop: same net, Adam, warm-up, clip, EMA, flow-matching MSE, batch."""
        tc = self.rc if pairs else self.tc
        steps = steps or self.steps
        model = self._model()
        b = tc.batch_size
        t0 = time.perf_counter()
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
        g = torch.Generator().manual_seed(tc.seed)
        torch.manual_seed(tc.seed)
        if pairs:
            xs, zs, ys = self.p_sample, self.p_noise, self.p_label
            perm, pos = torch.randperm(len(xs), generator=g), 0
        else:
            xs, ys = self.ds.x, (self.ds.y if self.cond else None)
        params = list(model.parameters())
        for step in range(steps):
            if pairs:
                if pos + b > len(perm):
                    perm, pos = torch.randperm(len(xs), generator=g), 0
                idx = perm[pos:pos + b]
                pos += b
                x, z = xs[idx], zs[idx]
            else:
                idx = torch.randint(len(xs), (b,), generator=g)
                x, z = xs[idx], torch.randn((b, *xs.shape[1:]), generator=g)
            lab = None if ys is None else ys[idx]
            t = torch.rand(b, generator=g)
            tt = t.view(-1, *([1] * (x.dim() - 1)))
            xt = (1 - tt) * x + tt * z
            loss = (model(xt, t, lab) - (z - x)).pow(2).mean()
            for grp in opt.param_groups:
                grp["lr"] = tc.lr * min(1.0, (step + 1) / max(1, tc.warmup))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            d = min(tc.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), params):
                    pe.lerp_(p, 1 - d)
            if (step + 1) % tc.log_every == 0:
                loss.item()
        return steps / (time.perf_counter() - t0)


def bench_train(preset: str, steps: int, reps: int, tmp: str) -> dict:
    case = _TrainCase(preset, steps, tmp)
    case.ours_mem(3), case.ours_pairs(3), case.plain(False, 3), case.plain(True, 3)  # warm-up
    mem = _ab(reps, case.ours_mem, lambda: case.plain(False))
    prs = _ab(reps, case.ours_pairs, lambda: case.plain(True))
    return {"mem": mem, "pairs": prs, "steps": steps, "batch": case.tc.batch_size, "reflow_batch": case.rc.batch_size}


# --- (ii) pair simulation -------------------------------------------------------------------------------------------

def bench_sim(preset: str, rows: int, batch: int, nfe: int, reps: int, tmp: str) -> dict:
    cfg = load_preset(preset)
    ds = dataset(cfg)
    model = new_model(cfg, ds, 0).eval()
    ncls = ds.num_classes if cfg.net.class_cond else 0
    pc = cfg.pairs.model_copy(update={"n_pairs": rows, "shard_size": rows, "chunk_size": min(batch, rows),
                                      "batch_size": batch, "nfe": nfe, "n_forward": 0})
    grid = pc.grid.solver_args(nfe)
    times = solvers.time_grid(solvers.steps_for_nfe(pc.solver, nfe), grid["grid"], grid["rho"]).tolist()
    runs = [0]

    def ours() -> float:
        runs[0] += 1
        store = store_for_config(os.path.join(tmp, f"sim-{preset}-{runs[0]}.zarr"), pc, shape=ds.shape,
                                             teacher_hash="bench")
        t0 = time.perf_counter()
        simulate_shard(store, 0, velocity_for(model), cfg=pc, num_classes=ncls)
        dt = time.perf_counter() - t0
        shutil.rmtree(store.url.removeprefix("file://"), ignore_errors=True)
        return rows / dt

    def plain() -> float:
        runs[0] += 1
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(pc.seed)
        noises, samples, labels = [], [], []
        last = len(times) - 2
        with torch.no_grad():
            for b0 in range(0, rows, batch):
                n = min(batch, rows - b0)
                z = torch.randn((n, *ds.shape), generator=g)
                lab = torch.randint(ncls, (n,), generator=g) if ncls else None
                x = z
                for i in range(len(times) - 1):  # Heun (EDM style, last step Euler) or Euler
                    h = times[i + 1] - times[i]
                    d = model(x, torch.full((n,), times[i]), lab)
                    x_next = x + h * d
                    if pc.solver == "heun" and i < last:
                        x_next = x + h * 0.5 * (d + model(x_next, torch.full((n,), times[i + 1]), lab))
                    x = x_next
                noises.append(z.numpy())
                samples.append(x.numpy())
                labels.append((lab if lab is not None else torch.full((n,), -1)).numpy())
        out = os.path.join(tmp, f"plain-{runs[0]}")
        os.makedirs(out)
        for name, arr in (("noise", noises), ("sample", samples), ("label", labels)):
            np.save(os.path.join(out, f"{name}.npy"), np.concatenate(arr))
        dt = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        return rows / dt

    ours(), plain()  # warm-up
    res = _ab(reps, ours, plain)
    res.update({"rows": rows, "batch": batch, "nfe": nfe, "solver": pc.solver})
    return res


# --- (iii) the pipeline: Prefect flow vs --local --------------------------------------------------------------------

# the flow's log lines that end its parts (the first match of each, seconds from the command's start)
FLOW_MARKS = {"first_line": "Beginning flow run", "plan": "- plan:", "first_step": "Task run 'teacher' - teacher: 1/",
              "evaluated": "Task run 'evaluate' - Finished", "published": "Task run 'publish-"}


def _run_cli(args: list[str], env: dict, log: str, marks: dict | None = None) -> float:
    """The command's wall time; its output goes to log, each line time-stamped (seconds from the start), and into
    marks the time of the first line containing each of FLOW_MARKS' texts."""
    cmd = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())", *args]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        for line in proc.stdout:
            t = time.perf_counter() - t0
            f.write(f"{t:8.3f} {line}")
            if marks is not None:
                for key, text in FLOW_MARKS.items():
                    if key not in marks and text in line:
                        marks[key] = t
        proc.wait()
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}; log:\n{Path(log).read_text()[-3000:]}")
    if marks is not None:
        marks["exit"] = dt
    return dt


def _flow_parts(marks: dict) -> dict:
    """A flow run's parts (seconds) from its marks (FLOW_MARKS, exit); None where a line was missing."""
    def span(a: str, b: str) -> float | None:
        return marks[b] - marks[a] if a in marks and b in marks else None
    return {"to_first_line": marks.get("first_line"), "plan_to_first_step": span("plan", "first_step"),
            "evaluated_to_published": span("evaluated", "published"), "published_to_exit": span("published", "exit")}


def _median_of(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


@contextlib.contextmanager
def _lasting_server(env: dict, log: str):
    """`prefect server start` on a free port (UI off), as on a worker's host; yields its API URL once it answers."""
    port = free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env={**env, "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, proc, Path(log))
        yield url
    finally:
        stop(proc)


def bench_flow(size: str, reps: int, threads: int, tmp: str, preset_as_shipped: bool = False,
               store: str = "shared", preset: str = "toy2d", server: str = "temporary") -> dict:
    """store='shared': every run of a runner goes under one root, whose MLflow store the untimed warm-up run made
    (a team's root: MLflow creates a store's tables once); 'new': a fresh root per run, so each flow run also
    creates its MLflow tables (the first run into a new root). server='running': the flow runs use one lasting
    Prefect server (`_lasting_server`); 'temporary': each `reflow run` starts its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"OMP_NUM_THREADS": str(threads), "PREFECT_HOME": os.path.join(tmp, "prefect_home"),
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    with contextlib.ExitStack() as stack:
        if server == "running":
            env["PREFECT_API_URL"] = stack.enter_context(_lasting_server(env, os.path.join(tmp, "server.log")))
        out = _bench_flow_runs(size, reps, tmp, env, preset_as_shipped, store, preset)
    return {**out, "server": server}


def _bench_flow_runs(size: str, reps: int, tmp: str, env: dict, preset_as_shipped: bool, store: str,
                     preset: str) -> dict:
    sets = [] if preset_as_shipped else [a for s in FLOW_SETS[size] for a in ("--set", s)]
    runs = [0]
    parts: list[dict] = []

    def root_of(local: bool, n: int) -> str:
        return os.path.join(tmp, f"flow-root-{'local' if local else 'flow'}" + ("" if store == "shared" else f"-{n}"))

    def one(local: bool) -> float:
        runs[0] += 1
        root, name = root_of(local, runs[0]), f"bench-{runs[0]}"
        args = ["run", "--preset", preset, "--root", root, "--run", name, "--new", *sets]
        marks: dict = {}
        wall = _run_cli(args + (["--local"] if local else []), env, os.path.join(tmp, f"{name}.log"), marks)
        if not local:
            parts.append(_flow_parts(marks))
        shutil.rmtree(os.path.join(root, name) if store == "shared" else root, ignore_errors=True)
        return wall

    # warm-up, untimed, as in the other parts: the first flow on a machine also creates Prefect's database under
    # PREFECT_HOME (~10 s, once per machine), and with a shared root the MLflow store; every timed flow run still
    # starts its temporary API server (with --flow-server temporary)
    smoke = [a for s in FLOW_SETS["smoke"] for a in ("--set", s)]
    for local in (True, False):
        _run_cli(["run", "--preset", "toy2d", "--root", root_of(local, 0), "--run", "warm-up", *smoke]
                 + (["--local"] if local else []), env, os.path.join(tmp, "flow-warm-up.log"))
    # as rates (1 / wall) so _ab alternates the two; local wall / flow wall = flow rate / local rate
    res = _ab(reps, lambda: 1.0 / one(True), lambda: 1.0 / one(False))
    inv = lambda s: {"median": 1 / s["median"], "min": 1 / s["max"], "max": 1 / s["min"], "n": s["n"]}  # noqa: E731
    walls = {"local": [1 / r for r in res["ours_all"]], "flow": [1 / r for r in res["plain_all"]]}
    return {"local_wall_s": inv(res["ours"]), "flow_wall_s": inv(res["plain"]), "ratio": 1 / res["ratio"],
            "walls": walls, "ratio_paired": statistics.median(lo / f for lo, f in zip(walls["local"], walls["flow"])),
            "ratio_min": 1 / res["ratio_max"], "ratio_max": 1 / res["ratio_min"],
            "sets": [] if preset_as_shipped else FLOW_SETS[size], "store": store, "preset": preset,
            "parts": {k: _median_of([p[k] for p in parts]) for k in (parts[0] if parts else {})}}


# --- main -----------------------------------------------------------------------------------------------------------

def _r(x, nd=3):
    return None if x is None else round(float(x), nd)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a few minutes on 2 cores")
    g.add_argument("--smoke", action="store_true", help="seconds: tiny sizes, one repeat, no flow part (a test)")
    ap.add_argument("--reps", type=int, default=None, help="repeats per measurement (default 5 full, 3 quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS, else cores)")
    ap.add_argument("--parts", default=None, help="comma list of train,sim,flow (default all; smoke: train,sim)")
    ap.add_argument("--flow-config", choices=["size", "preset", "tiny"], default="size", help="the flow part's "
                    "run: the size's small overrides, the toy2d preset as shipped (`make demo`'s pipeline, minutes), "
                    "or the toy2d_tiny preset as shipped (seconds: the flow's fixed cost)")
    ap.add_argument("--flow-store", choices=["shared", "new"], default="shared", help="the flow part's roots: "
                    "one per runner whose MLflow store exists (default), or a new root per run (each flow run "
                    "creates its MLflow tables)")
    ap.add_argument("--flow-server", choices=["temporary", "running"], default="temporary", help="the flow "
                    "part's Prefect API: each `reflow run` starts its temporary server (default), or all use one "
                    "lasting `prefect server start`, as on a worker's host")
    ap.add_argument("--json", default=None, help="also write the RESULT dict to this file")
    args = ap.parse_args(argv)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    sz = SIZES[size]
    reps = args.reps or sz["reps"]
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    # the allocator setting the CLI and the flow apply (host.steady_malloc): for ours and plain alike here
    steady = host.steady_malloc()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(args, size, sz, reps, threads, steady)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, size: str, sz: dict, reps: int, threads: int, steady: bool) -> dict:
    parts = set((args.parts or ("train,sim" if args.smoke else "train,sim,flow")).split(","))
    t_start = time.perf_counter()
    res: dict = {}
    detail: dict = {}
    with tempfile.TemporaryDirectory(prefix="reflow-overhead-") as tmp:
        if "train" in parts:
            for preset, key in (("toy2d", "mlp"), ("digits", "unet")):
                tr = detail[f"train_{key}"] = bench_train(preset, sz[preset][0], reps, tmp)
                res[f"train_vs_plain_mem_{key}"] = _r(tr["mem"]["ratio"])
                res[f"train_vs_plain_pairs_{key}"] = _r(tr["pairs"]["ratio"])
                for path in ("mem", "pairs"):
                    m = tr[path]
                    res[f"train_{path}_{key}_spread"] = [_r(m["ratio_min"]), _r(m["ratio_max"])]
                    res[f"steps_per_s_{path}_{key}"] = {"ours": _r(m["ours"]["median"], 2),
                                                        "plain": _r(m["plain"]["median"], 2)}
            res["train_vs_plain_mem"] = min(res["train_vs_plain_mem_mlp"], res["train_vs_plain_mem_unet"])
            res["train_vs_plain_pairs"] = min(res["train_vs_plain_pairs_mlp"], res["train_vs_plain_pairs_unet"])
        else:
            res["train_vs_plain_mem"] = res["train_vs_plain_pairs"] = None
        if "sim" in parts:
            for preset, key in (("toy2d", "mlp"), ("digits", "unet")):
                _, rows, batch, nfe = sz[preset]
                sm = detail[f"sim_{key}"] = bench_sim(preset, rows, batch, nfe, reps, tmp)
                res[f"sim_vs_plain_{key}"] = _r(sm["ratio"])
                res[f"sim_{key}_spread"] = [_r(sm["ratio_min"]), _r(sm["ratio_max"])]
                res[f"pairs_per_s_{key}"] = {"ours": _r(sm["ours"]["median"], 1), "plain": _r(sm["plain"]["median"], 1)}
            res["sim_vs_plain"] = min(res["sim_vs_plain_mlp"], res["sim_vs_plain_unet"])
        else:
            res["sim_vs_plain"] = None
        if "flow" in parts:
            flow_reps = args.reps or (max(2, reps - 1) if size == "full" else 2)  # (minutes each)
            fl = detail["flow"] = bench_flow(size, flow_reps, threads, tmp,
                                             preset_as_shipped=args.flow_config in ("preset", "tiny"),
                                             store=args.flow_store,
                                             preset="toy2d_tiny" if args.flow_config == "tiny" else "toy2d",
                                             server=args.flow_server)
            res["flow_vs_local"] = _r(fl["ratio"])
            res["flow_spread"] = [_r(fl["ratio_min"]), _r(fl["ratio_max"])]
            # the median of the pairs' ratios (each pair: two runs next to each other), robust to the box's drift
            res["flow_vs_local_paired"] = _r(fl["ratio_paired"])
            res["wall_s"] = {"local": _r(fl["local_wall_s"]["median"], 1), "flow": _r(fl["flow_wall_s"]["median"], 1)}
            res["flow_config"], res["flow_store"], res["flow_server"] = args.flow_config, args.flow_store, fl["server"]
            res["flow_parts_s"] = {k: _r(v, 2) for k, v in fl["parts"].items()}
            res["flow_walls_s"] = {k: [_r(w, 1) for w in v] for k, v in fl["walls"].items()}  # in run order, pairs
        else:
            res["flow_vs_local"] = None
    res.update({"size": size, "reps": reps, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "steady_malloc": steady,
                "torch": torch.__version__, "seconds": round(time.perf_counter() - t_start, 1)})
    print(f"# overhead benchmark: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {threads} torch "
          f"threads, {size}, {reps} repeats (median [min, max] of ours/plain)")
    for k, v in detail.items():
        for path in ("mem", "pairs") if k.startswith("train") else ("",):
            m = v[path] if path else v
            unit = "pairs/s" if k.startswith("sim") else "wall s" if k == "flow" else "steps/s"
            if k == "flow":
                print(f"  {k:<18} local {m['local_wall_s']['median']:.1f} s  flow {m['flow_wall_s']['median']:.1f} s"
                      f"  local/flow {m['ratio']:.3f} [{m['ratio_min']:.3f}, {m['ratio_max']:.3f}]"
                      f"  paired {m['ratio_paired']:.3f}")
                print("  flow parts (s)     " + "  ".join(f"{name} {'-' if v is None else f'{v:.2f}'}"
                                                       for name, v in m["parts"].items()))
                continue
            print(f"  {k + ' ' + path:<18} ours {m['ours']['median']:9.2f}  plain {m['plain']['median']:9.2f} {unit}"
                  f"  ratio {m['ratio']:.3f} [{m['ratio_min']:.3f}, {m['ratio_max']:.3f}]")
    if args.json:
        Path(args.json).write_text(json.dumps(res))
    print("RESULT " + json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
