"""Where a run's MLflow tracking lives: the store's URI (the setting, MLFLOW_TRACKING_URI, or sqlite under a local
root), opening it, the command that shows it, and `<run dir>/mlflow_run.json`, which names the run's parent run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import fsspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reflow_core import storage

RUN_FILE = "mlflow_run.json"


class TrackingFileError(RuntimeError):
    """`<run dir>/mlflow_run.json` is unreadable or invalid; the message names it and the way out."""


class MlflowRunFile(BaseModel):
    """`<run dir>/mlflow_run.json`: the pipeline run's MLflow parent run. Validated when read: the root is shared, so
    a torn or hand-edited file must not be passed on to MLflow as a run id."""

    model_config = ConfigDict(extra="ignore")  # a later writer may add fields

    run_id: str = Field(pattern=r"^[0-9A-Za-z_-]{1,64}$")
    tracking_uri: str | None = None
    experiment_id: str | None = None
    experiment: str | None = None


def read_run_file(url: str) -> MlflowRunFile | None:
    """The validated mlflow_run.json at url, None when there is none yet; TrackingFileError when it is torn or
    invalid (naming the file and the fix: delete it; the run's artifacts do not depend on it)."""
    if not storage.exists(url):
        return None
    try:
        return MlflowRunFile.model_validate_json(storage.read_bytes(url))
    except (ValidationError, ValueError, OSError) as e:
        detail = str(e).replace("\n", " ")[:300]
        raise TrackingFileError(
            f"{url} is unreadable or invalid ({type(e).__name__}: {detail}); delete it to start a new MLflow "
            f"parent run for this pipeline run (the run's artifacts, checkpoints and pairs are unaffected and are "
            f"resumed as usual)") from None


def local_path(root: str) -> Path:
    """The absolute local path of a local root (`./runs`, `/abs`, `file:///abs`)."""
    _, path = fsspec.core.url_to_fs(root)
    return Path(path).resolve()


def resolve_tracking_uri(config_uri: str | None, root: str) -> str:
    """`tracking.mlflow_uri` if set, else `MLFLOW_TRACKING_URI`, else a sqlite store under a local root."""
    if config_uri:
        return config_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if storage.is_local(root):
        path = local_path(root)
        path.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path / 'mlflow.db'}"
    print(
        f"warning: run root {root} is remote and neither tracking.mlflow_uri nor MLFLOW_TRACKING_URI is set; "
        "logging MLflow runs to sqlite:///./mlruns.db on this machine (use a shared `mlflow server` instead)",
        file=sys.stderr,
    )
    return "sqlite:///./mlruns.db"


def open_store(uri: str) -> None:
    """Open (for a new sqlite file: create) the tracking store now. MLflow keeps the store per URI for the rest of
    the process, so the run's own client finds it ready. With a tracking process started (`reflow run`,
    flows/tracking_process.py) that process opens it, in the background, and this process never imports mlflow."""
    from flows import tracking_process

    if tracking_process.open_store_in_process(uri):
        return
    import mlflow

    mlflow.MlflowClient(tracking_uri=uri)


def ui_command(uri: str) -> str:
    """The mlflow command that shows a tracking store in the MLflow UI (what `reflow ui` runs)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}  (an MLflow server is already serving this store)"
    return f"mlflow ui --backend-store-uri {uri}"


def ui_hint(uri: str, root: str) -> str:
    """What a finished run tells its user to type to see it in MLflow: `reflow ui` (with the path of the `reflow`
    next to this interpreter, e.g. `.venv/bin/reflow`: neither `reflow` nor `mlflow` is on PATH after `make demo`)
    with `--root` when the store is the root's own, else `--uri`; a server's address as it is."""
    if uri.startswith(("http://", "https://")):
        return ui_command(uri)
    exe = Path(sys.executable).parent / "reflow"
    reflow = os.path.relpath(exe) if exe.exists() and not os.path.relpath(exe).startswith("..") else \
        (str(exe) if exe.exists() else "reflow")
    own = storage.is_local(root) and uri == f"sqlite:///{local_path(root) / 'mlflow.db'}"
    return f"{reflow} ui --root {root}" if own else f"{reflow} ui --uri {uri}"
