"""A trained model leaves the pipeline as an MLflow pyfunc sampler: logged without pickle, registered with
descriptions, `@champion` moved only by a better headline metric.

    log_sampler(tracker, run_id, checkpoint_url, config_json, name, headline, description) -> version | None

What is logged (into the model's evaluation run, name "model"): `flows/sampler_model.py` as the model's code
("models from code"), the EMA weights as safetensors, model.json and the run's config.json as artifacts, the
`reflow_core` package as `code_paths` (so the model needs no `reflow` distribution from an index), pip
requirements that name only public packages at the versions running now, a signature and an input example.

Aliases: MLflow resolves `models:/<name>@latest` to the newest version itself (the alias name is reserved); this
module sets `@champion`, moved to a new version only when its headline metric (lower is better) beats the
champion's, the reason kept as the version's tag `reflow.champion_reason`.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import reflow_core
from flows.tracking import MlflowTracker, new_client
from reflow_core import export, storage

if TYPE_CHECKING:
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature

# mlflow, pandas and numpy are imported by the functions that use them: the flow process imports this module for
# `headline` and `version_description`, and logs the model where its MLflow store is (flows/tracking_process.py)

SAMPLER_FILE = Path(__file__).with_name("sampler_model.py")
CHAMPION = "champion"
METRIC_TAG, VALUE_TAG, REASON_TAG = "reflow.metric", "reflow.metric_value", "reflow.champion_reason"
# what reflow_core's model loading imports, plus the serving stack; all on PyPI
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pydantic", "pyyaml", "safetensors", "fsspec")


def requirements() -> list[str]:
    """The logged model's pip requirements: public packages at the versions running now (the project's own code
    travels with the model, so no `reflow==...` pin that no index has)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in REQUIREMENTS]


def signature(meta: Mapping[str, Any], guidance: str = "none", weight: float = 1.0) -> ModelSignature:
    """Inputs: optional `noise` (flattened), `n`, `seed`, `label`; params nfe, solver, guidance, guidance_weight;
    output (n, D) float32 samples."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, TensorSpec

    d = math.prod(meta["shape"])
    inputs = Schema([ColSpec(Array(DataType.double), "noise", required=False),
                     ColSpec(DataType.long, "n", required=False), ColSpec(DataType.long, "seed", required=False),
                     ColSpec(DataType.long, "label", required=False)])
    params = ParamSchema([ParamSpec("nfe", DataType.long, 1), ParamSpec("solver", DataType.string, "euler"),
                          ParamSpec("guidance", DataType.string, guidance),
                          ParamSpec("guidance_weight", DataType.double, float(weight))])
    outputs = Schema([TensorSpec(np.dtype("float32"), (-1, d))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example(meta: Mapping[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Four samples from seed 0 at 1 NFE (a class-conditional model: of class 0)."""
    import pandas as pd

    example = {"n": [4], "seed": [0]}
    if int(meta.get("num_classes", 0)) and meta["net"].get("class_cond"):
        example["label"] = [0]
    return pd.DataFrame(example), {"nfe": 1, "solver": "euler"}


def log_sampler(tracker: MlflowTracker, run_id: str, checkpoint_url: str, config_json: str, registered_name: str | None,
                headline: tuple[str, float] | None = None, description: str = "") -> str | None:
    """Log the pyfunc sampler of checkpoint_url into run_id and register it under registered_name (a new version,
    then `promote`). Once per checkpoint: a run already tagged with this checkpoint is left as it is. Returns the
    registered version, if any."""
    import mlflow

    client = tracker.client
    run = client.get_run(run_id)
    if run.data.tags.get("reflow.logged_checkpoint") == checkpoint_url:
        return run.data.tags.get("reflow.registered_version")
    config = storage.read_json(config_json)
    eval_cfg = config.get("eval", {})
    guidance = eval_cfg.get("guidance", "none")
    guidance = guidance if guidance in ("none", "cfg") else "none"
    with tempfile.TemporaryDirectory(prefix="reflow-model-") as tmp:
        files = export.save_weights(checkpoint_url, tmp, config)
        meta = export.read_meta(files["meta"])
        example, params = input_example(meta)
        with tracker.active_run(run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(SAMPLER_FILE), artifacts=files,
                code_paths=[_package_copy(tmp)],
                signature=signature(meta, guidance, eval_cfg.get("guidance_weight", 1.0)),
                input_example=(example, params), pip_requirements=requirements())
            version = None
            if registered_name:
                mv = mlflow.register_model(info.model_uri, registered_name, await_registration_for=60,
                                           tags={"reflow.checkpoint": checkpoint_url})
                version = str(mv.version)
    if version:
        promote(client, registered_name, version, headline, description)
    tracker.set_tags(run_id, {"reflow.logged_checkpoint": checkpoint_url, "reflow.model_uri": info.model_uri,
                              "reflow.registered_model": registered_name or "",
                              "reflow.registered_version": version or ""})
    return version


def prepare(tracking_uri: str) -> None:
    """Load what `log_sampler` needs before it is called (the tracking process does, while the pipeline runs): its
    imports (mlflow's pyfunc, pandas) and the model registry's store of tracking_uri. Best effort: `log_sampler`
    does the same and reports its own errors."""
    try:
        import mlflow.pyfunc  # noqa: F401
        from mlflow.models import ModelSignature  # noqa: F401

        new_client(tracking_uri).search_registered_models(max_results=1)
        input_example({"shape": [2], "net": {}})  # pandas
    except Exception:  # noqa: BLE001
        pass


def _package_copy(tmp: str) -> str:
    """A copy of the reflow_core package without bytecode caches, for `code_paths`."""
    dest = Path(tmp) / "code" / "reflow_core"
    shutil.copytree(Path(reflow_core.__file__).parent, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dest)


def promote(client: mlflow.MlflowClient, name: str, version: str, headline: tuple[str, float] | None,
            description: str = "") -> bool:
    """Describe version and its registered model, record its headline metric (key, value; lower is better) as
    tags, and move `@champion` to it when it beats the current champion on the same key (or there is none). The
    reason, either way, is the version's tag `reflow.champion_reason`. Returns whether it became champion."""
    from mlflow.exceptions import MlflowException

    if description:
        client.update_model_version(name, version, description=description)
        client.update_registered_model(name, description=registry_description(name, description))
    if headline is None:
        client.set_model_version_tag(name, version, REASON_TAG, "no headline metric: @champion left as it is")
        return False
    key, value = headline
    client.set_model_version_tag(name, version, METRIC_TAG, key)
    client.set_model_version_tag(name, version, VALUE_TAG, repr(float(value)))
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None
    if champ is not None and str(champ.version) == str(version):
        return True
    old = _metric_of(champ, key)
    if champ is None or old is None:
        why = f"first version with {key} ({value:.6g})" if champ is None else \
            f"{key} = {value:.6g}; champion v{champ.version} has no {key}"
        won = True
    elif float(value) < old:
        why, won = f"{key} = {value:.6g} beats champion v{champ.version} ({old:.6g}; lower is better)", True
    else:
        why, won = f"{key} = {value:.6g} does not beat champion v{champ.version} ({old:.6g}; lower is better)", False
    if won:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, version, REASON_TAG, ("@champion: " if won else "not @champion: ") + why)
    return won


def _metric_of(mv, key: str) -> float | None:
    if mv is None or mv.tags.get(METRIC_TAG) != key or VALUE_TAG not in mv.tags:
        return None
    return float(mv.tags[VALUE_TAG])


def headline(rows: list[dict], metric: str, model: str) -> tuple[str, float] | None:
    """The model's headline metric: its quality at the fewest NFE with Euler (1 NFE in every preset), keyed as
    on the pipeline's parent run (`sliced_w2.reflow.euler.nfe1`)."""
    mine = [r for r in rows if r["model"] == model and metric in r]
    mine = [r for r in mine if r["solver"] == "euler"] or mine
    if not mine:
        return None
    r = min(mine, key=lambda r: r["nfe"])
    return f"{metric}.{model}.{r['solver']}.nfe{r['nfe']}", float(r[metric])


def version_description(preset: str, model: str, run: str, key_value: tuple[str, float] | None) -> str:
    """What a version is: preset, model, run and its headline metric."""
    what = f"{model} model of preset {preset} (run {run})"
    if key_value:
        key, value = key_value
        solver, nfe = key.split(".")[-2], key.rsplit(".nfe", 1)[-1]
        what += f"; {key} = {value:.6g} (quality at {nfe} NFE with {solver}; lower is better)"
    return (f"ReFlow {what}. A pyfunc sampler: predict({{'n': [N], 'seed': [S]}} or one flattened 'noise' row a "
            f"sample, optional 'label'; params nfe, solver, guidance, guidance_weight) -> samples.")


def registry_description(name: str, version_text: str) -> str:
    """What the registered model is, ending with its newest version's description."""
    return (f"{name}: ReFlow (rectified flow) generators of this preset and model, one version per pipeline run; "
            f"@champion is the best by the 1-NFE headline metric, @latest the newest. Newest: {version_text}")
