"""Validated configuration for every stage of the ReFlow pipeline.

Every model forbids unknown keys, so a typo in a preset fails before any work starts, with pydantic's
message naming the field and the allowed values.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.resources
import os
import re
from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

# presets ship inside the package (package data), so a non-editable install (a Docker image) has them
PRESET_DIR = Path(str(importlib.resources.files("reflow_core") / "presets"))

ToyName = Literal["8gaussians", "moons", "checkerboard", "circles", "spirals"]
TimeDist = Literal["uniform", "logit_normal", "u_shape", "exponential"]
SolverName = Literal["euler", "heun"]


T = TypeVar("T")


class _ExecutionOnly:
    """Annotated metadata: the field decides how fast or where a stage runs, not what its artifacts are."""

    def __repr__(self) -> str:
        return "execution-only"


EXECUTION_ONLY = _ExecutionOnly()
# `batch_size: Exec[int]` marks a setting a run may be reopened with changed (a resume on other workers, a bigger
# GPU): `PipelineConfig.identity()` leaves every such field out. Pairs are seeded per row and training batches are a
# function of the step, so none of these settings changes an artifact's values (tests/test_pairs.py, test_stages.py).
Exec = Annotated[T, EXECUTION_ONLY]


def is_execution_only(field) -> bool:
    return any(m is EXECUTION_ONLY for m in field.metadata)


class _Strict(BaseModel):
    # NaN / inf are never a valid setting (an inf huber_scale or rho would pass a `gt=0` bound)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class UniformGrid(_Strict):
    """t_i = 1 - i / N."""

    kind: Literal["uniform"] = "uniform"

    def solver_args(self, nfe: int) -> dict:
        return {"grid": "uniform", "rho": 1.0, "times": None}


class RhoGrid(_Strict):
    """EDM's schedule on [0, 1]: t_i = (1 - i/N)^rho in rho-space; rho > 1 takes smaller steps near the data end."""

    kind: Literal["rho"] = "rho"
    rho: float = Field(7.0, gt=0.0, le=20.0)
    per_nfe: dict[int, float] | None = Field(None, description="a tuned rho per NFE (reflow_core.tuning.search_rho); "
                                                               "NFEs not listed use rho")

    @model_validator(mode="after")
    def _check(self) -> "RhoGrid":
        bad = {n: r for n, r in (self.per_nfe or {}).items() if n < 1 or not 0.0 < r <= 20.0}
        if bad:
            raise ValueError(f"grid.per_nfe maps NFE >= 1 to rho in (0, 20], got {bad}")
        return self

    def solver_args(self, nfe: int) -> dict:
        return {"grid": "rho", "rho": (self.per_nfe or {}).get(nfe, self.rho), "times": None}


class ListGrid(_Strict):
    """The user's own times, strictly decreasing from 1.0 (noise) to 0.0 (data)."""

    kind: Literal["list"] = "list"
    times: list[float]

    @model_validator(mode="after")
    def _check(self) -> "ListGrid":
        t = self.times
        if len(t) < 2 or t[0] != 1.0 or t[-1] != 0.0 or any(b >= a for a, b in zip(t, t[1:])):
            raise ValueError(f"grid.times must run strictly down from 1.0 to 0.0, got {t}")
        return self

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def solver_args(self, nfe: int) -> dict:
        return {"grid": "list", "rho": 1.0, "times": list(self.times)}


def _grid_shorthand(v):
    """`grid: uniform` / `grid: rho` (a kind with its defaults) for `grid: {kind: ...}`."""
    return {"kind": v} if isinstance(v, str) else v


# The time grid of a solver: one tagged union, chosen by `kind`. Pairs integrate on uniform or rho grids (the same
# grid reversed for inversion); evaluation may also take a list of times.
TimeGrid = Annotated[UniformGrid | RhoGrid | ListGrid, Field(discriminator="kind"), BeforeValidator(
    _grid_shorthand, json_schema_input_type=Literal["uniform", "rho", "list"] | UniformGrid | RhoGrid | ListGrid)]
PairGrid = Annotated[UniformGrid | RhoGrid, Field(discriminator="kind"), BeforeValidator(
    _grid_shorthand, json_schema_input_type=Literal["uniform", "rho"] | UniformGrid | RhoGrid)]


class DataConfig(_Strict):
    """Where the data (t = 0 end) comes from. The noise (t = 1 end) is always N(0, I)."""

    name: Literal["toy2d", "digits", "natural32", "cifar10", "imagefolder"] = "toy2d"
    toy: ToyName = "8gaussians"
    n_train: int = Field(50_000, ge=16, description="toy: points drawn once; natural32: crops; others: cap")
    image_size: int = Field(8, ge=4, le=256, description="digits: 8 or 16; imagefolder: resize")
    path: str | None = Field(None, description="cifar10 / imagefolder: local path or fsspec URL")
    download: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.name == "digits" and self.image_size not in (8, 16):
            raise ValueError(f"data.image_size must be 8 or 16 for digits, got {self.image_size}")
        if self.name == "imagefolder" and not self.path:
            raise ValueError("data.path is required for data.name='imagefolder'")
        return self


class NetConfig(_Strict):
    kind: Literal["mlp", "unet"] = "mlp"
    # MLP (toy 2-D)
    hidden: int = Field(256, ge=8, le=8192)
    depth: int = Field(4, ge=1, le=32)
    # U-Net (images)
    channels: int = Field(32, ge=8, le=1024)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = Field(1, ge=1, le=8)
    attn_resolutions: list[int] = Field(default_factory=lambda: [8])
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    class_cond: bool = False

    @model_validator(mode="after")
    def _check(self) -> "NetConfig":
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"net.channel_mult must be a non-empty list of positive ints, got {self.channel_mult}")
        return self


class TrainConfig(_Strict):
    """One training run (teacher or reflow); the loss switches are Simple ReFlow's improvements 1-3."""

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    warmup: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    ckpt_every: int = Field(500, ge=1)
    log_every: Exec[int] = Field(50, ge=1)
    seed: int = 0
    amp: bool = Field(False, description="bf16 autocast")
    time_dist: TimeDist = "uniform"
    time_dist_param: float | None = Field(None, description="logit_normal: std; u_shape: a; exponential: base")
    loss: Literal["mse", "pseudo_huber"] = "mse"
    huber_scale: float = Field(0.00054, gt=0.0, description="pseudo-Huber c = huber_scale * sqrt(d)")
    loss_norm: bool = Field(False, description="weight 1 / stopgrad(per-sample loss) (Simple ReFlow #1)")
    hpf: float = Field(0.0, ge=0.0, description="high-pass emphasis of the residual (Simple ReFlow #3), 0 = off")
    label_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="CFG: drop class labels with this probability")
    max_bad_steps: Exec[int] = Field(20, ge=1, description="non-finite losses tolerated before training stops")
    compile: Exec[bool] = Field(False, description="torch.compile the forward pass (eager fallback with a warning)")
    channels_last: Exec[bool] = Field(False, description="NHWC memory format for image nets (ignored for MLPs)")
    nproc: int = Field(1, ge=1, le=64, description="processes (GPUs) per stage; > 1 launches torchrun with DDP; "
                                                  "batch_size is per process")


class TeacherConfig(_Strict):
    """Where the teacher comes from: trained here (source: train), one of our checkpoints (checkpoint: URL), or a
    pretrained diffusion model adapted to a velocity in our convention (source: diffusers; reflow_core.teachers)."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: str | None = Field(None, description="start from this teacher checkpoint (skips training)")
    source: Literal["train", "diffusers"] = Field("train", description="diffusers: a pretrained UNet2DModel + its "
                                                                       "scheduler config (pip install -e '.[diffusers]')")
    path: str | None = Field(None, description="source=diffusers: a local pipeline/model directory or a hub id "
                                               "(downloaded only when online)")
    prediction_type: Literal["epsilon", "sample", "v_prediction"] | None = Field(
        None, description="source=diffusers: the model's parametrisation; None = its scheduler config's")

    @model_validator(mode="after")
    def _check(self) -> "TeacherConfig":
        if self.source == "diffusers" and not self.path:
            raise ValueError("teacher.path is required for teacher.source='diffusers' (a local directory or hub id)")
        if self.source == "diffusers" and self.checkpoint:
            raise ValueError("teacher.checkpoint and teacher.source='diffusers' exclude each other")
        if self.source == "train" and (self.path or self.prediction_type):
            raise ValueError("teacher.path / teacher.prediction_type need teacher.source='diffusers'")
        return self


class PairsConfig(_Strict):
    n_pairs: int = Field(20_000, ge=1, description="backward pairs: noise -> teacher sample")
    n_forward: int = Field(0, ge=0, description="forward pairs: real data -> inverted noise (Simple ReFlow #5)")
    shard_size: int = Field(5_000, ge=1)
    chunk_size: int = Field(1_000, ge=1)
    batch_size: Exec[int] = Field(1_000, ge=1)
    auto_batch: Exec[bool] = Field(False, description="on CUDA: double batch_size while one solver step still fits in GPU "
                             "memory (up to max_batch_size and the shard's rows) and simulate with the largest that "
                             "fits; off CUDA batch_size is used as is")
    max_batch_size: Exec[int] = Field(16_384, ge=1, description="auto_batch's upper bound")
    solver: SolverName = "heun"
    nfe: int = Field(63, ge=1)
    grid: PairGrid = Field(default_factory=lambda: RhoGrid(rho=1.5))
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = 1234
    workers: Exec[int] = Field(1, ge=1, description="shards simulated concurrently")
    amp: bool = Field(False, description="bf16 autocast for the teacher's velocity (state x stays float32)")
    compile: Exec[bool] = Field(False, description="torch.compile the teacher for sampling (eager fallback with a warning)")
    cuda_graph: Exec[bool] = Field(False, description="replay each velocity evaluation from a CUDA graph (CUDA only)")
    engine: Exec[Literal["threads", "dask"]] = Field(
        "threads", description="shard fan-out in the Prefect flow: threads on this machine (one GPU per worker, "
        "round-robin) or a Dask cluster through prefect-dask (pip install -e '.[dask]')")
    dask_address: Exec[str | None] = Field(
        None, description="engine='dask': scheduler address (tcp://host:8786); None = a LocalCluster of `workers` "
        "processes with one thread each. Credentials never go here: workers read them from their environment")
    zarr_shards: bool = Field(False, description="zarr 3 sharding codec: one object per pair shard holding its chunks")
    compress: bool = Field(False, description="zstd-compress noise/sample chunks (random floats barely compress)")

    @model_validator(mode="after")
    def _check(self) -> "PairsConfig":
        if self.chunk_size > self.shard_size:
            raise ValueError(f"pairs.chunk_size ({self.chunk_size}) must be <= pairs.shard_size ({self.shard_size})")
        if self.shard_size % self.chunk_size:
            raise ValueError(f"pairs.shard_size ({self.shard_size}) must be a multiple of pairs.chunk_size ({self.chunk_size})")
        if self.auto_batch and self.max_batch_size < self.batch_size:
            raise ValueError(f"pairs.max_batch_size ({self.max_batch_size}) must be >= pairs.batch_size "
                             f"({self.batch_size}) when pairs.auto_batch is on")
        if self.solver == "heun" and self.nfe % 2 == 0:
            raise ValueError(f"pairs.nfe must be odd for heun (N steps cost 2N-1 NFE), got {self.nfe}")
        return self


class ReflowConfig(_Strict):
    train: TrainConfig = Field(default_factory=TrainConfig)
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="reflow dropout (Simple ReFlow #4); None = teacher's")
    forward_ratio: float = Field(0.0, ge=0.0, le=1.0, description="fraction of each batch drawn from forward pairs")
    rounds: int = Field(1, ge=1, le=10, description="k-rectified flow: round r > 1 simulates pairs from round "
                                                    "r-1's reflow model (pairs-r.zarr) and fine-tunes it (reflow-r/)")
    ram_budget_mb: Exec[int] = Field(2048, ge=0, description="a pair store that fits is read into memory once; a "
                                                             "larger one is streamed by chunks (same batches)")


class AnnealConfig(_Strict):
    """SlimFlow's Annealing Reflow: a smaller student trained from random init on the distill pairs, its source
    noise mixed as sqrt(1 - beta^2) noise + beta fresh, beta annealed from 1 to 0 over `steps` steps."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    steps: int = Field(1000, ge=1, description="beta goes 1 -> 0 over these steps, then stays 0 (plain reflow)")
    schedule: Literal["linear", "cosine", "exponential"] = "linear"
    flip: bool = Field(True, description="joint horizontal flip of data and noise (images only)")


class DistillConfig(_Strict):
    """A one-step student, x_data_hat = x_noise - v_s(x_noise, t=1), trained on pairs simulated by the last reflow
    model (its own store). Same size as the reflow model (initialised from its EMA), or a smaller `net` (SlimFlow:
    Annealing Reflow from random init, then this distillation)."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    distance: Literal["pseudo_huber", "l2", "lpips"] = Field(
        "pseudo_huber", description="lpips needs the `lpips` extra and local backbone weights (never downloaded "
        "silently)")
    fgd_weight: float = Field(0.0, ge=0.0, description="SlimFlow's flow-guided distillation term (0 = off)")
    fgd_t: tuple[float, float] = Field((0.2, 0.8), description="t range of the flow-guided term")
    net: NetConfig | None = Field(None, description="a smaller student net (SlimFlow); None = the reflow model's")
    anneal: AnnealConfig | None = Field(None, description="Annealing Reflow of the smaller student (needs net)")

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        lo, hi = self.fgd_t
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"distill.fgd_t must satisfy 0 < lo <= hi < 1, got {self.fgd_t}")
        if (self.net is None) != (self.anneal is None):
            raise ValueError("distill.net (a smaller student) and distill.anneal (its Annealing Reflow) go together")
        if self.train.nproc > 1 or (self.anneal is not None and self.anneal.train.nproc > 1):
            raise ValueError("distill.train.nproc / distill.anneal.train.nproc: the student stages run in one "
                             "process (no DDP launcher for them yet); set 1")
        return self


class EvalConfig(_Strict):
    nfes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    solvers: list[SolverName] = Field(default_factory=lambda: ["euler"])
    grid: TimeGrid = Field(default_factory=UniformGrid, description="uniform, {kind: rho, rho, per_nfe} or "
                                                                       "{kind: list, times} (Simple ReFlow #7)")
    n_samples: int = Field(2_000, ge=16)
    straightness_steps: int = Field(64, ge=2)
    inception_weights: str | None = Field(None, description="local Inception weights for FID (offline use)")
    seed: int = 2024
    models: list[str] | None = Field(None, description="which models to evaluate: teacher, reflow, reflow-2, ...; "
                                                       "None = every model the run trains")
    # guidance: v = v_guide + w (v_cond - v_guide); a guided velocity costs 2 network evaluations
    guidance: Literal["none", "cfg", "autoguidance"] = Field(
        "none", description="cfg: guide = same net with the null label; autoguidance: guide = a weaker checkpoint")
    guidance_weight: float = Field(1.0, ge=0.0, le=20.0, description="w; 1 = the conditional model, 0 = the guide")
    guide_checkpoint: str | None = Field(None, description="autoguidance's weaker model; default: teacher/guide.pt "
                                                           "(teacher EMA at 1/4 of training)")

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if not self.nfes or any(n < 1 for n in self.nfes):
            raise ValueError(f"eval.nfes must be a non-empty list of positive ints, got {self.nfes}")
        if self.models is not None and not self.models:  # (which names a run trains: its plan, stages.model_names)
            raise ValueError("eval.models must name models of the run (teacher, reflow, reflow-2, ...), got []")
        if isinstance(self.grid, ListGrid):
            per = 2 if self.guidance != "none" else 1
            steps = self.grid.steps
            for s in self.solvers:
                want = per * (steps if s == "euler" else 2 * steps - 1)
                bad = [n for n in self.nfes if n != want]
                if bad:
                    raise ValueError(f"eval.grid.times has {steps} steps, so {s} costs {want} NFE; eval.nfes has {bad}")
        return self


class TrackingConfig(_Strict):
    mlflow_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI, else sqlite under the run root")
    experiment: str = "reflow"


class PipelineConfig(_Strict):
    name: str = Field("toy2d", pattern=r"^[A-Za-z0-9_.-]{1,100}$", description="the default run name")
    data: DataConfig = Field(default_factory=DataConfig)
    net: NetConfig = Field(default_factory=NetConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    reflow: ReflowConfig = Field(default_factory=ReflowConfig)
    distill: DistillConfig | None = Field(None, description="a one-step student after the last reflow round")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        if self.name in (".", ".."):
            raise ValueError(f"name {self.name!r} is not a run name (it would leave the run root)")
        if self.data.name == "toy2d" and self.net.kind != "mlp":
            raise ValueError("net.kind must be 'mlp' for data.name='toy2d'")
        if self.data.name != "toy2d" and self.net.kind != "unet":
            raise ValueError(f"net.kind must be 'unet' for image data (data.name={self.data.name!r})")
        if self.pairs.n_forward == 0 and self.reflow.forward_ratio > 0:
            raise ValueError("reflow.forward_ratio > 0 needs pairs.n_forward > 0")
        if self.distill is not None and self.distill.net is not None and self.data.name == "toy2d" \
                and self.distill.net.kind != "mlp":
            raise ValueError("distill.net.kind must be 'mlp' for data.name='toy2d'")
        return self

    def identity(self) -> dict:
        """The parts that define what a run's artifacts *are*; a changed identity under a run name is refused.

        data, net, teacher, pairs, reflow and distill, less every field typed `Exec[...]` (speed and placement only, e.g. a
        resume on other workers). eval and tracking are not part of it: evaluation is redone when its settings
        differ."""
        return _identity(self, ("data", "net", "teacher", "pairs", "reflow", "distill"))


def _identity(model: BaseModel, fields) -> dict:
    out = {}
    for name in fields:
        f = type(model).model_fields[name]
        if is_execution_only(f):
            continue
        value = getattr(model, name)
        out[name] = (_identity(value, type(value).model_fields) if isinstance(value, BaseModel)
                     else _dump(value))
    return out


def _dump(value):
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


class ConfigError(ValueError):
    """A preset or override that does not validate; the message names the field."""


_GRID_KINDS = ("uniform", "rho", "list")


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        parts = [str(p) for p in e["loc"]]
        # a tagged union puts the tag into the location (pairs.grid.rho.rho0); the field path is pairs.grid.rho0
        parts = [p for i, p in enumerate(parts) if not (i and parts[i - 1] == "grid" and p in _GRID_KINDS)]
        loc = ".".join(parts) or "(root)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def _legacy_grids(raw: dict) -> dict:
    """Configs written before the time grid became one tagged union (flat `grid`, `rho`, `rhos`, `times` fields)
    read as the union, so an existing run reopens with the same identity."""
    if not isinstance(raw, dict):
        return raw  # not a config at all: pydantic's error says so
    raw = dict(raw)
    for section in ("pairs", "eval"):
        sec = raw.get(section)
        if not isinstance(sec, dict) or not ({"rho", "rhos", "times"} & sec.keys()) or isinstance(sec.get("grid"), dict):
            continue
        sec = dict(sec)
        kind, rho, rhos, times = sec.pop("grid", None), sec.pop("rho", None), sec.pop("rhos", None), sec.pop("times", None)
        if times is not None:
            sec["grid"] = {"kind": "list", "times": times}
        elif kind == "rho":
            per_nfe = dict(zip(sec.get("nfes", []), rhos)) if rhos is not None else None
            sec["grid"] = {"kind": "rho", **({"rho": rho} if rho is not None else {}),
                           **({"per_nfe": per_nfe} if per_nfe else {})}
        elif kind is not None:
            sec["grid"] = {"kind": kind}
        raw[section] = sec
    return raw


def validate(raw: dict, source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(_legacy_grids(raw))
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _raw_preset(name_or_path: str) -> tuple[Path, dict]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name_or_path!r}; choose one of {preset_names()} or give a YAML path")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return path, raw


def _apply(raw: dict, overrides: dict | None) -> dict:
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {'.'.join(parents[:i + 1])} is {node!r}, not a section")
        node[leaf] = value
    return raw


def load_preset(name_or_path: str, overrides: dict | None = None) -> PipelineConfig:
    """Load a preset by name (reflow_core/presets/NAME.yaml, shipped in the package) or by path, apply dotted
    overrides (any depth: `pairs.grid.rho`), validate."""
    path, raw = _raw_preset(name_or_path)
    return validate(_apply(raw, overrides), str(path))


# ---------------------------------------------------------------------------------------------------------------
# typed overrides: one optional field per leaf of the config (`teacher.train.steps`), for a flow's parameters. Its
# JSON schema carries every type and bound, so a Prefect server refuses a bad value when the run is created.


def _leaves(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            yield from _leaves(f.annotation, f"{prefix}{name}.")
        else:  # a value, a tagged union (a grid) or an optional section (set as a whole)
            yield f"{prefix}{name}", f


def _overrides_model() -> type[BaseModel]:
    fields = {}
    for path, f in _leaves(PipelineConfig):
        info = FieldInfo.merge_field_infos(f, default=None, alias=path, validation_alias=path,
                                           serialization_alias=path, alias_priority=2, title=path)
        info.default_factory = None  # unset fields stay unset: only the given keys are overrides
        fields[path.replace(".", "__")] = (f.annotation, info)
    return create_model("ConfigOverrides", __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
                        __doc__="Dotted-key overrides of the preset, each typed and bounded like the config field "
                                "it sets (`teacher.train.steps`, `pairs.n_pairs`, `eval.nfes`, ...).", **fields)


ConfigOverrides = _overrides_model()
OVERRIDE_KEYS = frozenset(f.alias for f in ConfigOverrides.model_fields.values())


def override_dict(overrides: BaseModel | dict | None) -> dict:
    """A ConfigOverrides (or a plain dict) as the dotted-key dict `load_preset` takes: only the keys given."""
    if overrides is None:
        return {}
    if isinstance(overrides, BaseModel):
        return overrides.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return dict(overrides)


def leaf_overrides(preset: str, overrides: dict | None) -> dict:
    """Overrides at any depth (`pairs.grid.rho: 2`, from `--set`) folded into the config leaves they change
    (`pairs.grid: {kind: rho, rho: 2}`), the keys `ConfigOverrides` takes. A key that is no config path is kept,
    so validation names it."""
    if not overrides:
        return {}
    _, raw = _raw_preset(preset)
    merged = _apply(raw, overrides)
    out: dict = {}
    for key in overrides:
        parts = key.split(".")
        leaf = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in OVERRIDE_KEYS),
                    None)
        if leaf is None:
            out[key] = overrides[key]
            continue
        node = merged
        for p in leaf.split("."):
            node = node[p]
        out[leaf] = node
    return out


PRESET_DIR_ENV = "REFLOW_PRESET_DIR"
# set by the CLI around its in-process flow call: the caller of `reflow run` may load any YAML it can read. A
# deployment's flow run never has it (a flow parameter would be chosen by whoever starts the run).
_ANY_PRESET_PATH: contextvars.ContextVar[bool] = contextvars.ContextVar("reflow_any_preset_path", default=False)


@contextlib.contextmanager
def allow_any_preset_path():
    """Within this block `deployment_preset` accepts any path (the CLI's caller chose it on their own machine)."""
    token = _ANY_PRESET_PATH.set(True)
    try:
        yield
    finally:
        _ANY_PRESET_PATH.reset(token)


def deployment_preset(preset: str, env: dict | None = None) -> str:
    """The preset a flow run (over a deployment: its parameters are chosen by whoever starts it) may load: a shipped
    name (`preset_names()`), or a .yaml/.yml file under the directory named by $REFLOW_PRESET_DIR (a relative path is
    taken relative to it; both are resolved, so `..` and symlinks cannot leave it). Returns the name or the resolved
    path to pass to `load_preset`; anything else is a ConfigError naming the rule, raised before the file is read."""
    if _ANY_PRESET_PATH.get():
        return preset
    env = os.environ if env is None else env
    names = preset_names()
    if preset in names:
        return preset
    base = env.get(PRESET_DIR_ENV) or ""
    rule = (f"a flow run loads a preset by name ({', '.join(names)}) or a .yaml file under ${PRESET_DIR_ENV} "
            f"({base or 'not set'}); `reflow run --preset PATH` on the command line may load any file")
    if not isinstance(preset, str) or not preset or "\x00" in preset:
        raise ConfigError(f"preset {preset!r} refused: {rule}")
    if not base:
        raise ConfigError(f"preset {preset!r} refused: not a shipped preset name and ${PRESET_DIR_ENV} is not set; "
                          f"{rule}")
    root = Path(base).resolve()
    path = (root / preset).resolve()  # an absolute preset replaces root; `..` and symlinks are resolved
    if not path.is_relative_to(root) or path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"preset {preset!r} refused: it resolves to {path}, not a .yaml file under {root}; {rule}")
    return str(path)


def reference_markdown() -> str:
    """docs/configuration.md, generated from the models so the reference cannot drift from the code."""
    out = ["# Configuration reference", "",
           "Generated by `python -m reflow_core.config > docs/configuration.md` (a test checks it is current).",
           "Presets ship in the package, `reflow_core/presets/*.yaml` (`reflow presets` lists them); override any field with `--set section.field=value`.",
           "Fields marked *execution-only* decide speed or placement, not what an artifact is: a run may be reopened "
           "with them changed (`PipelineConfig.identity()` leaves them out).", ""]

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows, subs = [], []
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                subs.append((ann, f"{prefix}{name}."))
                continue
            optional = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(optional) == 1 and type(None) in get_args(ann):  # an optional section: listed, then walked
                subs.append((optional[0], f"{prefix}{name}."))
            bounds = [f"{k} {getattr(m, k)}" for m in f.metadata for k in ("ge", "gt", "le", "lt")
                      if getattr(m, k, None) is not None]
            default = f.default_factory() if f.default_factory is not None else f.default
            typ = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            typ = re.sub(r"\b[\w.]*\.(?=[A-Z]\w*(Grid|Config)\b)", "", typ)  # __main__.RhoGrid -> RhoGrid
            typ = typ.replace("|", "\\|")  # a pipe inside a table cell must be escaped, even in code
            meaning = (f.description or "").replace("|", "/") + (" *(execution-only)*" if is_execution_only(f) else "")
            rows.append(f"| `{prefix}{name}` | `{typ}` | `{default!r}` | {', '.join(bounds)} | {meaning.strip()} |")
        if rows:
            out.extend([f"## `{prefix.rstrip('.') or 'pipeline'}` ({model.__name__})", "",
                        "| field | type | default | range | meaning |", "|---|---|---|---|---|", *rows, ""])
        for sub, p in subs:
            walk(sub, p)

    walk(PipelineConfig, "")
    out.extend(["## Time grids (`pairs.grid`, `eval.grid`)", "",
                "One tagged union chosen by `kind`; a bare `uniform` or `rho` stands for that kind with its defaults. "
                "`pairs.grid` takes uniform or rho (inversion runs the same grid reversed).", ""])
    for grid in (UniformGrid, RhoGrid, ListGrid):
        walk(grid, f"grid[kind={grid.model_fields['kind'].default}].")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown())
