"""What a finished pipeline run shows its user: a terminal table, and Prefect artifacts (a metric table, a summary
with the sample grids and plots, a link to the MLflow run) on the flow run's page.

    print(summary_table(rows, "sliced_w2"))
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

from reflow_core import storage

# keep an inlined image small: the artifact lives in the Prefect database
MAX_INLINE_IMAGE_BYTES = 400_000
LOWER_IS_BETTER = {"sliced_w2", "energy", "fd_digits", "fid"}  # every quality column evaluate writes
HIGHER_IS_BETTER = {"psnr"}
SR_COLUMNS = ("psnr",)  # super-resolution rows (evaluate_sr) also carry PSNR: a second table
SR_PLOT = "fidelity_realism.png"  # evaluate_sr's PSNR-vs-Frechet plot of the teacher NFEs and student knobs


def quality_column(rows: list[dict]) -> str:
    """The quality metric of evaluation rows: sliced_w2 (toy), fd_digits (digits) or fid (other images)."""
    return next(k for k in ("sliced_w2", "fd_digits", "fid") if k in rows[0])


def extra_columns(rows: list[dict]) -> list[str]:
    """Metrics shown in tables of their own besides the quality metric: PSNR for super-resolution rows (student
    rows: solver "knob <tau>", one network call, under NFE 1)."""
    return [k for k in SR_COLUMNS if any(k in r for r in rows)]


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def _cells(rows: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """(header, body): one line per (model, solver), one column per NFE with the quality metric, then straightness."""
    nfes = sorted({r["nfe"] for r in rows})
    by = {(r["model"], r["solver"], r["nfe"]): r for r in rows}
    straight = {r["model"]: r["straightness"] for r in rows}
    body = [[model, solver, *[_fmt(by[(model, solver, n)].get(metric)) if (model, solver, n) in by else "-"
                              for n in nfes], f"{straight[model]:.3g}"]
            for model, solver in dict.fromkeys((r["model"], r["solver"]) for r in rows)]
    return ["model", "solver", *[f"NFE {n}" for n in nfes], "straightness"], body


def _better(metric: str) -> str:
    if metric in LOWER_IS_BETTER:
        return " (lower is better)"
    return " (higher is better)" if metric in HIGHER_IS_BETTER else ""


def summary_table(rows: list[dict], metric: str) -> str:
    """The run at a glance, for the terminal: the quality metric, then (super-resolution) PSNR."""
    if not rows:
        return "(no evaluation rows)"
    return "\n\n".join(_text_table(rows, m) for m in (metric, *extra_columns(rows)))


def _text_table(rows: list[dict], metric: str) -> str:
    head, body = _cells(rows, metric)
    widths = [max(len(c) for c in col) for col in zip(head, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([f"{metric}{_better(metric)} by model, solver and NFE:", line(head),
                      line(["-" * w for w in widths]), *map(line, body)])


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


@dataclass(frozen=True)
class RunResults:
    """A finished pipeline run, as its views show it."""

    preset: str
    run: str
    run_dir: str
    rows: list[dict]
    metric: str
    images: list[str]  # URLs of the evaluation's PNGs (sample grids, plots)
    tracking_uri: str
    experiment: str
    experiment_id: str
    mlflow_run_id: str
    registered: dict[str, str] = field(default_factory=dict)  # registered model name -> version

    @property
    def mlflow_url(self) -> str | None:
        return mlflow_run_url(self.tracking_uri, self.experiment_id, self.mlflow_run_id)


def summary_markdown(r: RunResults, ui: str) -> str:
    """The flow run's summary artifact: where things are, the metric table, the pictures, how to open MLflow."""
    mlflow_line = (f"[{r.mlflow_run_id}]({r.mlflow_url})" if r.mlflow_url
                   else f"`{r.mlflow_run_id}` (store `{r.tracking_uri}`; `{ui}`)")
    lines = [f"# {r.preset} / {r.run}", "",
             f"- run directory: `{r.run_dir}`",
             f"- MLflow run: {mlflow_line}, experiment `{r.experiment}`"]
    lines += [f"- registered model: `models:/{name}/{version}`" for name, version in r.registered.items()]
    lines += ["", f"## {r.metric} by model, solver and NFE", "",
              markdown_table(r.rows, r.metric) if r.rows else "(none)", ""]
    for col in extra_columns(r.rows):
        lines += [f"## {col}{_better(col)} by model, solver and NFE", "", markdown_table(r.rows, col), ""]
        if any(url.rsplit("/", 1)[-1] == SR_PLOT for url in r.images):
            lines += [f"{col} against {r.metric} for every teacher NFE and student knob (solver `knob <tau>`): "
                      f"the fidelity-realism plot, `{SR_PLOT}` below.", ""]
    for url in r.images:
        name = url.rsplit("/", 1)[-1]
        inline = _inline_image(url)
        lines += [f"### {name}", "", f"![{name}]({inline})" if inline else f"`{url}`", ""]
    return "\n".join(lines)


def publish(r: RunResults, ui: str) -> dict[str, Any]:
    """Create the flow run's Prefect artifacts: a table (`<run>-metrics`), the summary (`<run>-summary`) and, with
    an MLflow server, a link to the MLflow run (`<run>-mlflow`). Returns their ids by kind."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    ids: dict[str, Any] = {}
    table = [{k: row[k] for k in ("model", "solver", "nfe", r.metric, *SR_COLUMNS, "straightness", "params")
              if k in row} for row in r.rows]
    if table:
        shown = " and ".join([r.metric, *extra_columns(r.rows)])
        ids["table"] = create_table_artifact(table, key=artifact_key(r.run, "metrics"),
                                             description=f"{shown} per model, solver and NFE ({r.preset}/{r.run})")
    ids["markdown"] = create_markdown_artifact(summary_markdown(r, ui), key=artifact_key(r.run, "summary"),
                                               description=f"{r.preset}/{r.run}: results, samples and plots")
    if r.mlflow_url:
        ids["link"] = create_link_artifact(r.mlflow_url, link_text=f"MLflow run {r.mlflow_run_id}",
                                           key=artifact_key(r.run, "mlflow"),
                                           description="the pipeline's parent run in MLflow")
    return ids
