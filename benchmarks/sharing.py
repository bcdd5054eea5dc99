"""Concurrent runs on one machine: the same tiny pipeline alone, then k at once, per-run rates against the ideal
(issue 27).

    .venv/bin/python benchmarks/sharing.py --quick     # minutes on 2 cores: toy2d and digits, 1, 2 and 4 at once
    .venv/bin/python benchmarks/sharing.py             # longer runs (digits' teacher 300 steps, as in the issue)
    .venv/bin/python benchmarks/sharing.py --smoke     # seconds: toy2d, 1 and 2 at once, the shared policy (a test)

Each run is `stages.run_local` (what `reflow run --local` runs) of the preset with the size's small overrides, in a
subprocess of its own under its own root. The k processes of a round start together: each imports and builds its
config, says it is ready, and all are released at once. A child times its teacher from the teacher stage's
progress events (steps/s) and its pairs from the pairs stage's shard seconds (pairs/s), and records the threads the
core share chose (the `threads` metric).

Policies: `share` (the default environment: no OMP_NUM_THREADS, no REFLOW_THREADS; the host-wide share of the
cores, reflow_core/cores.py) and `off` (REFLOW_THREADS=<cores>: every process takes all cores, as before the share).
The registry of each round is a fresh directory, so nothing else on the machine counts. Nothing is timed unless the
machine is otherwise quiet: 2 processes on 2 cores measure the machine as much as the code.

For k runs at once, `*_vs_ideal` = (a run's rate) / (its solo rate / k), the mean over the k runs: 1 is fair
sharing with no loss, the issue's collapse was 0.05. `wall_vs_solo` = the slowest run's wall time / the solo run's
(ideal k). The last line is `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_T = {"warmup": 5, "log_every": 50}
# size -> preset -> overrides (nested keys as load_preset takes them)
SIZES = {
    "full": {
        "toy2d": {"teacher.train": {**_T, "steps": 600, "ckpt_every": 600}, "reflow.train": {**_T, "steps": 300,
                  "ckpt_every": 300}, "pairs": {"n_pairs": 5000, "nfe": 31}, "eval": {"n_samples": 1000,
                  "nfes": [1, 2], "straightness_steps": 8}},
        "digits": {"teacher.train": {**_T, "steps": 300, "ckpt_every": 300}, "reflow.train": {**_T, "steps": 200,
                   "ckpt_every": 200}, "pairs": {"n_pairs": 2000, "shard_size": 1000, "batch_size": 500,
                   "chunk_size": 500, "nfe": 15}, "eval": {"n_samples": 500, "nfes": [1, 2], "straightness_steps": 8}},
        "ks": [1, 2, 4]},
    "quick": {
        "toy2d": {"teacher.train": {**_T, "steps": 300, "ckpt_every": 300}, "reflow.train": {**_T, "steps": 150,
                  "ckpt_every": 150}, "pairs": {"n_pairs": 2000, "shard_size": 1000, "batch_size": 1000,
                  "chunk_size": 500, "nfe": 15}, "eval": {"n_samples": 500, "nfes": [1, 2], "straightness_steps": 4}},
        "digits": {"teacher.train": {**_T, "steps": 150, "ckpt_every": 150}, "reflow.train": {**_T, "steps": 100,
                   "ckpt_every": 100}, "pairs": {"n_pairs": 1000, "shard_size": 500, "batch_size": 250,
                   "chunk_size": 250, "nfe": 7}, "eval": {"n_samples": 200, "nfes": [1], "straightness_steps": 4}},
        "ks": [1, 2, 4]},
    "smoke": {
        "toy2d": {"data.n_train": 1000, "net.hidden": 32, "net.depth": 2,
                  "teacher.train": {**_T, "steps": 20, "batch_size": 64, "ckpt_every": 20},
                  "reflow.train": {**_T, "steps": 10, "batch_size": 64, "ckpt_every": 10},
                  "pairs": {"n_pairs": 200, "shard_size": 100, "chunk_size": 100, "batch_size": 100, "nfe": 3},
                  "eval": {"n_samples": 100, "nfes": [1], "straightness_steps": 4}},
        "digits": {"teacher.train": {**_T, "steps": 10, "batch_size": 32, "ckpt_every": 10},
                   "reflow.train": {**_T, "steps": 5, "batch_size": 32, "ckpt_every": 5},
                   "pairs": {"n_pairs": 150, "shard_size": 150, "chunk_size": 75, "batch_size": 150, "nfe": 3},
                   "eval": {"n_samples": 100, "nfes": [1], "straightness_steps": 4}},
        "ks": [1, 2]},
}


# --- a child: one run, timed by its callback ------------------------------------------------------------------------

class _Timer:
    """Callback: teacher progress times, pairs shard seconds and rows, the threads the core share chose."""

    def __init__(self):
        self.teacher: list[tuple[int, float]] = []
        self.shard_s, self.rows, self.threads = 0.0, 0.0, []

    def on_progress(self, stage, done, total):
        if stage == "teacher":
            self.teacher.append((done, time.perf_counter()))

    def on_metrics(self, stage, step, metrics):
        if "threads" in metrics:
            self.threads.append(int(metrics["threads"]))
        if stage == "pairs" and "pairs_per_s" in metrics:
            self.shard_s += metrics["shard_seconds"]
            self.rows += metrics["pairs_per_s"] * metrics["shard_seconds"]

    def on_artifact(self, stage, path):
        pass


def child(preset: str, size: str, root: str) -> None:
    from reflow_core import host
    from reflow_core.config import load_preset
    from reflow_core.stages import run_local

    cfg = load_preset(preset, SIZES[size][preset])
    host.steady_malloc()  # as `reflow run --local` does
    print("ready", flush=True)
    sys.stdin.readline()  # released with the others
    timer, t0 = _Timer(), time.perf_counter()
    run_local(cfg, root, "bench", callback=timer)
    wall = time.perf_counter() - t0
    (s0, t_first), (s1, t_last) = timer.teacher[0], timer.teacher[-1]
    print("CHILD " + json.dumps({
        "wall_s": wall, "teacher_steps_per_s": (s1 - s0) / max(t_last - t_first, 1e-9),
        "pairs_per_s": timer.rows / max(timer.shard_s, 1e-9), "threads": sorted(set(timer.threads))}), flush=True)


# --- the parent: rounds of k runs started together ------------------------------------------------------------------

def one_round(preset: str, size: str, k: int, policy: str, tmp: str) -> list[dict]:
    env = {key: v for key, v in os.environ.items()
           if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "REFLOW_THREADS", "REFLOW_THREADS_MIN_WORK")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["REFLOW_CORES_DIR"] = tempfile.mkdtemp(prefix="cores-", dir=tmp)
    if policy == "off":
        from reflow_core.host import available_cores
        env["REFLOW_THREADS"] = str(available_cores())
    procs = []
    for i in range(k):
        root = tempfile.mkdtemp(prefix=f"{preset}-k{k}-{i}-", dir=tmp)
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", preset, size, root], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a {preset} run failed to start:\n{p.communicate()[1][-3000:]}")
    for p in procs:  # released together
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("CHILD ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"a {preset} run exited {p.returncode}:\n{stderr[-3000:]}")
        out.append(json.loads(lines[-1][6:]))
    return out


def _r(x, nd=3):
    return round(float(x), nd)


def compare(solo: dict, runs: list[dict], k: int) -> dict:
    """Per-run rates against the ideal 1/k of the solo rate, and the slowest wall time against the solo one."""
    vs = {key: statistics.mean(r[key] / (solo[key] / k) for r in runs)
          for key in ("teacher_steps_per_s", "pairs_per_s")}
    return {"teacher_vs_ideal": _r(vs["teacher_steps_per_s"]), "pairs_vs_ideal": _r(vs["pairs_per_s"]),
            "wall_vs_solo": _r(max(r["wall_s"] for r in runs) / solo["wall_s"]),
            "teacher_steps_per_s": [_r(r["teacher_steps_per_s"], 2) for r in runs],
            "pairs_per_s": [_r(r["pairs_per_s"], 1) for r in runs], "wall_s": [_r(r["wall_s"], 1) for r in runs],
            "threads": sorted({t for r in runs for t in r["threads"]})}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="minutes on 2 cores")
    g.add_argument("--smoke", action="store_true", help="seconds: toy2d only, 1 and 2 at once, shared (a test)")
    g.add_argument("--child", nargs=3, metavar=("PRESET", "SIZE", "ROOT"), help=argparse.SUPPRESS)
    ap.add_argument("--presets", default=None, help="comma list of toy2d,digits (default both; smoke: toy2d)")
    ap.add_argument("--policies", default=None, help="comma list of share,off (default both; smoke: share)")
    ap.add_argument("--ks", default=None, help="comma list of concurrent run counts (default 1,2,4; smoke: 1,2)")
    ap.add_argument("--json", default=None, help="also write the RESULT dict to this file")
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return {}
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    presets = (args.presets or ("toy2d" if args.smoke else "toy2d,digits")).split(",")
    policies = (args.policies or ("share" if args.smoke else "share,off")).split(",")
    ks = [int(k) for k in args.ks.split(",")] if args.ks else SIZES[size]["ks"]
    ks = sorted(set(ks) | {1})
    t_start = time.perf_counter()
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="reflow-sharing-") as tmp:
        for policy in policies:
            for preset in presets:
                solo = one_round(preset, size, 1, policy, tmp)[0]
                res[f"{policy}_{preset}_solo"] = {"teacher_steps_per_s": _r(solo["teacher_steps_per_s"], 2),
                                                  "pairs_per_s": _r(solo["pairs_per_s"], 1),
                                                  "wall_s": _r(solo["wall_s"], 1), "threads": solo["threads"]}
                for k in ks[1:]:
                    res[f"{policy}_{preset}_k{k}"] = compare(solo, one_round(preset, size, k, policy, tmp), k)
    from reflow_core.host import available_cores

    res.update({"size": size, "cores": available_cores(), "cpus": os.cpu_count(),
                "seconds": round(time.perf_counter() - t_start, 1)})
    print(f"# sharing benchmark: {platform.node()} {platform.machine()}, {available_cores()} cores, {size}; "
          f"per-run rate / (solo rate / k), mean over the k runs (1 = fair sharing)")
    for key, v in res.items():
        if isinstance(v, dict) and "teacher_vs_ideal" in v:
            print(f"  {key:<20} teacher {v['teacher_vs_ideal']:.3f}  pairs {v['pairs_vs_ideal']:.3f}  "
                  f"wall/solo {v['wall_vs_solo']:.2f}  threads {v['threads']}")
        elif isinstance(v, dict):
            print(f"  {key:<20} teacher {v['teacher_steps_per_s']} steps/s  pairs {v['pairs_per_s']} pairs/s  "
                  f"wall {v['wall_s']} s  threads {v['threads']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res))
    print("RESULT " + json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
