"""The flow's parameters: typed config overrides (one field per config leaf, so a Prefect server refuses a bad value
when a run is created), the settings only orchestration reads (shard engine, Dask address, MLflow tracking), and
which preset a deployment's flow run may load."""
from __future__ import annotations

import contextlib
import contextvars
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from reflow_core.config import ORCHESTRATION_KEYS, ConfigError, PipelineConfig
from reflow_core.preset import apply_overrides, preset_names, raw_preset


class Orchestration(BaseModel):
    """Where and how the flow runs a pipeline, not what it computes: a run may resume with any of these changed.
    Set like config fields (`--set pairs.engine=dask`, a preset's `tracking:` section, a deployment's overrides)."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["threads", "dask"] = Field(
        "threads", description="shard fan-out in the Prefect flow: threads on this machine (one GPU per worker, "
        "round-robin) or a Dask cluster through prefect-dask (pip install -e '.[dask]')")
    dask_address: str | None = Field(
        None, description="engine='dask': scheduler address (tcp://host:8786); None = a LocalCluster of "
        "`pairs.workers` processes with one thread each. Credentials never go here: workers read their environment")
    mlflow_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI, else sqlite under the run root")
    experiment: str = "reflow"
    system_metrics: bool = Field(False, description="MLflow system metrics (CPU, memory, disk, network; GPU when "
                                 "pynvml is installed) sampled every 5 s into the pipeline's parent run while it runs")


# the dotted key each setting is given by (the key it had in the config schema, so old configs keep working)
KEYS = dict(zip(ORCHESTRATION_KEYS, ("engine", "dask_address", "mlflow_uri", "experiment", "system_metrics")))


def orchestration(preset: str, overrides: dict | None = None) -> Orchestration:
    """The orchestration settings of a preset with overrides (any depth, as `load_preset` takes them)."""
    _, raw = raw_preset(preset)
    merged = apply_overrides(raw, overrides)
    given = {}
    for key, name in KEYS.items():
        node = merged
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if node != {}:
            given[name] = node
    try:
        return Orchestration.model_validate(given)
    except ValidationError as err:
        raise ConfigError(f"{preset}: orchestration settings: {err}") from None


# --- typed overrides --------------------------------------------------------------------------------------------------

def _leaves(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            yield from _leaves(f.annotation, f"{prefix}{name}.")
        else:  # a value, a tagged union (a grid) or an optional section (set as a whole)
            yield f"{prefix}{name}", f


def _overrides_model() -> type[BaseModel]:
    fields = {}
    for path, f in [*_leaves(PipelineConfig), *((k, Orchestration.model_fields[v]) for k, v in KEYS.items())]:
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
    _, raw = raw_preset(preset)
    merged = apply_overrides(raw, overrides)
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


# --- which presets a flow run may load -------------------------------------------------------------------------------
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
