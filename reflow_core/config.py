"""Validated configuration for every stage of the ReFlow pipeline.

Every model forbids unknown keys, so a typo in a preset fails before any work starts, with pydantic's
message naming the field and the allowed values.
"""
from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .migrations import ORCHESTRATION_KEYS, legacy_grids, without_orchestration

# presets ship inside the package (package data), so a non-editable install (a Docker image) has them

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
# function of the step, so none of these settings changes an artifact's values (tests/core/test_pairs.py, test_stages.py).
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


class SRConfig(_Strict):
    """Super-resolution (OFTSR): the condition c = A^T (A x + sigma_y n) and the source (t = 1 end)
    sqrt(1 - sigma_p^2) c + sigma_p eps replace N(0, I) noise; a held-out split is kept for evaluation."""

    scale: int = Field(2, ge=2, le=16, description="low-res side = image_size / scale")
    degradation: Literal["avgpool", "bicubic"] = "avgpool"
    sigma_p: float = Field(0.2, ge=0.0, le=1.0, description="source noise: the VP mix of c and N(0, I)")
    sigma_y: float = Field(0.0, ge=0.0, le=1.0, description="measurement noise on the low-res image")


class DataConfig(_Strict):
    """Where the data (t = 0 end) comes from. The noise (t = 1 end) is N(0, I), or the SR source with `sr`."""

    name: Literal["toy2d", "digits", "natural32", "cifar10", "imagefolder"] = "toy2d"
    toy: ToyName = "8gaussians"
    n_train: int = Field(50_000, ge=16, description="toy: points drawn once; natural32: crops; others: cap")
    image_size: int = Field(8, ge=4, le=256, description="digits: 8 or 16; imagefolder: resize")
    path: str | None = Field(None, description="cifar10 / imagefolder: local path or fsspec URL")
    download: bool = True
    seed: int = 0
    sr: SRConfig | None = Field(None, description="super-resolution: condition on the degraded image (digits, "
                                                  "natural32; held-out split for evaluation)")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.sr is not None and self.name not in ("digits", "natural32"):
            raise ValueError(f"data.sr needs data.name digits or natural32 (a held-out split), got {self.name!r}")
        if self.sr is not None and self.image_size % self.sr.scale:
            raise ValueError(f"data.sr.scale={self.sr.scale} must divide data.image_size={self.image_size}")
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
    cond_channels: int = Field(0, ge=0, le=64, description="image condition channels concatenated to x (0 = none)")

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
    zarr_shards: bool = Field(False, description="zarr 3 sharding codec: one object per pair shard holding its chunks")
    compress: bool = Field(False, description="zstd-compress noise/sample chunks (random floats barely compress)")
    guidance: Literal["none", "cfg"] = Field("none", description="cfg: simulate with classifier-free guidance "
                                             "(class-conditional net; each solver NFE costs 2 network evaluations)")
    guidance_weight: float = Field(1.0, ge=0.0, le=20.0, description="CFG's w with guidance=cfg (1 = conditional)")

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
        if self.guidance == "none" and self.guidance_weight != 1.0:
            raise ValueError("pairs.guidance_weight is CFG's weight: it needs pairs.guidance='cfg'")
        return self


class ReflowConfig(_Strict):
    train: TrainConfig = Field(default_factory=TrainConfig)
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="reflow dropout (Simple ReFlow #4); None = teacher's")
    forward_ratio: float = Field(0.0, ge=0.0, le=1.0, description="fraction of each batch drawn from forward pairs")
    rounds: int = Field(1, ge=0, le=10, description="k-rectified flow: round r > 1 simulates pairs from round "
                        "r-1's reflow model (pairs-r.zarr) and fine-tunes it (reflow-r/); 0: no reflow, the distill "
                        "student learns the teacher's pairs (InstaFlow's ablation; needs distill)")
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
    method: Literal["pairs", "oftsr"] = Field("pairs", description="pairs: on the teacher's stored pairs; oftsr: "
                                              "OFTSR's knob student from the teacher directly (needs data.sr)")
    knob_delta: float = Field(0.05, gt=0.0, lt=0.5, description="oftsr: the knob step one teacher step spans")
    boundary_weight: float = Field(0.1, ge=0.0, description="oftsr: weight of the boundary term at the source")
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
        if self.method == "oftsr" and (self.net is not None or self.fgd_weight > 0):
            raise ValueError("distill.method='oftsr' trains the teacher-sized student alone: no net, anneal or fgd")
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
    knobs: list[float] = Field(default_factory=lambda: [0.01, 0.25, 0.5, 0.75, 0.99], description="SR: the oftsr "
                               "student's knob values (0 = fidelity end, 1 = realism end)")
    draws: int = Field(4, ge=1, le=64, description="SR: source noise draws per held-out low-res image")
    lpips: bool = Field(False, description="SR: also LPIPS (needs the lpips extra and its weights on disk)")

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if not self.nfes or any(n < 1 for n in self.nfes):
            raise ValueError(f"eval.nfes must be a non-empty list of positive ints, got {self.nfes}")
        if any(not 0.0 <= k <= 1.0 for k in self.knobs):
            raise ValueError(f"eval.knobs must lie in [0, 1], got {self.knobs}")
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


class PipelineConfig(_Strict):
    name: str = Field("toy2d", pattern=r"^[A-Za-z0-9_.-]{1,100}$", description="the default run name")
    data: DataConfig = Field(default_factory=DataConfig)
    net: NetConfig = Field(default_factory=NetConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    reflow: ReflowConfig = Field(default_factory=ReflowConfig)
    distill: DistillConfig | None = Field(None, description="a one-step student after the last reflow round")
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        if self.name in (".", ".."):
            raise ValueError(f"name {self.name!r} is not a run name (it would leave the run root)")
        if self.data.name == "toy2d" and self.net.kind != "mlp":
            raise ValueError("net.kind must be 'mlp' for data.name='toy2d'")
        if self.data.name != "toy2d" and self.net.kind != "unet":
            raise ValueError(f"net.kind must be 'unet' for image data (data.name={self.data.name!r})")
        if self.reflow.rounds == 0 and self.distill is None:
            raise ValueError("reflow.rounds: 0 trains no reflow model: it needs a distill section (the student)")
        sr, oftsr = self.data.sr is not None, self.distill is not None and self.distill.method == "oftsr"
        if sr and self.net.cond_channels != 3 - 2 * (self.data.name == "digits"):
            raise ValueError("data.sr needs net.cond_channels = the images' channels (digits 1, natural32 3)")
        if not sr and self.net.cond_channels:
            raise ValueError("net.cond_channels > 0 needs a condition: data.sr")
        if oftsr and not sr:
            raise ValueError("distill.method='oftsr' and data.sr go together: OFTSR's student needs data.sr")
        if sr and self.distill is not None and not oftsr:  # the pairs student has no image condition yet
            raise ValueError("data.sr: distill.method='oftsr' and data.sr go together (distill.method='pairs' has no "
                             "conditional student); set distill.method: oftsr, or drop distill with reflow.rounds >= 1")
        if self.pairs.guidance == "cfg" and not self.net.class_cond:
            raise ValueError("pairs.guidance='cfg' needs a class-conditional net (net.class_cond: true)")
        if self.pairs.n_forward == 0 and self.reflow.forward_ratio > 0:
            raise ValueError("reflow.forward_ratio > 0 needs pairs.n_forward > 0")
        if self.distill is not None and self.distill.net is not None and self.data.name == "toy2d" \
                and self.distill.net.kind != "mlp":
            raise ValueError("distill.net.kind must be 'mlp' for data.name='toy2d'")
        return self

    def identity(self) -> dict:
        """The parts that define what a run's artifacts *are*; a changed identity under a run name is refused.

        data, net, teacher, pairs, reflow and distill, less every field typed `Exec[...]` (speed and placement only, e.g. a
        resume on other workers). eval is not part of it: evaluation is redone when its settings
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


def validate(raw: dict, source: str = "config") -> PipelineConfig:
    """A config dict as the schema, after the migrations that keep old configs loading (flat grid fields, the
    orchestration settings). ConfigError names every problem and the source."""
    try:
        return PipelineConfig.model_validate(legacy_grids(without_orchestration(raw)))
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None
