"""The MLflow pyfunc sampler of a registered model, logged as "models from code": MLflow runs this file to build
the model, so loading it unpickles nothing.

Artifacts: `weights` (model.safetensors, the EMA net), `meta` (model.json: net config, per-sample shape, class
count) and `config` (the run's config.json). `reflow_core` travels with the model as code (`code_paths`).

predict(DataFrame, params) -> ndarray (n, D) of flattened samples (reshape each row to model.json's shape):
  * rows with a `noise` column: one sample per row from that noise (a flattened array of D floats);
  * otherwise the first row's `n` and `seed`: n samples from `torch.randn((n, *shape), seed)`, the noise
    `reflow sample --n N --seed S` draws, so both give the same numbers;
  * `label` (optional): per row with `noise`, or the first row's for all n; a class-conditional model without
    labels gets them drawn uniformly from seed + 1, as `reflow sample` does.
params: nfe (network evaluations; a guided step costs 2), solver (euler | heun), guidance (none | cfg),
guidance_weight.
"""
from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import torch


class ReflowSampler(mlflow.pyfunc.PythonModel):
    """Noise (or a count and a seed) and optional labels -> samples of a trained reflow model."""

    def load_context(self, context) -> None:
        from reflow_core import export

        self.model = export.load_weights(weights=context.artifacts["weights"], meta=context.artifacts["meta"])
        self.meta = export.read_meta(context.artifacts["meta"])
        self.shape = tuple(self.meta["shape"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from reflow_core import export

        p = params or {}
        guidance = str(p.get("guidance", "none"))
        if guidance not in ("none", "cfg"):
            raise ValueError(f"guidance must be 'none' or 'cfg' for a served model, got {guidance!r}")
        df = pd.DataFrame(model_input)
        seed = _first_int(df, "seed", 0)
        noise_col = df["noise"] if "noise" in df else None
        if noise_col is not None and noise_col.notna().all():
            flat = np.stack([np.asarray(v, dtype=np.float32) for v in noise_col])
            if flat.shape[1] != math.prod(self.shape):
                raise ValueError(f"each noise row must hold {math.prod(self.shape)} values (shape {self.shape}), "
                                 f"got {flat.shape[1]}")
            noise = torch.from_numpy(flat).reshape(-1, *self.shape)
            labels = _column_labels(df, len(flat))
        else:
            n = _first_int(df, "n", None)
            if n is None or n < 1:
                raise ValueError("give a `noise` column (one flattened noise vector per row) or `n` (>= 1) and "
                                 "`seed`")
            noise = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed))
            label = _first_int(df, "label", None)
            labels = None if label is None else torch.full((n,), label, dtype=torch.long)
        if labels is None:
            labels = export.default_labels(self.model, noise.shape[0], seed)
        x = export.draw(self.model, noise, int(p.get("nfe", 1)), str(p.get("solver", "euler")), labels=labels,
                        guidance=guidance, weight=float(p.get("guidance_weight", 1.0)),
                        image=export.is_image(self.meta))
        return x.reshape(x.shape[0], -1).numpy()


def _first_int(df: pd.DataFrame, column: str, default: int | None) -> int | None:
    if column not in df or pd.isna(df[column].iloc[0]):
        return default
    return int(df[column].iloc[0])


def _column_labels(df: pd.DataFrame, n: int) -> torch.Tensor | None:
    if "label" not in df or df["label"].isna().any():
        return None
    return torch.as_tensor(df["label"].to_numpy().astype(np.int64)).reshape(n)


mlflow.models.set_model(ReflowSampler())
