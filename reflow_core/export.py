"""A trained model as files its users load without pickle: safetensors weights plus JSON, and a diffusers folder.

    save_weights(ckpt_url, out_dir, config)   out_dir/model.safetensors (EMA weights), model.json, config.json
    load_weights(out_dir)                     -> VelocityModel (eval mode), no torch.load, no unpickling
    write_diffusers(ckpt_url, out_dir, config) a folder `DiffusionPipeline.from_pretrained(out_dir,
                                              trust_remote_code=True)` loads (diffusers is imported here only)
    draw(model, noise, nfe, ...)              samples as `reflow sample` draws them (labels, guidance, clamping)

`model.json` holds what rebuilds the net: the checkpoint's meta (net config, per-sample shape, class count) and the
time convention; `config.json` is the run's validated PipelineConfig, for the record. Local directories only.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from .paths import CONVENTION
from .rng import label_seed
from .velocity import VelocityModel, generate, velocity_model_from_state

__all__ = ["WEIGHTS", "META", "CONFIG", "FORMAT", "save_weights", "load_weights", "read_meta", "is_image",
           "default_labels", "draw", "write_diffusers"]

WEIGHTS, META, CONFIG = "model.safetensors", "model.json", "config.json"
FORMAT = "reflow-velocity/1"


def _checkpoint_model(ckpt_url: str) -> tuple[VelocityModel, dict]:
    from . import checkpoint  # weights_only loads (the checkpoint's own rule)

    state = checkpoint.load(ckpt_url)
    return velocity_model_from_state(state, ema=True), dict(state["meta"])


def save_weights(ckpt_url: str, out_dir: str | Path, config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The EMA weights of a checkpoint as `model.safetensors` and its meta as `model.json` (plus the run's
    `config.json` when given) under out_dir. Returns {file kind: path}."""
    from safetensors.torch import save_file

    model, meta = _checkpoint_model(ckpt_url)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT, "convention": CONVENTION})
    (out / META).write_text(json.dumps({"format": FORMAT, "convention": CONVENTION, "meta": meta}, indent=2))
    files = {"weights": str(out / WEIGHTS), "meta": str(out / META)}
    if config is not None:
        (out / CONFIG).write_text(json.dumps(dict(config), indent=2))
        files["config"] = str(out / CONFIG)
    return files


def read_meta(model_json: str | Path) -> dict:
    """The checkpoint meta stored in a `model.json` (net, shape, num_classes); ValueError for another format."""
    doc = json.loads(Path(model_json).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{model_json} is not a {FORMAT} model description (format {doc.get('format')!r})")
    return doc["meta"]


def load_weights(model_dir: str | Path | None = None, *, weights: str | Path | None = None,
                 meta: str | Path | None = None, device: str | torch.device = "cpu") -> VelocityModel:
    """The VelocityModel of a `save_weights` directory (or of its two files given apart), in eval mode. Reads
    JSON and safetensors only: nothing is unpickled."""
    from safetensors.torch import load_file

    weights = Path(weights) if weights else Path(model_dir) / WEIGHTS
    meta = Path(meta) if meta else Path(model_dir) / META
    state = {"meta": read_meta(meta), "ema": load_file(str(weights))}
    return velocity_model_from_state(state, ema=True, device=device)


def is_image(meta: Mapping[str, Any]) -> bool:
    """Images are (C, H, W) per sample; toy data is a vector."""
    return len(meta["shape"]) == 3


def default_labels(model: VelocityModel, n: int, seed: int) -> torch.Tensor | None:
    """Labels for a class-conditional model sampled without any: uniform over the classes, from seed + 1 (as the
    evaluation draws them), never the untrained "no label" row. None for an unconditional model."""
    if not model.class_cond:
        return None
    return torch.randint(model.num_classes, (n,), generator=torch.Generator().manual_seed(label_seed(seed)))


def draw(model: VelocityModel, noise: torch.Tensor, nfe: int, solver: str = "euler", *,
         labels: torch.Tensor | None = None, guidance: str = "none", weight: float = 1.0,
         image: bool = False) -> torch.Tensor:
    """Samples from noise with nfe network evaluations (guided: 2 a step), images clamped to [-1, 1]."""
    x = generate(model, noise, nfe, solver, label=labels, guidance=guidance, weight=weight)
    return x.clamp(-1, 1) if image else x


# --- diffusers ------------------------------------------------------------------------------------------------------

PIPELINE_FILE = "pipeline.py"
COMPONENT = "velocity"
COMPONENT_FILE = "reflow_velocity.py"


def write_diffusers(ckpt_url: str, out_dir: str | Path, config: Mapping[str, Any] | None = None) -> str:
    """A diffusers pipeline folder of a checkpoint's EMA model: `model_index.json`, `velocity/` (config +
    safetensors of `ReflowVelocityNet`), `scheduler/` (FlowMatchEulerDiscreteScheduler, shift 1, 1000 train
    timesteps) and the pipeline code (`reflow_core/diffusers_pipeline.py`, copied in). Returns out_dir."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from . import diffusers_pipeline as dp

    model, meta = _checkpoint_model(ckpt_url)
    if meta["net"].get("kind") == "diffusion_vp":
        raise ValueError("a diffusers teacher is already a diffusers model; export a reflow or distilled model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = dp.ReflowVelocityNet(net=meta["net"], shape=list(meta["shape"]),
                               num_classes=int(meta.get("num_classes", 0)) if model.class_cond else 0)
    net.model.load_state_dict(model.state_dict())
    pipe = dp.ReflowPipeline(velocity=net, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
                                                                                      shift=1.0))
    pipe.save_pretrained(str(out), safe_serialization=True)
    source = Path(dp.__file__)
    shutil.copyfile(source, out / PIPELINE_FILE)
    shutil.copyfile(source, out / COMPONENT / COMPONENT_FILE)
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = [PIPELINE_FILE[:-3], "ReflowPipeline"]
    index[COMPONENT] = [COMPONENT_FILE[:-3], "ReflowVelocityNet"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (out / CONFIG).write_text(json.dumps(dict(config), indent=2))
    return str(out)
