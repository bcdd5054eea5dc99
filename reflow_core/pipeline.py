"""The four ReFlow stages as plain functions: config + run paths in, artifact URLs out.

    train_teacher -> pair_shards / simulate_pair_shard (one call per shard) / finish_pairs -> reflow_finetune -> evaluate

Every stage is idempotent: finished work is detected from its artifacts and skipped, partial work resumes
(training from the latest checkpoint, pairs from the missing shards). `flows/reflow.py` wraps each function in a
Prefect task; `run_local` chains them without Prefect.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from . import accel, distributed, metrics, plots, solvers, storage
from .callbacks import Callback, NullCallback
from .config import ConfigError, PairsConfig, PipelineConfig
from .data import DataSet, load_data, real_reference, sample_batch
from .nets import build_net, set_dropout
from .pairs import PairSampler, PairStore, PairStoreMismatch, simulate_shard
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
        return read_run_config(self.config_json)

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


def read_run_config(url: str) -> PipelineConfig:
    """A run's config.json, validated; a truncated/corrupt or invalid file is a ConfigError naming it."""
    from .config import validate
    try:
        raw = storage.read_json(url)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{url} is not valid JSON (truncated or corrupt: {e}); restore it, or delete it to have "
                          "`reflow run` write it again from the preset and --set options the run was started "
                          "with (or use another --run NAME)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{url}: top level must be a JSON object; restore or delete it")
    return validate(raw, url)


def reset_stage(paths: "RunPaths", stage: str) -> list[str]:
    """Delete the artifacts of `stage` and of every later stage (--redo-stage STAGE), so the next run redoes them.

    A given teacher checkpoint (teacher.checkpoint) is never touched: only what lives under the run directory.
    Returns the URLs removed."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    owned = {"teacher": [paths.teacher_dir], "pairs": [paths.pairs_url], "reflow": [paths.reflow_dir],
             "evaluate": [paths.eval_dir]}
    removed = []
    for s in STAGES[STAGES.index(stage):]:
        for url in owned[s]:
            fs, path = storage.fs_and_path(url)
            if fs.exists(path):
                fs.rm(path, recursive=True)
                removed.append(url)
    return removed


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
        old = read_run_config(paths.config_json)
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
    if cfg.teacher.train.nproc > 1 and not distributed.under_torchrun():  # DDP: torchrun runs this function
        return distributed.launch_torchrun(cfg.teacher.train.nproc, "teacher", cfg.model_dump_json(), paths.dir)
    ds, tc = dataset(cfg), cfg.teacher.train
    y = ds.y if cfg.net.class_cond else None

    def batches(step: int) -> Batch:
        g = torch.Generator().manual_seed(tc.seed * 7_919 + step)
        idx = torch.randint(len(ds), (tc.batch_size,), generator=g)
        label = None if y is None else _null_labels(y[idx], tc.label_dropout, ds.num_classes, g)
        return Batch(ds.x[idx], torch.randn((tc.batch_size, *ds.shape), generator=g), label)

    net = build_net(cfg.net, ds.shape, ds.num_classes)
    _guide_snapshot(cfg, paths, lambda c: train(net=net, batches=batches, cfg=c, ckpt_dir=paths.teacher_dir,
                                                stage="teacher", meta=_meta(cfg, ds), callback=callback,
                                                device=default_device(device)))
    return train(net=net, batches=batches, cfg=tc, ckpt_dir=paths.teacher_dir, stage="teacher",
                 meta=_meta(cfg, ds), callback=callback, device=default_device(device))


GUIDE_FILE = "guide.pt"


def _guide_snapshot(cfg: PipelineConfig, paths: RunPaths, train_to) -> None:
    """AutoGuidance's weaker model: keep the teacher's EMA at 1/4 of training as teacher/guide.pt.

    Trains to step steps // 4 first (train() resumes, so the full run continues from there with the same optimizer,
    EMA, RNG and batches as an uninterrupted one), then copies that checkpoint's EMA. Skipped when the snapshot
    exists or the teacher is already past that step (then give eval.guide_checkpoint explicitly)."""
    tc = cfg.teacher.train
    guide_url, guide_step = storage.join(paths.teacher_dir, GUIDE_FILE), max(1, tc.steps // 4)
    if guide_step >= tc.steps or storage.exists(guide_url):
        return
    latest = latest_checkpoint(paths.teacher_dir)
    if latest is not None and load_checkpoint(latest)["step"] > guide_step:
        return
    state = load_checkpoint(train_to(tc.model_copy(update={"steps": guide_step})))
    buf = io.BytesIO()
    torch.save({"ema": state["ema"], "net": state["ema"], "step": state["step"], "meta": state["meta"],
                "train_config": state["train_config"]}, buf)
    storage.atomic_write_bytes(guide_url, buf.getvalue())


def guide_checkpoint(cfg: PipelineConfig, teacher_ckpt: str) -> str:
    """eval.guide_checkpoint, else guide.pt beside the teacher checkpoint (written by train_teacher)."""
    if cfg.eval.guide_checkpoint:
        return cfg.eval.guide_checkpoint
    url = storage.join(teacher_ckpt.rsplit("/", 1)[0], GUIDE_FILE)
    if not storage.exists(url):
        raise ConfigError(f"eval.guidance='autoguidance' needs a weaker model: no {url} (teacher trained before the "
                          f"guide snapshot existed, or given as teacher.checkpoint); set eval.guide_checkpoint")
    return url


# --- stage 2: pairs ------------------------------------------------------------------------------------------------

def _teacher_hash(teacher_ckpt: str) -> str:
    return storage.sha256(storage.read_bytes(teacher_ckpt))


def open_pair_store(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str) -> PairStore:
    try:
        return PairStore.create_from_config(paths.pairs_url, cfg.pairs, shape=tuple(dataset(cfg).shape),
                                            teacher_hash=_teacher_hash(teacher_ckpt),
                                            extra_attrs={"teacher_checkpoint": teacher_ckpt})
    except PairStoreMismatch as e:  # e.g. teacher.checkpoint now holds another teacher: never mix its pairs in
        raise PairStoreMismatch(f"{e}\nrerun with --redo-stage pairs to simulate them again") from None


def pair_shards(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str) -> list[int]:
    """Create the store if needed (refusing one written by another teacher); return the shards still to do."""
    return open_pair_store(cfg, paths, teacher_ckpt).pending_shards()


def shard_device(shard: int, device=None) -> torch.device:
    """The device for pair shard k: the given one; else cuda:{k % n_gpus} when GPUs are visible (shards running
    concurrently on one machine spread over its GPUs; a Dask worker limited to one GPU sees only cuda:0); else cpu."""
    if device is not None:
        return torch.device(device)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device(f"cuda:{shard % n}") if n else torch.device("cpu")


def pair_batch_size(net: torch.nn.Module, pc: PairsConfig, shape: tuple[int, ...], rows: int, class_cond: bool,
                    device: torch.device) -> int:
    """pairs.auto_batch: the largest batch, doubling from pairs.batch_size up to pairs.max_batch_size and the
    shard's rows, for which one solver step of the teacher (both Heun evaluations, bf16 when pairs.amp) fits in
    GPU memory; off CUDA, pairs.batch_size as configured (`accel.find_max_batch`)."""
    limit = min(pc.max_batch_size, rows)
    if limit <= pc.batch_size:
        return limit

    @torch.no_grad()
    def one_step(b: int) -> None:
        x = torch.randn((b, *shape), device=device)
        lab = torch.zeros(b, dtype=torch.long, device=device) if class_cond else None
        v = accel.autocast_velocity(net, device, pc.amp, lab)
        solvers.integrate(v, x, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), pc.solver)
    return accel.find_max_batch(one_step, pc.batch_size, limit, device)


def simulate_pair_shard(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str, shard: int,
                        callback: Callback | None = None, device=None) -> dict:
    cb = callback or NullCallback()
    store = PairStore.open(paths.pairs_url)
    sh = store.plan[shard]
    if shard in store.done_shards():
        return {"shard": shard, "skipped": True}
    dev = shard_device(shard, device)
    net = load_model(teacher_ckpt, device=dev)
    ds, pc = dataset(cfg), cfg.pairs
    if pc.auto_batch:  # before compiling: the compiled module is specialised to the batch it is probed with
        pc = pc.model_copy(update={"batch_size": pair_batch_size(net, pc, ds.shape, sh.rows, cfg.net.class_cond,
                                                                  dev)})
        cb.on_metrics("pairs", shard, {"batch_size": float(pc.batch_size)})
    if pc.compile:
        x = torch.randn((min(pc.batch_size, sh.rows), *ds.shape), device=dev)
        lab = torch.zeros(x.shape[0], dtype=torch.long, device=dev) if cfg.net.class_cond else None
        with accel.autocast(dev, pc.amp):
            net = accel.prepare_model(net, compile=True, example=(x, torch.ones(x.shape[0], device=dev), lab))

    def v(x, t, label):  # bf16 velocity when pairs.amp; the solver keeps x in float32
        with accel.autocast(dev, pc.amp, cache_enabled=False):
            return net(x, t, label).float()

    if pc.cuda_graph:
        v = accel.GraphedVelocity(v)

    out = simulate_shard(store, sh, v, cfg=pc, data_x=ds.x, data_y=ds.y if cfg.net.class_cond else None,
                         num_classes=ds.num_classes if cfg.net.class_cond else 0, device=dev,
                         progress=lambda done, total: cb.on_progress(f"pairs/shard{shard}", done, total))
    if "pairs_per_s" in out:
        cb.on_metrics("pairs", shard, {"pairs_per_s": float(out["pairs_per_s"]), "shard_seconds": out["seconds"]})
    return out


class PairStoreCorrupt(RuntimeError):
    """Stored pairs whose bytes no longer match the sha256 in their shard's done marker."""


def verify_pairs(store: PairStore, shards: list[int] | None = None) -> list[str]:
    """Re-hash every (or the given) finished shard against its marker; the problems found, one line each."""
    bad = []
    for k in (range(len(store.plan)) if shards is None else shards):
        sh = store.plan[k]
        chunks = f"chunks {sh.start // store.chunk_size}..{(sh.stop - 1) // store.chunk_size}"
        try:
            ok = store.verify_shard(k)
        except Exception as e:  # noqa: BLE001 - a truncated chunk object fails to decode
            bad.append(f"shard {k} (rows [{sh.start}, {sh.stop}), {chunks}): unreadable ({type(e).__name__}: {e})")
            continue
        if not ok:
            bad.append(f"shard {k} (rows [{sh.start}, {sh.stop}), {chunks}): "
                       + ("no done marker" if store.marker(k) is None else "sha256 differs from its done marker"))
    return bad


def finish_pairs(cfg: PipelineConfig, paths: RunPaths, verify: bool = True) -> str:
    """The pair store's URL once every shard is done; verify=True also re-hashes every shard against its marker
    (a truncated or corrupt chunk is caught here, before training reads it)."""
    store = PairStore.open(paths.pairs_url)
    missing = store.pending_shards()
    if missing:
        raise RuntimeError(f"pair store {paths.pairs_url} is missing shards {missing}; rerun the pairs stage")
    if verify:
        bad = verify_pairs(store)
        if bad:
            raise PairStoreCorrupt(f"pair store {paths.pairs_url} failed verification:\n  " + "\n  ".join(bad)
                                   + "\nrerun with --redo-stage pairs (reflow run ... --redo-stage pairs)")
    return paths.pairs_url


def simulate_pairs(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str, callback: Callback | None = None,
                   device=None) -> str:
    """All pending shards in this process (the Prefect flow fans them out as tasks instead)."""
    cb = callback or NullCallback()
    pending = pair_shards(cfg, paths, teacher_ckpt)
    for i, k in enumerate(pending):
        simulate_pair_shard(cfg, paths, teacher_ckpt, k, cb, device)
        cb.on_progress("pairs", i + 1, len(pending))
    return finish_pairs(cfg, paths, verify=False)  # verified before training, in reflow_finetune


# --- stage 3: reflow -----------------------------------------------------------------------------------------------

def reflow_finetune(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str, callback: Callback | None = None,
                    device=None) -> str:
    """2-rectified flow: regress the straight line between each stored (noise, sample) pair, from the teacher's EMA."""
    store = PairStore.open(finish_pairs(cfg, paths, verify=not paths.stage_done("reflow")))
    if store.attrs.get("teacher_hash") != _teacher_hash(teacher_ckpt):
        raise RuntimeError(f"pairs at {paths.pairs_url} were made by another teacher than {teacher_ckpt}; "
                           f"refusing to mix them (rerun with --redo-stage pairs)")
    rc, ds = cfg.reflow.train, dataset(cfg)
    if cfg.reflow.train.nproc > 1 and not distributed.under_torchrun():  # DDP: torchrun runs this function
        return distributed.launch_torchrun(cfg.reflow.train.nproc, "reflow", cfg.model_dump_json(), paths.dir,
                                           teacher=teacher_ckpt)
    net = load_model(teacher_ckpt, ema=True).train()
    if cfg.reflow.dropout is not None:
        set_dropout(net, cfg.reflow.dropout)
    start = latest_checkpoint(paths.reflow_dir)
    start_step = load_checkpoint(start)["step"] if start else 0
    sampler = PairSampler(store, rc.batch_size, forward_ratio=cfg.reflow.forward_ratio, seed=rc.seed + start_step
                          + 1_000_003 * distributed.rank())  # DDP: each rank its own pair stream
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


def guided_velocity(net: nn.Module, label: torch.Tensor | None, guidance: str = "none", weight: float = 1.0,
                    guide: nn.Module | None = None) -> solvers.Velocity:
    """The velocity to integrate: net itself, or v = v_guide + w (v_cond - v_guide) (two network calls each).

    cfg: v_guide = the same net with the null label (net.null_label), v_cond = net with `label`;
    autoguidance: v_guide = the weaker `guide` net with the same label."""
    if guidance == "none":
        return velocity(net, label)
    if guidance == "cfg":
        if getattr(net, "label_emb", None) is None or label is None:
            raise ConfigError("eval.guidance='cfg' needs a class-conditional net (net.class_cond: true) and labels")
        null = torch.full_like(label, int(net.null_label))
        return solvers.guided(velocity(net, label), velocity(net, null), weight)
    if guidance == "autoguidance":
        if guide is None:
            raise ConfigError("eval.guidance='autoguidance' needs a guide network (eval.guide_checkpoint)")
        return solvers.guided(velocity(net, label), velocity(guide, label), weight)
    raise ValueError(f"unknown guidance {guidance!r}; choose 'none', 'cfg' or 'autoguidance'")


@torch.no_grad()
def generate(net: nn.Module, noise: torch.Tensor, nfe: int, solver: str, grid: str = "uniform", rho: float = 1.0,
             label: torch.Tensor | None = None, batch_size: int = 1000, device=None, *, times: list[float] | None = None,
             guidance: str = "none", guidance_weight: float = 1.0, guide: nn.Module | None = None,
             return_nfe: bool = False):
    """Samples from `noise` with `nfe` *network* evaluations per sample (guided: the solver gets nfe / 2 velocity
    evaluations, each calling two networks). return_nfe=True also returns the network evaluations counted on the
    first batch (a check of the accounting, not a formula)."""
    dev = default_device(device)
    guided = guidance != "none"
    n_solver = solvers.solver_nfe_for_budget(solver, nfe, guided)
    if n_solver is None:
        raise ValueError(f"{nfe} NFE cannot be spent exactly by {solver}{' with guidance (2 NFE a velocity)' if guided else ''}")
    out, counted = [], None
    for i in range(0, noise.shape[0], batch_size):
        lab = None if label is None else label[i:i + batch_size].to(dev)
        counter = _CountingNet(net)
        gcount = _CountingNet(guide) if guide is not None else None
        v = guided_velocity(counter, lab, guidance, guidance_weight, gcount)
        x = solvers.sample(v, noise[i:i + batch_size].to(dev), n_solver, solver, grid, rho, times)
        if counted is None:
            counted = counter.calls + (gcount.calls if gcount is not None else 0)
        out.append(x.cpu())
    x = torch.cat(out)
    return (x, counted) if return_nfe else x


class _CountingNet(nn.Module):
    """Counts forward calls of a network (one per batch evaluation); passes null_label/label_emb through."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.calls = net, 0
        self.null_label = getattr(net, "null_label", None)
        self.label_emb = getattr(net, "label_emb", None)

    def forward(self, x, t, label=None):
        self.calls += 1
        return self.net(x, t, label)


def _labels(ds: DataSet, class_cond: bool, n: int, seed: int) -> torch.Tensor | None:
    if not class_cond or ds.num_classes == 0:
        return None
    return torch.randint(ds.num_classes, (n,), generator=torch.Generator().manual_seed(seed + 1))


def evaluate(cfg: PipelineConfig, paths: RunPaths, teacher_ckpt: str, reflow_ckpt: str,
             callback: Callback | None = None, device=None) -> list[dict]:
    """Quality per (model, solver, NFE) from the same noise, straightness per model; metrics.json and plots."""
    cb, ec, ds, dev = callback or NullCallback(), cfg.eval, dataset(cfg), default_device(device)
    ckpts = {"teacher": teacher_ckpt, "reflow": reflow_ckpt}
    models = {m: load_model(ckpts[m], device=dev) for m in ("teacher", "reflow") if m in ec.models}
    guided = ec.guidance != "none"
    guide = load_model(guide_checkpoint(cfg, teacher_ckpt), device=dev) if ec.guidance == "autoguidance" else None
    noise = eval_noise(ds.shape, ec.n_samples, ec.seed)
    label = _labels(ds, cfg.net.class_cond, ec.n_samples, ec.seed)
    real = real_reference(ds, ec.n_samples, torch.Generator().manual_seed(ec.seed + 2))
    quality = _quality_fn(cfg, ds, paths, real)
    # nfe = network evaluations; a (solver, nfe) whose budget cannot be met exactly is skipped (heun: odd NFE;
    # guided: 2 NFE per velocity, so euler needs even NFE and heun 2 (2N - 1))
    rho_of = dict(zip(ec.nfes, ec.rhos)) if ec.rhos is not None else {}
    combos = [(s, n) for s in ec.solvers for n in ec.nfes if solvers.solver_nfe_for_budget(s, n, guided)]
    rows, samples, total = [], {}, len(models) * len(combos)
    for name, net in models.items():
        s = metrics.straightness(lambda x, t: velocity(net, None if label is None else label.to(dev))(x, t),
                                 noise.to(dev), steps=ec.straightness_steps)
        for solver, nfe in combos:
            t0 = time.perf_counter()
            rho = rho_of.get(nfe, ec.rho)
            x, counted = generate(net, noise, nfe, solver, ec.grid, rho, label, device=dev, times=ec.times,
                                  guidance=ec.guidance, guidance_weight=ec.guidance_weight, guide=guide,
                                  return_nfe=True)
            assert counted == nfe, (solver, nfe, counted)  # the accounting is measured, not assumed
            row = {"model": name, "nfe": nfe, "solver": solver, "straightness": float(s), **quality(x),
                   "seconds": time.perf_counter() - t0, "steps": solvers.steps_for_nfe(
                       solver, solvers.solver_nfe_for_budget(solver, nfe, guided)),
                   "grid": "list" if ec.times else ec.grid, "rho": rho, "guidance": ec.guidance,
                   "guidance_weight": ec.guidance_weight if guided else 1.0}
            rows.append(row)
            samples[(name, solver, nfe)] = x
            cb.on_metrics("evaluate", nfe, {f"{name}_{solver}_{k}": v for k, v in row.items()
                                            if isinstance(v, float) and k not in ("seconds", "rho", "guidance_weight")})
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
                 label: int | None = None, *, guidance: str | None = None, guidance_weight: float | None = None,
                 grid: str = "uniform", rho: float = 1.0) -> torch.Tensor:
    """n samples in data space (toy: (n, 2); images: (n, C, H, W) in [-1, 1]), from noise seeded by `seed`.

    nfe counts network evaluations; guidance (default: the run's eval.guidance / guidance_weight) costs 2 a step."""
    dev = default_device(device)
    net = load_model(model_checkpoint(paths, model), device=dev)
    cfg = paths.config()
    ds = dataset(cfg)
    lab = None
    if cfg.net.class_cond:
        lab = torch.full((n,), label) if label is not None else _labels(ds, True, n, seed)
    g = cfg.eval.guidance if guidance is None else guidance
    w = cfg.eval.guidance_weight if guidance_weight is None else guidance_weight
    guide = None
    if g == "autoguidance":
        guide = load_model(guide_checkpoint(cfg, model_checkpoint(paths, "teacher")), device=dev)
    x = generate(net, eval_noise(ds.shape, n, seed), nfe, solver, grid, rho, label=lab, device=dev,
                 guidance=g, guidance_weight=w, guide=guide)
    return x.clamp(-1, 1) if ds.kind == "image" else x


def run_local(cfg: PipelineConfig, root: str, run: str | None = None, callback: Callback | None = None,
              device=None, new: bool = False, redo_stages: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """All four stages in this process, in order, each skipped when its artifacts say it is done.
    redo_stages: delete these stages' artifacts (and later stages') first (`reset_stage`)."""
    paths = prepare_run(cfg, root, run, new=new)
    for stage in redo_stages:
        reset_stage(paths, stage)
    teacher = train_teacher(cfg, paths, callback, device)
    simulate_pairs(cfg, paths, teacher, callback, device)
    reflow = reflow_finetune(cfg, paths, teacher, callback, device)
    if paths.stage_done("evaluate"):
        return storage.read_json(paths.metrics_json)["rows"]
    return evaluate(cfg, paths, teacher, reflow, callback, device)
