"""InstaFlow's two ablations on class-conditional digits, measured over evaluation seeds at 1 NFE.

(a) distillation straight from the teacher (`reflow.rounds: 0`: the student learns the teacher's own pairs) versus
    from the 2-RF (`reflow.rounds: 1`: teacher -> pairs -> reflow -> distill-pairs -> distill), same distill section;
(b) pairs simulated with classifier-free guidance (`pairs.guidance: cfg`, weight w) versus unguided, 2-RF setting:
    the reflow model (1 NFE) and its distilled student, both fed guided pairs.

Three runs of a small variant of the `digits_distill` preset share one teacher (trained with CFG label dropout, so
its null label is a model; given to the arms as teacher.checkpoint). `reflow.dropout: null` keeps the teacher's
dropout in the 2-RF too, so the students of (a) differ only in where their pairs come from. Each model samples 1
Euler step from the same seeded noise and labels per evaluation seed and is scored against the same real reference
(`docs/tools/eval_seeds.py`'s protocol); fd_digits (Frechet distance in a small digit classifier's features), lower
is better. Paired differences are per seed. Last stdout line: RESULT {json}.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/instaflow_ablations.py --out /tmp/instaflow
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from reflow_core import metrics, rng, stages, storage  # noqa: E402
from reflow_core.data import real_reference  # noqa: E402
from reflow_core.preset import load_preset  # noqa: E402
from reflow_core.velocity import generate  # noqa: E402

SEEDS = (2024, 1, 2, 3, 4)
_T = {"warmup": 20, "log_every": 50}


def sizes(smoke: bool) -> dict:
    """Overrides of `digits_distill`: the shared teacher (CFG label dropout 0.1), pairs, reflow and distill budgets."""
    if smoke:
        return {"teacher.train": {**_T, "steps": 40, "batch_size": 32, "lr": 0.002, "ckpt_every": 40,
                                  "label_dropout": 0.1},
                "pairs": {"n_pairs": 128, "shard_size": 128, "chunk_size": 64, "batch_size": 128, "solver": "euler",
                          "nfe": 3, "grid": "uniform"},
                "reflow.train": {**_T, "steps": 20, "batch_size": 32, "ckpt_every": 20, "seed": 1},
                "reflow.dropout": None,
                "distill.train": {**_T, "steps": 20, "batch_size": 32, "ckpt_every": 20, "seed": 2},
                "eval": {"nfes": [1], "n_samples": 100, "straightness_steps": 2}}
    return {"teacher.train": {"steps": 3000, "label_dropout": 0.1},
            "pairs": {"n_pairs": 4000, "shard_size": 1000, "chunk_size": 500},
            "reflow.train.steps": 1500, "reflow.dropout": None, "distill.train.steps": 1500,
            "eval": {"nfes": [1], "n_samples": 1000}}


def arms(weight: float) -> dict[str, dict]:
    """name -> overrides on top of the sizes; every arm has the same distill section."""
    return {"teacher->distill": {"reflow.rounds": 0},
            "2-RF->distill": {"reflow.rounds": 1},
            f"2-RF->distill, CFG w={weight:g} pairs": {"reflow.rounds": 1, "pairs.guidance": "cfg",
                                                     "pairs.guidance_weight": weight}}


def train_arm(name: str, overrides: dict, root: str, log, only: list[str] | None = None) -> dict[str, str]:
    """The stages `only` (default: every stage of the arm's plan but evaluate, which runs here over several seeds);
    the checkpoints of the models they trained, by model name."""
    cfg = load_preset("digits_distill", overrides)
    run = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    todo = only or [n for n in stages.stage_names(cfg) if n != "evaluate"]
    t0 = time.perf_counter()
    stages.run_local(cfg, root, run, stages=todo)
    rundir = stages.RunDir.of(root, run)
    trained = [s.model for s in stages.plan(cfg, rundir) if s.model and s.name in todo]
    log(f"{name}: {todo} ({time.perf_counter() - t0:.0f} s)")
    return {m: stages.model_checkpoint(rundir, m) for m in trained}


def score(ckpts: dict[str, str], cfg, root: str, seeds, n: int) -> dict[str, list[float]]:
    """fd_digits per seed of each model at 1 Euler NFE (same noise, labels and real reference for every model)."""
    ds = stages.dataset(cfg)
    models = {k: stages.load_model(u) for k, u in ckpts.items()}
    out: dict[str, list[float]] = {k: [] for k in models}
    for seed in seeds:
        noise = stages.evaluate.eval_noise(ds.shape, n, seed)
        label = stages.evaluate.eval_labels(ds, True, n, seed)
        real = real_reference(ds, n, torch.Generator().manual_seed(rng.reference_seed(seed)))
        ref = metrics.reference_for(ds, real, storage.join(root, "_cache"))
        for k, m in models.items():
            out[k].append(ref.score(generate(m, noise, 1, "euler", label=label))[ref.metric])
    return out


def paired(a: list[float], b: list[float]) -> dict:
    d = [y - x for x, y in zip(a, b)]
    return {"mean": statistics.mean(d), "sd": statistics.stdev(d) if len(d) > 1 else 0.0,
            "wins": sum(x < 0 for x in d), "per_seed": d}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny budgets: seconds, for the test suite")
    ap.add_argument("--out", default="/tmp/reflow-instaflow", help="root for the runs")
    ap.add_argument("--weight", type=float, default=1.5, help="CFG weight of the guided pairs")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the RESULT dict here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    root = os.path.abspath(a.out)
    t_start = time.perf_counter()

    def log(msg):
        print(f"{time.perf_counter() - t_start:7.1f}s {msg}", file=sys.stderr, flush=True)

    base = sizes(a.smoke)
    teacher_cfg = load_preset("digits_distill", base)
    teacher = train_arm("teacher", base, root, log, only=["teacher"])["teacher"]
    base = {**base, "teacher.checkpoint": teacher}
    ckpts = {"teacher": {"teacher": teacher}}
    for name, change in arms(a.weight).items():
        ckpts[name] = {k: v for k, v in train_arm(name, {**base, **change}, root, log).items() if k != "teacher"}
    flat = {f"{arm}/{m}": url for arm, ms in ckpts.items() for m, url in ms.items()}
    n = teacher_cfg.eval.n_samples
    fd = score(flat, teacher_cfg, root, a.seeds, n)
    log(f"scored {len(flat)} models over seeds {a.seeds} ({n} samples each)")

    arm_a0, arm_a1, arm_b = list(arms(a.weight))
    comparisons = {
        "(a) distilled: from 2-RF - from teacher": paired(fd[f"{arm_a0}/distilled"], fd[f"{arm_a1}/distilled"]),
        "(b) distilled: CFG pairs - unguided": paired(fd[f"{arm_a1}/distilled"], fd[f"{arm_b}/distilled"]),
        "(b) 2-RF: CFG pairs - unguided": paired(fd[f"{arm_a1}/reflow"], fd[f"{arm_b}/reflow"]),
    }
    print(f"\nfd_digits at 1 NFE (Euler), {n} samples, seeds {a.seeds}; lower is better\n")
    print("| model | mean | sd | per seed |\n|---|---|---|---|")
    for k, v in fd.items():
        print(f"| {k} | {statistics.mean(v):.3f} | {statistics.stdev(v) if len(v) > 1 else 0:.3f} | "
              + ", ".join(f"{x:.2f}" for x in v) + " |")
    print("\n| paired difference (second - first; < 0: second better) | mean | sd | seeds where second better |")
    print("|---|---|---|---|")
    for k, c in comparisons.items():
        print(f"| {k} | {c['mean']:+.3f} | {c['sd']:.3f} | {c['wins']}/{len(a.seeds)} |")
    res = {"metric": "fd_digits", "nfe": 1, "seeds": a.seeds, "n_samples": n, "weight": a.weight,
           "smoke": a.smoke, "seconds": round(time.perf_counter() - t_start, 1),
           "fd": {k: [round(x, 5) for x in v] for k, v in fd.items()},
           "diff": {k: {"mean": round(c["mean"], 5), "sd": round(c["sd"], 5), "wins": c["wins"]}
                    for k, c in comparisons.items()}}
    if a.json:
        Path(a.json).write_text(json.dumps(res))
    print("RESULT " + json.dumps(res))
    return res


if __name__ == "__main__":
    main()
