"""The four ReFlow stages as plain functions: config + run paths in, artifact URLs out.

    train_teacher -> pair_shards / simulate_pair_shard (one call per shard) / finish_pairs -> reflow_finetune -> evaluate

Every stage is idempotent: finished work is detected from its artifacts and skipped, partial work resumes
(training from the latest checkpoint, pairs from the missing shards). `flows/reflow.py` wraps each function in a
Prefect task; `run_local` chains them without Prefect.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from . import metrics, plots, solvers, storage
from .callbacks import Callback, NullCallback
from .config import ConfigError, PipelineConfig
from .data import DataSet, load_data, real_reference, sample_batch
from .nets import build_net, set_dropout
from .pairs import PairSampler, PairStore, simulate_shard
from .train import Batch, CheckpointError, latest_checkpoint, load_checkpoint, train

STAGES = ("teacher", "pairs", "reflow", "evaluate")


@dataclass
class RunPaths:
    """Where one pipeline run keeps its artifacts (DESIGN.md section 3); all fsspec URLs."""

    root: str
    run: str
    dir: str
    config_json: str
    teacher_dir: str
    pairs_url: str
    reflow_dir: str
    eval_dir: str
    metrics_json: str

    @classmethod
    def of(cls, root: str, run: str) -> "RunPaths":
        d = storage.join(root, run)
        return cls(root, run, d, storage.join(d, "config.json"), storage.join(d, "teacher"),
                   storage.join(d, "pairs.zarr"), storage.join(d, "reflow"), storage.join(d, "eval"),
                   storage.join(d, "eval", "metrics.json"))

    def config(self) -> PipelineConfig:
        return PipelineConfig.model_validate(storage.read_json(self.config_json))

    def stage_done(self, stage: str) -> bool:
        cfg = self.config()
        if stage == "teacher":
            return cfg.teacher.checkpoint is not None or _final(self.teacher_dir, cfg.teacher.train.steps)
        if stage == "pairs":
            return storage.exists(self.pairs_url) and PairStore.open(self.pairs_url).is_complete()
        if stage == "reflow":
            return _final(self.reflow_dir, cfg.reflow.train.steps)
        if stage == "evaluate":
            return storage.exists(self.metrics_json) and \
                storage.read_json(self.metrics_json).get("eval_config") == cfg.eval.model_dump()
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")


def _final(ckpt_dir: str, steps: int) -> bool:
    ptr = storage.join(ckpt_dir, "latest.json")
    return storage.exists(ptr) and storage.read_json(ptr)["step"] >= steps


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def prepare_run(cfg: PipelineConfig, root: str, run: str | None = None, *, new: bool = False) -> RunPaths:
    """Create (or reopen) <root>/<run> and write config.json.

    Reopening a run with a different identity (data, net, teacher, pairs, reflow) is refused: its artifacts would
    mix two configurations. `new=True` picks a fresh run name instead (<run>-2, <run>-3, ...)."""
    run = run or cfg.name
    paths = RunPaths.of(root, run)
    if storage.exists(paths.config_json):
        old = PipelineConfig.model_validate(storage.read_json(paths.config_json))
        changes = _diff(old.identity(), cfg.identity())
        if changes and not new:
            raise ConfigError(f"run {paths.dir} exists with a different configuration:\n  " + "\n  ".join(changes)
                              + "\nuse another --run NAME, or --new for a fresh run name")
        if changes and new:
            k = 2
            while storage.exists(RunPaths.of(root, f"{run}-{k}").config_json):
                k += 1
            return prepare_run(cfg, root, f"{run}-{k}")
    storage.write_json(paths.config_json, cfg.model_dump())
    return paths


def default_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=4)
def _data(cfg_json: str) -> DataSet:
    from .config import DataConfig
    return load_data(DataConfig.model_validate_json(cfg_json))


def dataset(cfg: PipelineConfig) -> DataSet:
    """The stage's data, loaded once per process (stages and shards in one worker share it)."""
    return _data(cfg.data.model_dump_json())


def _meta(cfg: PipelineConfig, ds: DataSet) -> dict:
    return {"net": cfg.net.model_dump(), "shape": list(ds.shape), "num_classes": ds.num_classes,
            "convention": "t0=data,t1=noise"}


def load_model(url: str, *, ema: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """A network from a checkpoint alone (its meta holds the net config), in eval mode."""
    from .config import NetConfig
    state = load_checkpoint(url)
    meta = state["meta"]
    net = build_net(NetConfig.model_validate(meta["net"]), tuple(meta["shape"]), meta["num_classes"])
    net.load_state_dict(state["ema" if ema else "net"])
    return net.to(device).eval()


def velocity(net: nn.Module, label: torch.Tensor | None = None) -> solvers.Velocity:
    """The solver's (x, t) -> v view of a network, with the labels of the batch being integrated."""
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x, t, label).float()
    return v


# --- stage 1: teacher ----------------------------------------------------------------------------------------------

def _null_labels(y: torch.Tensor | None, p: float, num_classes: int, gen: torch.Generator) -> torch.Tensor | None:
    """CFG training: replace a label by the null class (index num_classes) with probability p."""
    if y is None or p == 0:
        return y
    drop = torch.rand(y.shape[0], generator=gen) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)


def train_teacher(cfg: PipelineConfig, paths: RunPaths, callback: Callback | None = None, device=None) -> str:
    """1-rectified flow: independent coupling of fresh N(0, I) noise and real data."""
    if cfg.teacher.checkpoint:
        load_checkpoint(cfg.teacher.checkpoint)  # fail now, clearly, if it is unusable
        return cfg.teacher.checkpoint
    ds, tc = dataset(cfg), cfg.teacher.train
    y = ds.y if cfg.net.class_cond else None

    def batches(step: int) -> Batch:
        g = torch.Generator().manual_seed(tc.seed * 7_919 + step)
        idx = torch.randint(len(ds), (tc.batch_size,), generator=g)
        label = None if y is None else _null_labels(y[idx], tc.label_dropout, ds.num_classes, g)
        return Batch(ds.x[idx], torch.randn((tc.batch_size, *ds.shape), generator=g), label)

    net = build_net(cfg.net, ds.shape, ds.num_classes)
    return train(net=net, batches=batches, cfg=tc, ckpt_dir=paths.teacher_dir, stage="teacher",
                 meta=_meta(cfg, ds), callback=callback, device=default_device(device))


# --- stage 2: pairs ------------------------------------------------------------------------------------------------

def _teacher_hash(teacher_ckpt: str) -> str:
    return storage.sha256(storage.read_bytes(teacher_ckpt))


def open_pair_store(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str) -> PairStore:
    pc, ds = cfg.pairs, dataset(cfg)
    attrs = {"teacher_hash": _teacher_hash(teacher_ckpt), "teacher_checkpoint": teacher_ckpt, "solver": pc.solver,
             "nfe": pc.nfe, "grid": pc.grid, "rho": pc.rho, "seed": pc.seed}
    return PairStore.create(paths.pairs_url, shape=tuple(ds.shape), n_backward=pc.n_pairs, n_forward=pc.n_forward,
                            chunk_size=pc.chunk_size, shard_size=pc.shard_size, dtype=pc.dtype, attrs=attrs)


def pair_shards(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str) -> list[int]:
    """Create the store if needed (refusing one written by another teacher); return the shards still to do."""
    return open_pair_store(cfg, paths, teacher_ckpt).pending_shards()


def simulate_pair_shard(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str, shard: int,
                        callback: Callback | None = None, device=None) -> dict:
    cb = callback or NullCallback()
    store = PairStore.open(paths.pairs_url)
    sh = store.plan[shard]
    if shard in store.done_shards():
        return {"shard": shard, "skipped": True}
    dev = default_device(device)
    net = load_model(teacher_ckpt, device=dev)
    ds = dataset(cfg)

    def v(x, t, label):
        return net(x, t, label).float()

    out = simulate_shard(store, sh, v, cfg=cfg.pairs, data_x=ds.x, data_y=ds.y if cfg.net.class_cond else None,
                         num_classes=ds.num_classes if cfg.net.class_cond else 0, device=dev,
                         progress=lambda done, total: cb.on_progress(f"pairs/shard{shard}", done, total))
    if "pairs_per_s" in out:
        cb.on_metrics("pairs", shard, {"pairs_per_s": float(out["pairs_per_s"]), "shard_seconds": out["seconds"]})
    return out


def finish_pairs(cfg: PipelineConfig, paths: RunPaths) -> str:
    store = PairStore.open(paths.pairs_url)
    missing = store.pending_shards()
    if missing:
        raise RuntimeError(f"pair store {paths.pairs_url} is missing shards {missing}; rerun the pairs stage")
    return paths.pairs_url


def simulate_pairs(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str, callback: Callback | None = None,
                   device=None) -> str:
    """All pending shards in this process (the Prefect flow fans them out as tasks instead)."""
    cb = callback or NullCallback()
    pending = pair_shards(cfg, paths, teacher_ckpt)
    for i, k in enumerate(pending):
        simulate_pair_shard(cfg, paths, teacher_ckpt, k, cb, device)
        cb.on_progress("pairs", i + 1, len(pending))
    return finish_pairs(cfg, paths)


# --- stage 3: reflow -----------------------------------------------------------------------------------------------

def reflow_finetune(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str, callback: Callback | None = None,
                    device=None) -> str:
    """2-rectified flow: regress the straight line between each stored (noise, sample) pair, from the teacher's EMA."""
    store = PairStore.open(finish_pairs(cfg, paths))
    if store.attrs.get("teacher_hash") != _teacher_hash(teacher_ckpt):
        raise RuntimeError(f"pairs at {paths.pairs_url} were made by another teacher than {teacher_ckpt}; "
                           f"refusing to mix them (rerun with --redo-stage pairs)")
    rc, ds = cfg.reflow.train, dataset(cfg)
    net = load_model(teacher_ckpt, ema=True).train()
    if cfg.reflow.dropout is not None:
        set_dropout(net, cfg.reflow.dropout)
    start = latest_checkpoint(paths.reflow_dir)
    start_step = load_checkpoint(start)["step"] if start else 0
    sampler = PairSampler(store, rc.batch_size, forward_ratio=cfg.reflow.forward_ratio, seed=rc.seed + start_step)
    class_cond = cfg.net.class_cond

    def batches(step: int) -> Batch:
        b = next(sampler)
        label = b.label if class_cond else None
        if label is not None and rc.label_dropout > 0:
            label = _null_labels(label, rc.label_dropout, ds.num_classes, torch.Generator().manual_seed(step))
        return Batch(b.sample, b.noise, label)

    try:
        return train(net=net, batches=batches, cfg=rc, ckpt_dir=paths.reflow_dir, stage="reflow",
                     meta=_meta(cfg, ds) | {"net": cfg.net.model_dump() | (
                         {"dropout": cfg.reflow.dropout} if cfg.reflow.dropout is not None else {})},
                     callback=callback, device=default_device(device))
    finally:
        sampler.close()


# --- stage 4: evaluate ---------------------------------------------------------------------------------------------

def eval_noise(shape: tuple, n: int, seed: int) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(net: nn.Module, noise: torch.Tensor, nfe: int, solver: str, grid: str = "uniform", rho: float = 1.0,
             label: torch.Tensor | None = None, batch_size: int = 1000, device=None) -> torch.Tensor:
    dev = default_device(device)
    out = []
    for i in range(0, noise.shape[0], batch_size):
        lab = None if label is None else label[i:i + batch_size].to(dev)
        x = solvers.sample(velocity(net, lab), noise[i:i + batch_size].to(dev), nfe, solver, grid, rho)
        out.append(x.cpu())
    return torch.cat(out)


def _labels(ds: DataSet, class_cond: bool, n: int, seed: int) -> torch.Tensor | None:
    if not class_cond or ds.num_classes == 0:
        return None
    return torch.randint(ds.num_classes, (n,), generator=torch.Generator().manual_seed(seed + 1))


def evaluate(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str, reflow_ckpt: str,
             callback: Callback | None = None, device=None) -> list[dict]:
    """Quality per (model, solver, NFE) from the same noise, straightness per model; metrics.json and plots."""
    cb, ec, ds, dev = callback or NullCallback(), cfg.eval, dataset(cfg), default_device(device)
    models = {"teacher": load_model(teacher_ckpt, device=dev), "reflow": load_model(reflow_ckpt, device=dev)}
    noise = eval_noise(ds.shape, ec.n_samples, ec.seed)
    label = _labels(ds, cfg.net.class_cond, ec.n_samples, ec.seed)
    real = real_reference(ds, ec.n_samples, torch.Generator().manual_seed(ec.seed + 2))
    quality = _quality_fn(cfg, ds, paths, real)
    combos = [(s, n) for s in ec.solvers for n in ec.nfes if s == "euler" or n % 2 == 1]
    rows, samples, total = [], {}, len(models) * len(combos)
    for name, net in models.items():
        s = metrics.straightness(lambda x, t: velocity(net, None if label is None else label.to(dev))(x, t),
                                 noise.to(dev), steps=ec.straightness_steps)
        for solver, nfe in combos:
            t0 = time.perf_counter()
            x = generate(net, noise, nfe, solver, ec.grid, ec.rho, label, device=dev)
            row = {"model": name, "nfe": nfe, "solver": solver, "straightness": float(s), **quality(x),
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            samples[(name, solver, nfe)] = x
            cb.on_metrics("evaluate", nfe, {f"{name}_{solver}_{k}": v for k, v in row.items()
                                            if isinstance(v, float) and k != "seconds"})
            cb.on_progress("evaluate", len(rows), total)
    metric = "sliced_w2" if ds.kind == "toy" else ("fd_digits" if ds.name == "digits" else "fid")
    storage.write_json(paths.metrics_json, {"rows": rows, "metric": metric, "eval_config": ec.model_dump(),
                                            "teacher": teacher_ckpt, "reflow": reflow_ckpt})
    cb.on_artifact("evaluate", paths.metrics_json)
    for p in _plots(cfg, paths, ds, models, noise, label, real, rows, samples, metric, dev):
        cb.on_artifact("evaluate", p)
    return rows


def _quality_fn(cfg: PipelineConfig, ds: DataSet, paths: RunPaths, real: torch.Tensor):
    if ds.kind == "toy":
        return lambda x: {"sliced_w2": metrics.sliced_w2(x, real, generator=torch.Generator().manual_seed(0)),
                          "energy": metrics.energy_distance(x, real)}
    if ds.name == "digits":
        net = metrics.load_or_train_digit_classifier(storage.join(paths.root, "_cache", "digit_classifier.pt"),
                                                     ds.x, ds.y)
        return lambda x: {"fd_digits": metrics.digit_fd(x, real, net)}
    weights = cfg.eval.inception_weights
    return lambda x: {"fid": metrics.fid_torch_fidelity(x, real, inception_weights=weights)}


def _plots(cfg, paths, ds, models, noise, label, real, rows, samples, metric, dev) -> list[str]:
    out = [plots.quality_vs_nfe(rows, metric, storage.join(paths.eval_dir, f"{metric}_vs_nfe.png"),
                                title=f"{cfg.name}: {metric} vs NFE"),
           plots.quality_vs_nfe(rows, "straightness", storage.join(paths.eval_dir, "straightness_vs_nfe.png"))]
    nfes = sorted({r["nfe"] for r in rows})
    if ds.kind == "toy":
        k = min(256, noise.shape[0])
        trajs = {}
        for name, net in models.items():
            pts = []
            end = solvers.euler(velocity(net), noise[:k].to(dev), solvers.time_grid(64),
                                callback=lambda i, t, x, v: pts.append(x.cpu()))
            pts.append(end.cpu())
            trajs[name] = torch.stack(pts)
        out.append(plots.trajectory_plot(trajs, real[:2000], storage.join(paths.eval_dir, "trajectories.png")))
        one = {f"{m} (1 NFE)": samples[(m, "euler", 1)] for m in models if (m, "euler", 1) in samples}
        if one:
            out.append(plots.scatter_samples(one, real[:2000], storage.join(paths.eval_dir, "samples_1nfe.png"),
                                             title="one Euler step from the same noise"))
    else:
        for (name, solver, nfe), x in samples.items():
            if nfe in (nfes[0], nfes[-1]) and solver == cfg.eval.solvers[0]:
                out.append(plots.sample_grid(x[:64], storage.join(paths.eval_dir, f"grid_{name}_{solver}_{nfe}.png"),
                                             title=f"{name}, {solver}, {nfe} NFE"))
    return out


# --- sampling and the whole pipeline -------------------------------------------------------------------------------

def model_checkpoint(paths: RunPaths, model: str) -> str:
    cfg = paths.config()
    if model == "teacher" and cfg.teacher.checkpoint:
        return cfg.teacher.checkpoint
    d = {"teacher": paths.teacher_dir, "reflow": paths.reflow_dir}.get(model)
    if d is None:
        raise ValueError(f"model must be 'teacher' or 'reflow', got {model!r}")
    url = latest_checkpoint(d)
    if url is None:
        raise CheckpointError(f"no {model} checkpoint under {d}; run the pipeline first")
    return url


def sample_model(paths: RunPaths, model: str, nfe: int, solver: str, n: int, seed: int, device=None,
                 label: int | None = None) -> torch.Tensor:
    """n samples in data space (toy: (n, 2); images: (n, C, H, W) in [-1, 1]), from noise seeded by `seed`."""
    dev = default_device(device)
    net = load_model(model_checkpoint(paths, model), device=dev)
    cfg = paths.config()
    ds = dataset(cfg)
    lab = None
    if cfg.net.class_cond:
        lab = torch.full((n,), label) if label is not None else _labels(ds, True, n, seed)
    x = generate(net, eval_noise(ds.shape, n, seed), nfe, solver, label=lab, device=dev)
    return x.clamp(-1, 1) if ds.kind == "image" else x


def run_local(cfg: PipelineConfig, root: str, run: str | None = None, callback: Callback | None = None,
              device=None, new: bool = False) -> list[dict]:
    """All four stages in this process, in order, each skipped when its artifacts say it is done."""
    paths = prepare_run(cfg, root, run, new=new)
    teacher = train_teacher(cfg, paths, callback, device)
    simulate_pairs(cfg, paths, teacher, callback, device)
    reflow = reflow_finetune(cfg, paths, teacher, callback, device)
    if paths.stage_done("evaluate"):
        return storage.read_json(paths.metrics_json)["rows"]
    return evaluate(cfg, paths, teacher, reflow, callback, device)
