"""The spread of a run's quality metric over evaluation seeds: is a difference between two models more than noise?

    .venv/bin/python docs/tools/eval_seeds.py --root runs --run digits_3rf --models reflow reflow-2 --nfes 1 2

For each seed, every model samples from the same seeded noise and labels and is compared with the same real
reference (as `evaluate` does for its one seed); prints mean and sd per (model, NFE) and the paired differences of
the last model against the first. Digits (fd_digits) and toy2d (sliced W2) runs.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from reflow_core import rng, stages
from reflow_core.data import real_reference
from reflow_core.velocity import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="runs")
    ap.add_argument("--run", required=True)
    ap.add_argument("--models", nargs="+", default=["reflow", "reflow-2"])
    ap.add_argument("--nfes", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--seeds", nargs="+", type=int, default=[2024, 1, 2, 3, 4])
    ap.add_argument("--n", type=int, default=None, help="samples per seed (default: the run's eval.n_samples)")
    a = ap.parse_args()
    torch.set_num_threads(1)

    rundir = stages.RunDir.of(a.root, a.run)
    cfg = rundir.config()
    ds = stages.dataset(cfg)
    n = a.n or cfg.eval.n_samples
    models = {m: stages.load_model(stages.model_checkpoint(rundir, m)) for m in a.models}
    if ds.kind != "toy" and ds.name != "digits":
        raise SystemExit(f"{ds.name}: use the run's FID rows instead")

    out: dict[tuple[str, int], list[float]] = {}
    for seed in a.seeds:
        noise = stages.evaluate.eval_noise(ds.shape, n, seed)
        label = stages.evaluate.eval_labels(ds, cfg.net.class_cond, n, seed)
        real = real_reference(ds, n, torch.Generator().manual_seed(rng.reference_seed(seed)))
        ref = stages.evaluate.reference(cfg, ds, rundir, real)
        for m, model in models.items():
            for nfe in a.nfes:
                x = generate(model, noise, nfe, "euler", label=label)
                out.setdefault((m, nfe), []).append(ref.score(x)[ref.metric])
    print(f"{ref.metric}, Euler, {n} samples, seeds {a.seeds}")
    for (m, nfe), v in out.items():
        print(f"  {m:<10} NFE {nfe}: mean {statistics.mean(v):.3f}  sd {statistics.stdev(v):.3f}  "
              f"{[round(x, 2) for x in v]}")
    first, last = a.models[0], a.models[-1]
    for nfe in a.nfes:
        d = [y - x for x, y in zip(out[(first, nfe)], out[(last, nfe)])]
        print(f"  {last} - {first} at NFE {nfe} (paired by seed): mean {statistics.mean(d):+.3f}  "
              f"{[round(x, 2) for x in d]}")


if __name__ == "__main__":
    main()
