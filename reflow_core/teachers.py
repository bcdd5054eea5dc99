"""Pretrained diffusion models as velocities in our convention (t = 0 data, t = 1 noise, v = x_noise - x_data).

    DiffusionVelocity(model, alphas_cumprod, prediction_type)(y, t, label=None) -> v
    from_diffusers(path_or_id, prediction_type=None, subfolder=None) -> DiffusionVelocity
    weights_hash(module) -> str;  build_from_meta(meta) -> DiffusionVelocity

A discrete VP model has x_tau = alpha_tau x_data + sigma_tau eps (alpha^2 = alphabar_tau, sigma^2 = 1 - alphabar_tau).
The point x_tau is our y = x_tau / (alpha + sigma) at t = sigma / (alpha + sigma), because then
y = (1 - t) x_data + t eps exactly. For a given (y, t) the model is called at the fractional timestep index whose
log-SNR lambda = log(alpha^2 / sigma^2) equals lambda(t) = 2 log((1 - t) / t), found by linear interpolation of the
schedule's lambda table, on x_tau = (alpha + sigma) y; its prediction (epsilon / sample / v_prediction) gives
x0_hat, eps_hat and v = eps_hat - x0_hat. t outside the schedule's range [t(0), t(T-1)] is clamped to it (the model
was never trained beyond). Derivation and the DDIM == Euler identity: docs/teachers.md.

Pure torch; `diffusers` is imported only by the functions that need it (`from_diffusers`, `build_from_meta`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DiffusionVelocity", "PREDICTION_TYPES", "from_diffusers", "weights_hash", "build_from_meta",
           "log_snr_table", "timestep_for_t", "log_snr_at_timestep", "TeacherNotFoundError"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class TeacherNotFoundError(FileNotFoundError):
    """A teacher that is neither a local directory nor fetchable (offline, or a missing local path)."""


# --- the schedule in log-SNR ----------------------------------------------------------------------------------------

def log_snr_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """lambda_k = log(alphabar_k / (1 - alphabar_k)) in float64; must be strictly decreasing in k."""
    ab = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).reshape(-1)
    if ab.numel() < 2:
        raise ValueError("alphas_cumprod needs at least 2 entries")
    if not bool(torch.all((ab > 0) & (ab < 1))):
        raise ValueError("alphas_cumprod must lie strictly inside (0, 1) (a zero-terminal-SNR schedule has "
                         "alphabar = 0 at the last step, i.e. t = 1 exactly: not supported)")
    lam = torch.log(ab) - torch.log1p(-ab)
    if not bool(torch.all(lam.diff() < 0)):
        raise ValueError("the schedule's log-SNR must be strictly decreasing in the timestep index")
    return lam


def log_snr_at_timestep(lam: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """lambda at a fractional timestep index k in [0, T-1]: linear interpolation of the table (float64)."""
    k = k.to(torch.float64).clamp(0, lam.numel() - 1)
    i = k.floor().long().clamp(max=lam.numel() - 2)
    w = k - i.to(torch.float64)
    lam = lam.to(k.device)
    return torch.lerp(lam[i], lam[i + 1], w)


def timestep_for_t(lam: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fractional timestep index k, clamped lambda) for our times t (float64), the inverse of
    `log_snr_at_timestep`: lambda(t) = 2 log((1 - t) / t), clamped to [lambda_{T-1}, lambda_0]."""
    lam = lam.to(t.device)
    t = t.to(torch.float64)
    target = 2.0 * (torch.log1p(-t) - torch.log(t))   # +inf at t = 0, -inf at t = 1: clamped below
    target = target.clamp(float(lam[-1]), float(lam[0]))
    neg = -lam                                             # increasing
    i = torch.searchsorted(neg, -target, right=True).clamp(1, lam.numel() - 1) - 1
    lo, hi = lam[i], lam[i + 1]
    k = i.to(torch.float64) + (lo - target) / (lo - hi)
    return k.clamp(0, lam.numel() - 1), target


# --- the adapter ----------------------------------------------------------------------------------------------------

class DiffusionVelocity(nn.Module):
    """A discrete-VP diffusion network `model(x_tau, timestep[, class_labels=...])` as our velocity v(y, t, label).

    prediction_type: what the network predicts ("epsilon", "sample" = x0, or "v_prediction",
        v = alpha eps - sigma x0). alphas_cumprod: the training schedule's alphabar table (1-D, T entries).
    class_conditional: pass `label` as `class_labels` (default: the model has a class embedding, e.g. a diffusers
        UNet2DModel with `num_class_embeds`). Without it labels are ignored. A class-conditional model needs labels:
        wrap it in `velocity.VelocityModel(adapter, num_classes)` with num_class_embeds = num_classes + 1 so the
        null row (index num_classes) is CFG's "no label", or pass labels yourself.
    The parameters and state dict are the wrapped model's (keys prefixed `model.`), so it can be fine-tuned; the
    schedule is not in the state dict (it is in `config()`).
    Output: float32, or float64 when y is float64 (exactness checks); the schedule algebra is always float64.
    """

    def __init__(self, model: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", *,
                 class_conditional: bool | None = None, scheduler_config: dict | None = None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
        self.model = model
        self.prediction_type = prediction_type
        self._ab = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).reshape(-1).clone()
        self._lam = log_snr_table(self._ab)
        self._lam_cache: dict[torch.device, torch.Tensor] = {}
        if class_conditional is None:
            class_conditional = getattr(model, "class_embedding", None) is not None
        self.class_conditional = bool(class_conditional)
        self.scheduler_config = _jsonable(dict(scheduler_config)) if scheduler_config else None

    @property
    def num_train_timesteps(self) -> int:
        return int(self._ab.numel())

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._ab.clone()

    def t_range(self) -> tuple[float, float]:
        """[t_min, t_max]: our times of timestep 0 and T-1; t outside is clamped to this range."""
        a, s = self._ab.sqrt(), (1 - self._ab).sqrt()
        t = s / (a + s)
        return float(t[0]), float(t[-1])

    def _lam_on(self, device: torch.device) -> torch.Tensor:
        lam = self._lam_cache.get(device)
        if lam is None:
            lam = self._lam_cache[device] = self._lam.to(device)
        return lam

    def _model_dtype(self, y: torch.Tensor) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else y.dtype

    def forward(self, y: torch.Tensor, t: torch.Tensor | float, label: torch.Tensor | None = None) -> torch.Tensor:
        b = y.shape[0]
        t = torch.as_tensor(t, device=y.device).to(torch.float64).reshape(-1).expand(b)
        k, lam = timestep_for_t(self._lam_on(y.device), t)
        # alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda): consistent with the (clamped) t
        alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        shape = (b,) + (1,) * (y.dim() - 1)
        a, s = alpha.reshape(shape), sigma.reshape(shape)
        y64 = y.to(torch.float64)
        x64 = (a + s) * y64
        mdtype = self._model_dtype(y)
        x_tau = x64.to(mdtype)
        step = k.to(torch.float64 if mdtype == torch.float64 else torch.float32)
        if self.class_conditional:
            if label is None:
                raise ValueError("this teacher is class-conditional: pass labels (or wrap it in "
                                 "VelocityModel(adapter, num_classes), which passes the null label for None)")
            out = self.model(x_tau, step, class_labels=label.to(device=y.device, dtype=torch.long).reshape(b))
        else:
            out = self.model(x_tau, step)
        out = _unwrap(out).to(torch.float64)
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x64 - s * eps) / a
        elif self.prediction_type == "sample":
            x0 = out
            eps = (x64 - a * x0) / s
        else:  # v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1
            x0 = a * x64 - s * out
            eps = s * x64 + a * out
        v = eps - x0
        return v.to(torch.float64 if y.dtype == torch.float64 else torch.float32)

    # --- identity / rebuilding -----------------------------------------------------------------------------------

    def config(self) -> dict:
        """The adapter settings, JSON-able: enough (with the state dict) to rebuild it offline (`build_from_meta`)."""
        unet_config, unet_class = None, None
        cfg = getattr(self.model, "config", None)
        if cfg is not None and hasattr(cfg, "items"):
            unet_config = _jsonable({k: v for k, v in dict(cfg).items() if not k.startswith("_")})
            unet_class = type(self.model).__name__
        return {"kind": "diffusion_vp", "prediction_type": self.prediction_type,
                "num_train_timesteps": self.num_train_timesteps,
                "alphas_cumprod": [float(x) for x in self._ab.tolist()],
                "scheduler_config": self.scheduler_config, "class_conditional": self.class_conditional,
                "unet_class": unet_class, "unet_config": unet_config}

    describe = config

    def extra_repr(self) -> str:
        return (f"prediction_type={self.prediction_type!r}, num_train_timesteps={self.num_train_timesteps}, "
                f"class_conditional={self.class_conditional}")


def _unwrap(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"the wrapped model returned {type(out).__name__}, not a tensor / an object with .sample")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


# --- identity -------------------------------------------------------------------------------------------------------

def weights_hash(module: nn.Module) -> str:
    """sha256 over the state dict (key, dtype, shape and bytes of every tensor, in key order) plus the settings of
    every DiffusionVelocity inside `module` (prediction_type, alphas_cumprod, class_conditional; not the
    scheduler config, which is provenance): the teacher's identity."""
    h = hashlib.sha256()
    sd = module.state_dict()
    for key in sorted(sd):
        t = sd[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for m in module.modules():
        if isinstance(m, DiffusionVelocity):
            c = m.config()
            c.pop("unet_config", None)  # the architecture is already in the keys/shapes
            c.pop("scheduler_config", None)  # provenance only: the schedule itself is alphas_cumprod
            h.update(json.dumps(c, sort_keys=True).encode())
    return h.hexdigest()


# --- loading --------------------------------------------------------------------------------------------------------

def _looks_local(p: str) -> bool:
    return (p.startswith(("/", ".", "~")) or os.sep in p.replace("/", "") or p.count("/") != 1
            or (os.altsep is not None and os.altsep in p) or Path(p).expanduser().exists())


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "DIFFUSERS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_snapshot(repo_id: str, local_files_only: bool) -> str:
    """The one place that may touch the network (huggingface_hub.snapshot_download); tests monkeypatch it."""
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, local_files_only=local_files_only,
                             allow_patterns=["*.json", "*.safetensors", "*.bin", "*/*.json", "*/*.safetensors",
                                             "*/*.bin"])


def _resolve(path_or_id: str | os.PathLike) -> Path:
    p = str(path_or_id)
    if _looks_local(p):
        d = Path(p).expanduser()
        if not d.is_dir():
            raise TeacherNotFoundError(
                f"teacher directory {str(d)!r} does not exist: provide a local diffusers folder there (a pipeline "
                f"folder with unet/ and scheduler/, or the UNet's config.json + weights + scheduler_config.json), "
                f"e.g. written by unet.save_pretrained(<dir>/unet) and scheduler.save_config(<dir>/scheduler)")
        return d
    offline = _offline()
    try:
        return Path(_hub_snapshot(p, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes the one clear error
        why = "offline (HF_HUB_OFFLINE set) and not in the local cache" if offline else f"could not be fetched ({e})"
        raise TeacherNotFoundError(
            f"teacher {p!r} is not a local directory and {why}: download it once on a machine with network access "
            f"(e.g. `huggingface-cli download {p} --local-dir <dir>`) and pass that directory instead") from e


def _scheduler_config(root: Path, unet_dir: Path) -> dict:
    for c in (root / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json",
              root / "scheduler_config.json"):
        if c.is_file():
            return json.loads(c.read_text())
    raise TeacherNotFoundError(f"no scheduler config under {str(root)!r}: expected scheduler/scheduler_config.json "
                               f"or scheduler_config.json next to the UNet's config.json")


def _alphas_cumprod_from_config(cfg: dict) -> torch.Tensor:
    import diffusers
    cls = getattr(diffusers, str(cfg.get("_class_name", "DDPMScheduler")), None)
    if cls is None or not hasattr(cls, "from_config"):
        cls = diffusers.DDPMScheduler
    sched = cls.from_config(cfg)
    ab = getattr(sched, "alphas_cumprod", None)
    if ab is None:
        raise ValueError(f"scheduler {cfg.get('_class_name')!r} has no alphas_cumprod: not a discrete VP schedule")
    return torch.as_tensor(ab).to(torch.float64)


def from_diffusers(path_or_id: str | os.PathLike, *, prediction_type: str | None = None,
                   subfolder: str | None = None) -> DiffusionVelocity:
    """A DiffusionVelocity from a diffusers UNet2DModel + scheduler config.

    path_or_id: a local directory (a pipeline folder with `unet/` and `scheduler/`, or a folder holding the UNet's
    config.json + weights and a `scheduler_config.json`) or a hub id (fetched only when online; with HF_HUB_OFFLINE
    only the local cache is read). A missing local directory, or a hub id that cannot be had, raises
    TeacherNotFoundError naming what to provide; there is no fallback. subfolder: the UNet's folder inside it
    (default `unet` when present). prediction_type: default the scheduler config's (else "epsilon")."""
    from diffusers import UNet2DModel
    root = _resolve(path_or_id)
    if subfolder is None:
        subfolder = "unet" if (root / "unet" / "config.json").is_file() else ""
    unet_dir = root / subfolder if subfolder else root
    if not (unet_dir / "config.json").is_file():
        raise TeacherNotFoundError(f"no UNet config.json in {str(unet_dir)!r}")
    sched_cfg = _scheduler_config(root, unet_dir)
    unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False).eval()
    pt = prediction_type or sched_cfg.get("prediction_type") or "epsilon"
    return DiffusionVelocity(unet, _alphas_cumprod_from_config(sched_cfg), pt, scheduler_config=sched_cfg)


def build_from_meta(meta: dict) -> DiffusionVelocity:
    """The adapter of `DiffusionVelocity.config()` with a randomly initialised UNet2DModel (no download); the caller
    loads the state dict. `meta` is the config dict itself or a dict holding it under "teacher"."""
    if "prediction_type" not in meta and isinstance(meta.get("teacher"), dict):
        meta = meta["teacher"]
    if meta.get("unet_config") is None:
        raise ValueError("this teacher meta has no unet_config (the adapter wrapped a non-diffusers module): "
                         "rebuild the module yourself and wrap it in DiffusionVelocity")
    import diffusers
    cls = getattr(diffusers, meta.get("unet_class") or "UNet2DModel")
    unet = cls.from_config(dict(meta["unet_config"]))
    return DiffusionVelocity(unet, torch.tensor(meta["alphas_cumprod"], dtype=torch.float64),
                             meta["prediction_type"], class_conditional=meta.get("class_conditional"),
                             scheduler_config=meta.get("scheduler_config"))
