"""What a finished pipeline run shows its user: a terminal table, and Prefect artifacts (a metric table, a summary
with the sample grids and plots, a link to the MLflow run) on the flow run's page.

    print(summary_table(rows, "sliced_w2"))
"""
from __future__ import annotations

import base64
import re
from typing import Any

from reflow_core import storage

# keep an inlined image small: the artifact lives in the Prefect database
MAX_INLINE_IMAGE_BYTES = 400_000
LOWER_IS_BETTER = {"sliced_w2", "fid", "fd_digits", "mmd", "energy", "w2", "kid"}


def quality_column(rows: list[dict]) -> str:
    """The quality metric of evaluation rows: sliced_w2 (toy), fd_digits (digits) or fid (other images)."""
    return next(k for k in ("sliced_w2", "fd_digits", "fid") if k in rows[0])


def _cells(rows: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """(header, body): one line per (model, solver), one column per NFE with the quality metric, then straightness."""
    nfes = sorted({r["nfe"] for r in rows})
    by = {(r["model"], r["solver"], r["nfe"]): r for r in rows}
    straight = {r["model"]: r["straightness"] for r in rows}
    body = [[model, solver, *[f"{by[(model, solver, n)][metric]:.4g}" if (model, solver, n) in by else "-"
                              for n in nfes], f"{straight[model]:.3g}"]
            for model, solver in dict.fromkeys((r["model"], r["solver"]) for r in rows)]
    return ["model", "solver", *[f"NFE {n}" for n in nfes], "straightness"], body


def summary_table(rows: list[dict], metric: str) -> str:
    """The run at a glance, for the terminal."""
    if not rows:
        return "(no evaluation rows)"
    head, body = _cells(rows, metric)
    widths = [max(len(c) for c in col) for col in zip(head, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    better = " (lower is better)" if metric in LOWER_IS_BETTER else ""
    return "\n".join([f"{metric}{better} by model, solver and NFE:", line(head), line(["-" * w for w in widths]),
                      *map(line, body)])


def markdown_table(rows: list[dict], metric: str) -> str:
    head, body = _cells(rows, metric)
    return "\n".join(["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2),
                      *("| " + " | ".join(cells) + " |" for cells in body)])


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from free text."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:100]


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


def _inline_image(url: str) -> str | None:
    try:
        data = storage.read_bytes(url)
    except OSError:
        return None
    if len(data) > MAX_INLINE_IMAGE_BYTES:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode()


def summary_markdown(*, preset: str, run: str, run_dir: str, rows: list[dict], metric: str, images: list[str],
                     tracking_uri: str, experiment: str, experiment_id: str, mlflow_run_id: str,
                     registered: dict[str, str], ui: str) -> str:
    """The flow run's summary artifact: where things are, the metric table, the pictures, how to open MLflow."""
    link = mlflow_run_url(tracking_uri, experiment_id, mlflow_run_id)
    mlflow_line = f"[{mlflow_run_id}]({link})" if link else f"`{mlflow_run_id}` (store `{tracking_uri}`; `{ui}`)"
    lines = [f"# {preset} / {run}", "",
             f"- run directory: `{run_dir}`",
             f"- MLflow run: {mlflow_line}, experiment `{experiment}`"]
    for model, version in registered.items():
        lines.append(f"- registered model: `models:/{model}/{version}`")
    lines += ["", f"## {metric} by model, solver and NFE", "", markdown_table(rows, metric) if rows else "(none)", ""]
    for url in images:
        name = url.rsplit("/", 1)[-1]
        inline = _inline_image(url)
        lines += [f"### {name}", "", f"![{name}]({inline})" if inline else f"`{url}`", ""]
    return "\n".join(lines)


def publish(*, preset: str, run: str, run_dir: str, rows: list[dict], metric: str, images: list[str],
            tracking_uri: str, experiment: str, experiment_id: str, mlflow_run_id: str,
            registered: dict[str, str], ui: str) -> dict[str, Any]:
    """Create the flow run's Prefect artifacts: a table (`<run>-metrics`), the summary (`<run>-summary`) and, with
    an MLflow server, a link to the MLflow run (`<run>-mlflow`). Returns their ids by kind."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    ids: dict[str, Any] = {}
    table = [{k: r[k] for k in ("model", "solver", "nfe", metric, "straightness", "params") if k in r} for r in rows]
    if table:
        ids["table"] = create_table_artifact(table, key=artifact_key(run, "metrics"),
                                             description=f"{metric} per model, solver and NFE ({preset}/{run})")
    ids["markdown"] = create_markdown_artifact(
        summary_markdown(preset=preset, run=run, run_dir=run_dir, rows=rows, metric=metric, images=images,
                         tracking_uri=tracking_uri, experiment=experiment, experiment_id=experiment_id,
                         mlflow_run_id=mlflow_run_id, registered=registered, ui=ui),
        key=artifact_key(run, "summary"), description=f"{preset}/{run}: results, samples and plots")
    link = mlflow_run_url(tracking_uri, experiment_id, mlflow_run_id)
    if link:
        ids["link"] = create_link_artifact(link, link_text=f"MLflow run {mlflow_run_id}", key=artifact_key(run, "mlflow"),
                                           description="the pipeline's parent run in MLflow")
    return ids
