"""Runs sharing a machine: the same tiny pipelines alone, then k at once, and each run's speed against the ideal 1/k.

    .venv/bin/python benchmarks/sharing.py --quick            # digits and toy2d, alone, 2 and 4 at once (minutes)
    .venv/bin/python benchmarks/sharing.py --smoke            # seconds: the code paths only (a test)

Each run is a subprocess (`stages.run_local` on its own root, the environment as a user's: no thread settings
added) started together with the others of its group. A run reports its teacher's training speed (steps/s, the
median of its logged `samples_per_s` / batch) and its pairs stage's `pairs_per_s`. For k runs at once the ratio is
(median run speed at k) / (speed alone / k): 1 is fair sharing of the cores, far below 1 is the collapse of
oversubscribed threads. The last line is `RESULT {json}`.
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

# the worker: teacher and pairs stages of one run, its speeds as one JSON line
WORKER = """
import json, statistics, sys
from reflow_core import stages
from reflow_core.callbacks import NullCallback
from reflow_core.preset import load_preset
preset, root, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = load_preset(preset, overrides)
seen = {"samples_per_s": [], "pairs_per_s": []}
class Capture(NullCallback):
    def on_metrics(self, stage, step, metrics):
        for k in seen:
            if k in metrics:
                seen[k].append(float(metrics[k]))
stages.run_local(cfg, root, "r", callback=Capture(), stages=["teacher", "pairs"])
print(json.dumps({"steps_per_s": statistics.median(seen["samples_per_s"]) / cfg.teacher.train.batch_size,
                  "pairs_per_s": statistics.median(seen["pairs_per_s"])}))
"""


def run_group(preset: str, overrides: dict, k: int, tmp: str) -> list[dict]:
    """k runs of the pipeline started together; each one's speeds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, preset, os.path.join(tmp, f"{preset}-{k}-{i}"),
                               json.dumps(overrides)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for i in range(k)]
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
    ap.add_argument("--json", default=None, help="also write the RESULT dict to this file")
    a = ap.parse_args(argv)
    name = "smoke" if a.smoke else "quick"
    ks = [int(k) for k in a.ks.split(",")]
    if ks[0] != 1:
        ap.error("--ks must start with 1")
    res: dict = {"size": name, "ks": ks, "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                 "platform": platform.machine()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reflow-sharing-") as tmp:
        for preset, overrides in SIZES[name].items():
            solo = None
            for k in ks:
                runs = run_group(preset, overrides, k, tmp)
                steps = statistics.median(r["steps_per_s"] for r in runs)
                pairs = statistics.median(r["pairs_per_s"] for r in runs)
                solo = solo or (steps, pairs)
                res[f"{preset}_steps_per_s_k{k}"] = round(steps, 2)
                res[f"{preset}_pairs_per_s_k{k}"] = round(pairs, 1)
                res[f"{preset}_steps_vs_fair_k{k}"] = round(steps / (solo[0] / k), 3)
                res[f"{preset}_pairs_vs_fair_k{k}"] = round(pairs / (solo[1] / k), 3)
                print(f"{preset}: {k} at once: {steps:.2f} steps/s, {pairs:.1f} pairs/s per run "
                      f"({res[f'{preset}_steps_vs_fair_k{k}']:.3f} / {res[f'{preset}_pairs_vs_fair_k{k}']:.3f} "
                      f"of fair sharing)", flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        Path(a.json).write_text(json.dumps(res))
    print("RESULT " + json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
