"""Runs sharing a machine: the same tiny pipelines alone, then k at once, and each run's speed against the ideal 1/k.

    .venv/bin/python benchmarks/sharing.py --quick            # digits and toy2d, alone, 2 and 4 at once (minutes)
    .venv/bin/python benchmarks/sharing.py                    # longer runs (digits' teacher 300 steps, issue 27)
    .venv/bin/python benchmarks/sharing.py --quick --policy off   # every process all cores: the collapse
    .venv/bin/python benchmarks/sharing.py --smoke            # seconds: the code paths only (a test)

Each run is a subprocess (`stages.run_local` of the teacher and pairs stages on its own root, the environment as a
user's: OMP_NUM_THREADS, MKL_NUM_THREADS and REFLOW_THREADS removed). The k runs of a group import first, then are
released together. A run reports its teacher's training speed (steps/s, the median of its logged `samples_per_s` /
batch), its pairs stage's `pairs_per_s`, its wall time from the release, and the thread counts the host-wide core
share chose (`threads` metrics; reflow_core/cores.py). For k runs at once the ratio is (median run speed at k) /
(speed alone / k): 1 is fair sharing of the cores, far below 1 is the collapse of oversubscribed threads;
`wall_vs_solo` is the slowest run's wall time over the solo one (ideal k). `--policy off` sets REFLOW_THREADS to
the cores in every run (each takes all of them, as before the share) for the comparison. Each group has a fresh
core registry, so nothing else on the machine counts: measure on an otherwise quiet machine. The last line is
`RESULT {json}`.
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

# one run of a pipeline at the benchmark's size: preset, overrides (teacher steps, pairs) per size
SIZES = {
    "smoke": {"toy2d": {"teacher.train.steps": 20, "teacher.train.warmup": 2, "pairs.n_pairs": 500,
                        "pairs.shard_size": 250, "pairs.chunk_size": 250, "pairs.batch_size": 250, "pairs.nfe": 3,
                        "data.n_train": 500, "net.hidden": 32, "net.depth": 2}},
    "quick": {"toy2d": {"teacher.train.steps": 200, "teacher.train.warmup": 10, "teacher.train.log_every": 20,
                        "pairs.n_pairs": 4000, "pairs.shard_size": 2000, "pairs.chunk_size": 1000,
                        "pairs.batch_size": 2000, "pairs.nfe": 15, "data.n_train": 4000},
              "digits": {"teacher.train.steps": 60, "teacher.train.warmup": 5, "teacher.train.log_every": 10,
                         "pairs.n_pairs": 256, "pairs.shard_size": 256, "pairs.chunk_size": 256,
                         "pairs.batch_size": 256, "pairs.nfe": 5}},
}
# the full size: the quick runs, longer (digits' teacher 300 steps, as issue 27 measured it)
SIZES["full"] = {preset: {**SIZES["quick"][preset], **more} for preset, more in {
    "toy2d": {"teacher.train.steps": 600, "teacher.train.log_every": 50, "pairs.n_pairs": 10000, "pairs.nfe": 31},
    "digits": {"teacher.train.steps": 300, "teacher.train.log_every": 25, "pairs.n_pairs": 1000, "pairs.nfe": 15},
}.items()}

# the worker: imports, says it is ready, waits for the release, runs the teacher and pairs stages of one run and
# prints its speeds as one JSON line
WORKER = """
import json, statistics, sys, time
from reflow_core import host, stages
from reflow_core.callbacks import NullCallback
from reflow_core.preset import load_preset
preset, root, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = load_preset(preset, overrides)
host.steady_malloc()  # as `reflow run` does
seen = {"samples_per_s": [], "pairs_per_s": [], "threads": []}
class Capture(NullCallback):
    def on_metrics(self, stage, step, metrics):
        for k in seen:
            if k in metrics:
                seen[k].append(float(metrics[k]))
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
stages.run_local(cfg, root, "r", callback=Capture(), stages=["teacher", "pairs"])
print(json.dumps({"steps_per_s": statistics.median(seen["samples_per_s"]) / cfg.teacher.train.batch_size,
                  "pairs_per_s": statistics.median(seen["pairs_per_s"]), "wall_s": time.perf_counter() - t0,
                  "threads": sorted({int(t) for t in seen["threads"]})}))
"""
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "REFLOW_THREADS", "REFLOW_THREADS_MIN_WORK")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_group(preset: str, overrides: dict, k: int, tmp: str, policy: str = "share") -> list[dict]:
    """k runs of the pipeline released together; each one's speeds."""
    env = {key: v for key, v in os.environ.items() if key not in THREAD_VARS}
    env.update({"PYTHONPATH": str(ROOT), "REFLOW_CORES_DIR": tempfile.mkdtemp(prefix="cores-", dir=tmp)})
    if policy == "off":
        env["REFLOW_THREADS"] = str(_cores())
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, preset, os.path.join(tmp, f"{preset}-{k}-{i}"),
                               json.dumps(overrides)], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
             for i in range(k)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            p.wait()
            raise RuntimeError(f"a {preset} run failed to start (exit {p.returncode})")
    for p in procs:  # released together, after their imports
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a {preset} run failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--smoke", action="store_true")
    ap.add_argument("--ks", default="1,2,4", help="group sizes (1 first: the solo speeds the ratios divide by)")
    ap.add_argument("--policy", choices=["share", "off"], default="share",
                    help="share: the default environment (the host-wide core share); off: REFLOW_THREADS=<cores>")
    ap.add_argument("--json", default=None, help="also write the RESULT dict to this file")
    a = ap.parse_args(argv)
    name = "smoke" if a.smoke else "quick" if a.quick else "full"
    ks = [int(k) for k in a.ks.split(",")]
    if ks[0] != 1:
        ap.error("--ks must start with 1")
    res: dict = {"size": name, "ks": ks, "policy": a.policy, "cores": _cores(), "cpus": os.cpu_count(),
                 "platform": platform.machine()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reflow-sharing-") as tmp:
        for preset, overrides in SIZES[name].items():
            solo = None
            for k in ks:
                runs = run_group(preset, overrides, k, tmp, a.policy)
                steps = statistics.median(r["steps_per_s"] for r in runs)
                pairs = statistics.median(r["pairs_per_s"] for r in runs)
                wall = max(r["wall_s"] for r in runs)
                solo = solo or (steps, pairs, wall)
                res[f"{preset}_steps_per_s_k{k}"] = round(steps, 2)
                res[f"{preset}_pairs_per_s_k{k}"] = round(pairs, 1)
                res[f"{preset}_steps_vs_fair_k{k}"] = round(steps / (solo[0] / k), 3)
                res[f"{preset}_pairs_vs_fair_k{k}"] = round(pairs / (solo[1] / k), 3)
                res[f"{preset}_wall_vs_solo_k{k}"] = round(wall / solo[2], 2)
                res[f"{preset}_threads_k{k}"] = sorted({t for r in runs for t in r["threads"]})
                print(f"{preset}: {k} at once: {steps:.2f} steps/s, {pairs:.1f} pairs/s per run "
                      f"({res[f'{preset}_steps_vs_fair_k{k}']:.3f} / {res[f'{preset}_pairs_vs_fair_k{k}']:.3f} "
                      f"of fair sharing), slowest wall {res[f'{preset}_wall_vs_solo_k{k}']:.2f}x solo, threads "
                      f"{res[f'{preset}_threads_k{k}']}", flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        Path(a.json).write_text(json.dumps(res))
    print("RESULT " + json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
