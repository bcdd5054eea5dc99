"""Matplotlib (Agg) figures written as PNG through fsspec (any URL ``storage`` understands).

Time convention: trajectories are stored in integration order, i.e. index 0 is the noise point (t = 1) and index
-1 the generated sample (t = 0).
"""
from __future__ import annotations

import io
import math
from collections import defaultdict
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator, ScalarFormatter  # noqa: E402

from reflow_core import storage  # noqa: E402

__all__ = ["trajectory_plot", "sample_grid", "scatter_samples", "save_samples", "quality_vs_nfe", "loss_curve",
           "save_figure", "fidelity_realism", "fidelity_realism_figure"]

_MODEL_COLORS = {"teacher": "tab:blue", "reflow": "tab:orange", "distilled": "tab:red", "slim": "tab:brown"}
_ROUND_COLORS = ("tab:green", "tab:purple", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def model_color(name: str) -> str:
    """One colour per model across all plots: teacher blue, reflow orange, reflow-2, reflow-3, ... from a palette."""
    base = name.split(" ")[0]  # "reflow-2 (1 NFE)" -> "reflow-2"
    if base in _MODEL_COLORS:
        return _MODEL_COLORS[base]
    if base.startswith("reflow-") and base[7:].isdigit():
        return _ROUND_COLORS[(int(base[7:]) - 2) % len(_ROUND_COLORS)]
    return "tab:gray"


def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Render ``fig`` to PNG in memory, write it atomically to ``path`` (fsspec URL or local path), close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    storage.atomic_write_bytes(path, buf.getvalue())
    return path


def _limits(arrays: Sequence[np.ndarray], margin: float = 0.05):
    pts = np.concatenate([a.reshape(-1, 2) for a in arrays if a is not None and a.size], axis=0)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if not len(pts):
        return (-1, 1), (-1, 1)
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - margin * span, hi + margin * span
    return (lo[0], hi[0]), (lo[1], hi[1])


def _panels(n: int, size: float = 4.0):
    fig, axes = plt.subplots(1, max(n, 1), figsize=(size * max(n, 1), size), squeeze=False)
    return fig, list(axes[0])


def trajectory_plot(
    trajs: Mapping[str, torch.Tensor],
    target: torch.Tensor | None,
    path: str,
    title: str | None = None,
    max_lines: int = 256,
) -> str:
    """One panel per model: target samples (grey, background), trajectories (thin lines), noise start points
    (index 0, t = 1) and end points (index -1, t = 0). ``trajs[name]`` has shape (T, N, 2). Returns ``path``."""
    tgt = _np(target) if target is not None else None
    arrs = {k: _np(v) for k, v in trajs.items()}
    xlim, ylim = _limits([tgt] + [a for a in arrs.values()])
    fig, axes = _panels(len(arrs))
    for ax, (name, tr) in zip(axes, arrs.items()):
        if tr.ndim != 3 or tr.shape[-1] != 2:
            raise ValueError(f"trajectory '{name}' must have shape (T, N, 2), got {tr.shape}")
        if tgt is not None:
            ax.scatter(tgt[:, 0], tgt[:, 1], s=2, c="0.75", alpha=0.5, label="target", zorder=0)
        k = min(max_lines, tr.shape[1])
        ax.plot(tr[:, :k, 0], tr[:, :k, 1], color=model_color(name), lw=0.5, alpha=0.4, zorder=1)
        ax.scatter(tr[0, :k, 0], tr[0, :k, 1], s=5, c="k", alpha=0.6, label="noise (t=1)", zorder=2)
        ax.scatter(tr[-1, :k, 0], tr[-1, :k, 1], s=5, c="tab:red", alpha=0.8, label="sample (t=0)", zorder=3)
        ax.set_title(f"{name} ({tr.shape[0] - 1} steps)")
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="upper right", fontsize=7, markerscale=2)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _make_grid(x: np.ndarray, nrow: int, pad: int = 1) -> np.ndarray:
    n, c, h, w = x.shape
    ncol = nrow
    nrows = math.ceil(n / ncol)
    grid = np.ones((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid


def sample_grid(x: torch.Tensor, path: str, nrow: int | None = None, title: str | None = None) -> str:
    """Grid of images (N, C, H, W) in [-1, 1] (C = 1 grey, C = 3 RGB); ``nrow`` images per row (default
    ceil(sqrt(N))). Returns ``path``."""
    a = _np(x)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {a.shape}")
    a = np.clip((a + 1.0) / 2.0, 0.0, 1.0)
    n, c = a.shape[:2]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    grid = _make_grid(a, nrow)
    side = min(12.0, max(3.0, 0.5 * nrow))
    fig, ax = plt.subplots(figsize=(side, side * grid.shape[1] / grid.shape[2] + (0.4 if title else 0)))
    if c == 1:
        ax.imshow(grid[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.transpose(grid[:3], (1, 2, 0)), interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def scatter_samples(
    samples: Mapping[str, torch.Tensor],
    target: torch.Tensor | None,
    path: str,
    title: str | None = None,
) -> str:
    """One panel per model with its 2-D samples (N, 2) over the target samples (grey). Returns ``path``."""
    tgt = _np(target) if target is not None else None
    arrs = {k: _np(v) for k, v in samples.items()}
    xlim, ylim = _limits([tgt] + list(arrs.values()))
    fig, axes = _panels(len(arrs))
    for ax, (name, s) in zip(axes, arrs.items()):
        if tgt is not None:
            ax.scatter(tgt[:, 0], tgt[:, 1], s=2, c="0.75", alpha=0.5, label="target")
        ax.scatter(s[:, 0], s[:, 1], s=2, c=model_color(name), alpha=0.6, label=name)
        ax.set_title(name)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_samples(x: torch.Tensor, path: str, title: str | None = None) -> str:
    """Samples as a picture: images (N, C, H, W) as a grid, 2-D points (N, 2) as a scatter. Returns ``path``."""
    if _np(x).ndim == 2:
        return scatter_samples({"samples": x}, None, path, title)
    return sample_grid(x, path, title=title)


def quality_vs_nfe(rows: Sequence[Mapping], metric: str, path: str, title: str | None = None) -> str:
    """One line per (model, solver): x = NFE on a log2 axis, y = ``rows[i][metric]``.

    Rows look like ``{"model": "teacher", "nfe": 8, "solver": "euler", metric: 0.12}``; rows missing the metric
    (or with a None / non-finite value) are skipped. Returns ``path``.
    """
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        v = r.get(metric)
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(v):
            continue
        series[(str(r.get("model", "")), str(r.get("solver", "")))].append((int(r["nfe"]), v))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    styles = ["-", "--", ":", "-."]
    solvers = sorted({s for _, s in series})
    nfes: set[int] = set()
    for (model, solver), pts in sorted(series.items()):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        nfes.update(xs)
        ax.plot(
            xs, ys, marker="o", ms=4,
            linestyle=styles[solvers.index(solver) % len(styles)],
            color=model_color(model),
            label=f"{model} / {solver}" if solver else model,
        )
    values = [v for pts in series.values() for _, v in pts]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")  # a 1-NFE teacher 10x worse than the rest would flatten every other curve
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if max(values) / min(values) < 30 else NullFormatter())
    if nfes:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(nfes)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no values for '{metric}'", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{metric} vs NFE")
    return save_figure(fig, path)


def _curve(rows: Sequence[Mapping], knob: str, fd: str) -> list[tuple[float, float, float]]:
    """(knob value, PSNR, FD) of the rows holding all three as finite numbers, sorted by the knob."""
    pts = []
    for r in rows:
        try:
            k, x, y = float(r[knob]), float(r["psnr"]), float(r[fd])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            pts.append((k, x, y))
    return sorted(pts)


def fidelity_realism_figure(teacher: Sequence[Mapping], student: Sequence[Mapping], fd: str = "fd",
                            title: str | None = None):
    """The fidelity-realism figure: x = PSNR (higher = more faithful), y = the Frechet distance ``fd`` (lower = more
    realistic). The teacher's curve joins its rows by NFE (each point labelled "NFE n"), the student's by knob
    (labelled "knob k"; OFTSR's orientation: near 0 = fidelity end, near 1 = realism end). Rows are dicts such as
    ``{"nfe": 8, "psnr": 21.3, "fd": 4.1}`` / ``{"knob": 0.25, ...}``; rows missing a value are skipped."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, rows, knob, fmt, style in (("teacher", teacher, "nfe", "NFE {:g}", "o-"),
                                         ("student", student, "knob", "knob {:g}", "s--")):
        pts = _curve(rows, knob, fd)
        if not pts:
            continue
        color = model_color("teacher" if name == "teacher" else "distilled")
        label = "teacher (NFE)" if name == "teacher" else "student, 1 NFE (knob)"
        ax.plot([p[1] for p in pts], [p[2] for p in pts], style, ms=4, color=color, label=label)
        for k, x, y in pts:
            ax.annotate(fmt.format(k), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no rows with psnr and {fd}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("PSNR (dB, peak 2 on [-1, 1]) \u2192 fidelity")
    ax.set_ylabel(f"{fd} (lower = more realistic)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "fidelity-realism trade-off")
    return fig


def fidelity_realism(teacher: Sequence[Mapping], student: Sequence[Mapping], path: str, fd: str = "fd",
                     title: str | None = None) -> str:
    """`fidelity_realism_figure` written as PNG to ``path``; returns ``path``."""
    return save_figure(fidelity_realism_figure(teacher, student, fd, title), path)


def loss_curve(steps, values, path: str, title: str | None = None, logy: bool | None = None) -> str:
    """Training loss against step. ``values`` may be a sequence or a dict ``{name: sequence}`` (several curves
    sharing ``steps``). Log-scale y by default when all values are > 0. Returns ``path``."""
    curves = dict(values) if isinstance(values, Mapping) else {"loss": values}
    xs = _np(steps).reshape(-1)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    all_pos = True
    for name, vals in curves.items():
        ys = _np(vals).reshape(-1)
        all_pos = all_pos and bool(ys.size) and bool(np.all(ys[np.isfinite(ys)] > 0))
        ax.plot(xs[: len(ys)], ys, lw=1, label=name)
    if (logy is None and all_pos) or logy:
        ax.set_yscale("log")
    if len(curves) > 1:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
