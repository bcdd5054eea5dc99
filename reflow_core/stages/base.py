"""What every stage shares: the stage instance, its output, the run directory and the run's data and models.

A stage instance (`Stage`) is data: its name, its kind (the module that runs it), its round, the earlier stages
whose outputs it reads, and the one artifact (a directory or a zarr store under the run directory) it writes.
`graph.plan(cfg, rundir)` makes the ordered list of them; every runner walks it through `walker.walk`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from .. import checkpoint, storage
from ..callbacks import Callback, NullCallback
from ..config import ConfigError, DataConfig, NetConfig, PipelineConfig, validate
from ..data import DataSet, load_data, load_heldout
from ..paths import CONVENTION
from ..velocity import VelocityModel, build_velocity_model, velocity_model_from_state



@dataclass(frozen=True)
class Stage:
    """One stage instance of a run's plan.

    name:     unique in the plan: teacher, pairs, reflow, pairs-2, reflow-2, ..., evaluate
    kind:     the kind that runs it (`kinds.KINDS`): teacher | pairs | reflow | anneal | distill | evaluate
    round:    the reflow round of pairs/reflow stages (1, 2, ...); 0 otherwise
    reads:    role -> name of the earlier stage whose output fills that role (e.g. {"model": "teacher"})
    writes:   the URL of the one artifact it owns (deleted by --redo-stage)
    model:    the name of the model it trains (teacher, reflow, reflow-2, anneal, distilled, slim), if any
    """

    name: str
    kind: str
    round: int
    reads: tuple[tuple[str, str], ...]
    writes: str
    model: str | None = None

    @property
    def inputs(self) -> dict[str, str]:
        return dict(self.reads)


@dataclass(frozen=True)
class StageOutput:
    """What a stage hands to later ones: artifact URLs by role, and a small JSON-able dict of results."""

    urls: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)


# A run name is one path component: letters, digits and . _ -, at most 100 characters, not "." or "..", so every
# path built from (root, run) stays under the root (a run name may come from anyone who can start a flow run).
# (No look-ahead, so the same pattern serves JSON schema / Rust regex engines: a flow's typed `run` parameter.)
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,98}|\.\.[A-Za-z0-9._-]{1,98}")


def check_run_name(run: str) -> str:
    if not isinstance(run, str) or not RUN_NAME.fullmatch(run):
        raise ConfigError(f"invalid run name {run!r}: a run name must match {RUN_NAME.pattern} (letters, digits, "
                          "'.', '_', '-'; 1 to 100 characters; not '.' or '..'), so its directory stays under the root")
    return run


@dataclass(frozen=True)
class RunDir:
    """Where one pipeline run keeps its artifacts; all fsspec URLs. Stage artifacts are named by the plan.

    The run name is checked here, the one place every run path is built from (`check_run_name`)."""

    root: str
    run: str

    def __post_init__(self) -> None:
        check_run_name(self.run)

    @classmethod
    def of(cls, root: str, run: str) -> "RunDir":
        return cls(root, run)

    @property
    def dir(self) -> str:
        return storage.join(self.root, self.run)

    def url(self, *parts: str) -> str:
        return storage.join(self.dir, *parts)

    @property
    def config_json(self) -> str:
        return self.url("config.json")

    def config(self) -> PipelineConfig:
        return read_run_config(self.config_json)


@dataclass
class Context:
    """What a stage runs with besides its inputs: the run's config and directory, a callback, a device."""

    cfg: PipelineConfig
    rundir: RunDir
    callback: Callback = field(default_factory=NullCallback)
    device: str | torch.device | None = None


def read_run_config(url: str) -> PipelineConfig:
    """A run's config.json, validated; a truncated/corrupt or invalid file is a ConfigError naming it."""
    try:
        raw = storage.read_json(url)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{url} is not valid JSON (truncated or corrupt: {e}); restore it, or delete it to have "
                          "`reflow run` write it again from the preset and --set options the run was started "
                          "with (or use another --run NAME)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{url}: top level must be a JSON object; restore or delete it")
    return validate(raw, url)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def prepare_run(cfg: PipelineConfig, root: str, run: str | None = None, *, new: bool = False) -> RunDir:
    """Create (or reopen) <root>/<run> and write config.json.

    Reopening a run with a different identity (`PipelineConfig.identity`) is refused: its artifacts would mix two
    configurations. `new=True` picks a fresh run name instead (<run>-2, <run>-3, ...)."""
    run = cfg.name if run is None else run
    rundir = RunDir.of(root, run)
    if storage.exists(rundir.config_json):
        changes = _diff(read_run_config(rundir.config_json).identity(), cfg.identity())
        if changes and not new:
            raise ConfigError(f"run {rundir.dir} exists with a different configuration:\n  " + "\n  ".join(changes)
                              + "\nuse another --run NAME, or --new for a fresh run name")
        if changes and new:
            k = 2
            while storage.exists(RunDir.of(root, f"{run}-{k}").config_json):
                k += 1
            return prepare_run(cfg, root, f"{run}-{k}")
    storage.write_json(rundir.config_json, cfg.model_dump(mode="json"))
    return rundir


def default_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=4)
def _data(cfg_json: str) -> DataSet:
    return load_data(DataConfig.model_validate_json(cfg_json))


def dataset(cfg: PipelineConfig) -> DataSet:
    """The run's data, loaded once per process (stages and shards in one worker share it)."""
    return _data(cfg.data.model_dump_json())


@lru_cache(maxsize=2)
def _heldout(cfg_json: str) -> DataSet:
    return load_heldout(DataConfig.model_validate_json(cfg_json))


def heldout(cfg: PipelineConfig) -> DataSet:
    """The evaluation split training never sees (data.sr)."""
    return _heldout(cfg.data.model_dump_json())


def model_meta(cfg: PipelineConfig, ds: DataSet, net: NetConfig | None = None) -> dict:
    """Stored in every checkpoint, so a checkpoint builds its model on its own (nanoGPT's model_args)."""
    sr = {} if cfg.data.sr is None else {"sr": cfg.data.sr.model_dump(mode="json")}  # how to condition it
    return {"net": (net or cfg.net).model_dump(mode="json"), "shape": list(ds.shape),
            "num_classes": ds.num_classes, "convention": CONVENTION, **sr}


def new_model(cfg: PipelineConfig, ds: DataSet, seed: int) -> VelocityModel:
    """A freshly initialised model; the init is a function of `seed` (global RNG restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_velocity_model(cfg.net, ds.shape, ds.num_classes)


def load_model(url: str, *, ema: bool = True, device: str | torch.device = "cpu") -> VelocityModel:
    """The velocity model of a checkpoint or single-file snapshot (its meta holds the net config), in eval mode."""
    return velocity_model_from_state(checkpoint.load(url), ema=ema, device=device).eval()
