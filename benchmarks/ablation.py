"""Simple ReFlow ablation: what each of the seven improvements buys, added one at a time.

One teacher and one pair store (backward pairs plus forward pairs from inverting real data) per dataset, shared by
every configuration; each configuration only re-runs the reflow stage (when its reflow settings differ from the
previous row's) and the evaluate stage (`reflow_core.stages`). Rows are cumulative, like the paper's ablation table:

    baseline -> +loss_norm -> +time_dist (exponential, b = 10) -> +hpf/pseudo-huber -> +lower dropout (digits only)
    -> +forward pairs -> +heun -> +tuned grid (rho per NFE by reflow_core.tuning.search_rho) [-> guidance rows,
    Euler on a uniform grid, on the final model: CFG w = 1.5 and 2, AutoGuidance w = 1.5 with teacher/guide.pt]

NFE always counts network evaluations: Euler at any NFE; Heun at odd NFE only (N steps = 2N - 1), so its row
reports 1, 3, 5, 9 (3 and 5 stand in for 2 and 4); a guided velocity costs 2 NFE (guided Euler: 2, 4, 8).
Metric: toy2d sliced W2 to held-out data; digits Frechet distance in a small digit classifier's features (lower is
better for both). Last stdout line: RESULT {json}, "<data>/<config>" -> {nfe: metric}.

    .venv/bin/python benchmarks/ablation.py --quick --data toy2d,digits --out /tmp/ablation
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from reflow_core import solvers  # noqa: E402
from reflow_core.config import EvalConfig, PipelineConfig  # noqa: E402
from reflow_core.preset import load_preset
from reflow_core import checkpoint, stages  # noqa: E402
from reflow_core.callbacks import NullCallback  # noqa: E402
from reflow_core.stages import RunDir, StageOutput, dataset, prepare_run  # noqa: E402
from reflow_core.stages.evaluate import eval_labels, eval_noise  # noqa: E402
from reflow_core.velocity import velocity_model_from_state  # noqa: E402
from reflow_core.tuning import search_rho  # noqa: E402

RHOS = (1.0, 0.75, 1.5, 2.0, 3.0, 5.0)
EULER_NFES, HEUN_NFES, GUIDED_NFES = [1, 2, 4, 9], [1, 3, 5, 9], [2, 4, 8]


def sizes(data: str, quick: bool) -> dict:
    """Overrides of the *_baseline preset: the shared teacher/pairs, and the reflow/eval budget of every row."""
    if data == "toy2d":
        if quick:
            return {"net.hidden": 128, "net.depth": 3,
                    "teacher.train": {"steps": 700, "batch_size": 256, "lr": 0.002, "warmup": 50, "ckpt_every": 500,
                                      "log_every": 100},
                    "pairs": {"n_pairs": 4000, "n_forward": 1000, "shard_size": 1000, "chunk_size": 500,
                              "batch_size": 1000, "solver": "heun", "nfe": 31, "grid": "uniform"},
                    "reflow.train": {"steps": 400, "batch_size": 256, "lr": 0.001, "warmup": 50, "ckpt_every": 400,
                                     "log_every": 100, "seed": 1},
                    "eval": {"n_samples": 1000, "straightness_steps": 16}}
        return {"pairs": {"n_pairs": 20000, "n_forward": 5000, "shard_size": 5000, "chunk_size": 1000,
                          "batch_size": 5000, "solver": "heun", "nfe": 63, "grid": "uniform"}}
    if quick:
        return {"net": {"kind": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                        "attn_resolutions": [], "dropout": 0.1, "class_cond": True},
                "teacher.train": {"steps": 400, "batch_size": 64, "lr": 0.002, "warmup": 40, "ckpt_every": 400,
                                  "log_every": 100, "label_dropout": 0.1},
                "pairs": {"n_pairs": 1024, "n_forward": 256, "shard_size": 256, "chunk_size": 128,
                          "batch_size": 512, "solver": "heun", "nfe": 11, "grid": "uniform"},
                "reflow.train": {"steps": 150, "batch_size": 64, "lr": 0.001, "warmup": 20, "ckpt_every": 150,
                                 "log_every": 50, "seed": 1, "label_dropout": 0.1},
                "eval": {"n_samples": 256, "straightness_steps": 8}}
    return {"pairs": {"n_pairs": 8000, "n_forward": 2000, "shard_size": 2000, "chunk_size": 500,
                      "batch_size": 1000, "solver": "heun", "nfe": 31, "grid": "uniform"}}


def configurations(data: str) -> list[tuple[str, dict]]:
    """(name, cumulative change) in the order of the paper's ablation table."""
    rows = [("baseline", {}),
            ("+loss_norm", {"reflow.train.loss_norm": True}),
            ("+time_dist", {"reflow.train.time_dist": "exponential", "reflow.train.time_dist_param": 10.0}),
            ("+hpf/pseudo-huber" if data != "toy2d" else "+pseudo-huber",
             {"reflow.train.loss": "pseudo_huber", "reflow.train.hpf": 1.0 if data != "toy2d" else 0.0})]
    if data != "toy2d":  # the toy MLP teacher has no dropout to lower
        rows.append(("+lower dropout", {"reflow.dropout": 0.0}))
    rows += [("+forward pairs", {"reflow.forward_ratio": 0.2}),
             ("+heun", {"eval.solvers": ["heun"], "eval.nfes": HEUN_NFES}),
             ("+tuned grid", {"eval.grid": "rho", "tune": True})]
    return rows


def _set(raw: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        raw = raw.setdefault(p, {})
    raw[leaf] = value


def run_stage(cfg: PipelineConfig, rundir: RunDir, name: str, **inputs: StageOutput) -> StageOutput:
    """One stage instance of cfg's plan, in this process, with the given inputs (role -> earlier stage output)."""
    st = stages.find(stages.plan(cfg, rundir), name)
    return stages.module(st).run(st, stages.Context(cfg, rundir, NullCallback()), inputs)


def tune(cfg: PipelineConfig, ckpt: str, solver: str, nfes: list[int], guidance: str = "none", w: float = 1.0,
         guide_ckpt: str | None = None) -> tuple[list[float], dict]:
    """rho per NFE from a held-out noise batch (not the evaluation's), against a 31-NFE Heun solve of the same model."""
    ds, ec = dataset(cfg), cfg.eval
    n = min(128, ec.n_samples)
    noise = eval_noise(ds.shape, n, ec.seed + 1000)
    label = eval_labels(ds, cfg.net.class_cond, n, ec.seed + 1000)
    net = velocity_model_from_state(checkpoint.load(ckpt))
    guide = velocity_model_from_state(checkpoint.load(guide_ckpt)) if guide_ckpt else None
    v = net.solver_velocity(label, guidance=guidance, weight=w, guide=guide)
    x_ref = solvers.sample(v, noise, 31, "heun", "uniform")
    rhos, detail = [], {}
    for nfe in nfes:
        n_solver = solvers.solver_nfe_for_budget(solver, nfe, guidance != "none")
        best, errors = search_rho(v, noise, nfe=n_solver, solver=solver, rhos=RHOS, x_ref=x_ref)
        rhos.append(best)
        detail[nfe] = {"rho": best, "errors": errors}
    return rhos, detail


def run_dataset(data: str, quick: bool, out: str, log) -> dict:
    t_start = time.perf_counter()
    base = load_preset(f"{data}_baseline", sizes(data, quick))
    base.eval.nfes = EULER_NFES
    metric = "sliced_w2" if data == "toy2d" else "fd_digits"
    shared = prepare_run(base, out, f"{data}-shared")
    teacher_out = run_stage(base, shared, "teacher")  # urls: model, and guide (teacher/guide.pt) for AutoGuidance
    teacher = teacher_out.urls["model"]
    log(f"[{data}] teacher {teacher} ({time.perf_counter() - t_start:.0f} s)")
    pairs_out = run_stage(base, shared, "pairs", model=teacher_out)  # the shared store, read by every row's reflow
    log(f"[{data}] pairs {pairs_out.urls['pairs']} ({time.perf_counter() - t_start:.0f} s)")
    results, details = {}, {}

    def run_eval(name: str, cfg: PipelineConfig, reflow_ckpt: str, models=("reflow",)) -> list[dict]:
        cfg.eval.models = list(models)
        rundir = _rundir(cfg, name)
        t0 = time.perf_counter()
        ev = stages.find(stages.plan(cfg, rundir), "evaluate")  # reads the models in eval.models (+ guide)
        rows = run_stage(cfg, rundir, "evaluate", **stages.inputs_of(
            ev, {"teacher": teacher_out, "reflow": StageOutput({"model": reflow_ckpt})})).info["rows"]
        rows = [r for r in rows if r["model"] in models]
        results[name] = {r["nfe"]: r[metric] for r in rows}
        details[name] = {"rows": rows, "eval": cfg.eval.model_dump(), "reflow": cfg.reflow.model_dump()}
        log(f"[{data}] {name}: " + ", ".join(f"{r['solver']}@{r['nfe']}={r[metric]:.4g}" for r in rows)
            + f" (eval {time.perf_counter() - t0:.0f} s)")
        return rows

    def _rundir(cfg: PipelineConfig, name: str) -> RunDir:
        run = f"{data}-" + "".join(c if c.isalnum() else "_" for c in name).strip("_")
        return prepare_run(cfg, out, run)  # its reflow stage reads the shared store (pairs_out), not a copy

    # the teacher itself (1-rectified flow), for reference
    tcfg = base.model_copy(deep=True)
    tcfg.teacher.checkpoint = teacher
    run_eval("teacher (1-RF)", tcfg, teacher, models=("teacher",))

    raw = base.model_dump()
    raw["teacher"]["checkpoint"] = teacher
    last_reflow_key, reflow_ckpt, cfg = None, None, None
    for name, change in configurations(data):
        do_tune = change.pop("tune", False)
        for k, v in change.items():
            _set(raw, k, v)
        cfg = PipelineConfig.model_validate(raw)
        key = json.dumps(cfg.reflow.model_dump(), sort_keys=True)
        if key != last_reflow_key:
            t0 = time.perf_counter()
            reflow_ckpt = run_stage(cfg, _rundir(cfg, name), "reflow", pairs=pairs_out,
                                    init=teacher_out).urls["model"]
            log(f"[{data}] {name}: reflow {cfg.reflow.train.steps} steps ({time.perf_counter() - t0:.0f} s)")
            last_reflow_key = key
        if do_tune:
            rhos, detail = tune(cfg, reflow_ckpt, cfg.eval.solvers[0], cfg.eval.nfes)
            raw["eval"]["grid"] = {"kind": "rho", "per_nfe": dict(zip(cfg.eval.nfes, rhos))}
            cfg = PipelineConfig.model_validate(raw)
            log(f"[{data}] {name}: tuned rho per NFE {dict(zip(cfg.eval.nfes, rhos))}")
            run_eval(name, cfg, reflow_ckpt)
            details[name]["tuning"] = detail
        else:
            run_eval(name, cfg, reflow_ckpt)

    if cfg.net.class_cond:  # guidance on the final model: CFG (null label) and AutoGuidance (teacher at 1/4)
        for gname, guidance, w in (("+cfg w=1.5", "cfg", 1.5), ("+cfg w=2", "cfg", 2.0),
                                   ("+autoguidance w=1.5", "autoguidance", 1.5)):
            g = cfg.model_copy(deep=True)
            # Euler on a uniform grid (not re-tuned: the guided rows compare guidance, at 2 NFE a step)
            g.eval = EvalConfig.model_validate(g.eval.model_dump() | {
                "solvers": ["euler"], "nfes": GUIDED_NFES, "grid": {"kind": "uniform"}, "guidance": guidance,
                "guidance_weight": w})
            run_eval(gname, g, reflow_ckpt)
    return {"metric": metric, "results": results, "details": details, "seconds": time.perf_counter() - t_start}


def table(data: str, res: dict) -> str:
    nfes = sorted({n for r in res["results"].values() for n in r})
    straight = {k: d["rows"][0]["straightness"] for k, d in res["details"].items()}
    head = f"| {data} ({res['metric']}, lower is better) | " + " | ".join(f"NFE {n}" for n in nfes) + " | straightness |"
    lines = [head, "|" + "---|" * (len(nfes) + 2)]
    for name, r in res["results"].items():
        solver = res["details"][name]["rows"][0]["solver"]
        cells = [f"{r[n]:.4g}" if n in r else "—" for n in nfes]
        lines.append(f"| {name} ({solver}) | " + " | ".join(cells) + f" | {straight[name]:.4g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small budgets: both datasets in minutes on a 2-core CPU")
    ap.add_argument("--data", default="toy2d,digits", help="comma-separated: toy2d, digits")
    ap.add_argument("--out", default="/tmp/reflow-ablation", help="root for the runs and ablation.json")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    datas = [d.strip() for d in args.data.split(",") if d.strip()]
    bad = [d for d in datas if d not in ("toy2d", "digits")]
    if bad:
        ap.error(f"unknown --data {bad}; choose from toy2d, digits")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg):
        print(f"{time.perf_counter() - t0:7.1f}s {msg}", file=sys.stderr, flush=True)

    all_res = {d: run_dataset(d, args.quick, out, log) for d in datas}
    for d, res in all_res.items():
        print(f"\n{table(d, res)}\n")
    wall = time.perf_counter() - t0
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "wall_seconds": wall,
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                       f"{args.threads} thread(s)", "data": datas}
    Path(out, "ablation.json").write_text(json.dumps({"meta": meta, **all_res}, indent=1, default=str))
    print(f"wall time {wall:.0f} s; details in {out}/ablation.json")
    result = {f"{d}/{k}": {str(n): round(v, 5) for n, v in r.items()}
              for d, res in all_res.items() for k, r in res["results"].items()}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
