"""Bring your own teacher, end to end: a diffusers UNet2DModel trained on digits with diffusers' own DDPM loss, then
our pipeline from it as the teacher (pairs, reflow initialised from its weights, evaluate).

    .venv/bin/python benchmarks/diffusers_teacher.py --root runs [--prediction-type v_prediction|epsilon]
        [--unet-steps 3000] [--quick]

Step 1 writes a diffusers model folder (`<root>/_pretrained_digits_<type>_<steps>/{unet,scheduler}`, the
`save_pretrained` layout) from `DDPMScheduler.add_noise` + MSE on epsilon or on v (diffusers' `get_velocity`),
class-conditional (10 digits + a null class dropped to with p = 0.1).
Step 2 runs preset `digits_diffusers` with `teacher.path` set to that folder. Prints the fd_digits table and one
line `RESULT {json}` with the pretrained model's and the reflow model's fd_digits at 1 and 2 Euler NFE (the
pretrained model integrated by our Euler solver is DDIM with eta 0 on the same time points: docs/teachers.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reflow_core import stages, storage  # noqa: E402
from reflow_core.preset import load_preset  # noqa: E402
from reflow_core.data import load_data  # noqa: E402


def train_diffusers_unet(out_dir: str, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                         prediction_type: str = "v_prediction") -> str:
    """A class-conditional UNet2DModel on 8x8 digits in [-1, 1], trained with diffusers' DDPM loss (MSE on epsilon,
    or on diffusers' `get_velocity` target for v-prediction)."""
    from diffusers import DDPMScheduler, UNet2DModel

    if os.path.exists(os.path.join(out_dir, "unet", "config.json")):
        return out_dir
    ds = load_data(load_preset("digits").data)
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, num_class_embeds=11)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(ds), (batch_size,), generator=g)
        x0, y = ds.x[idx], ds.y[idx].clone()
        y[torch.rand(batch_size, generator=g) < 0.1] = 10  # the null class (CFG), as VelocityModel's null label
        eps = torch.randn(x0.shape, generator=g)
        tau = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=g)
        pred = unet(sched.add_noise(x0, eps, tau), tau, class_labels=y).sample
        target = eps if prediction_type == "epsilon" else sched.get_velocity(x0, eps, tau)
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 200)
        opt.step()
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - min(0.999, (1 + step) / (10 + step))) if v.is_floating_point() else ema[k].copy_(v)
        if (step + 1) % 500 == 0 or step + 1 == steps:
            print(f"unet step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    unet.load_state_dict(ema)
    unet.save_pretrained(os.path.join(out_dir, "unet"))
    sched.save_config(os.path.join(out_dir, "scheduler"))
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="runs")
    ap.add_argument("--run", default="digits_diffusers")
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--prediction-type", default="v_prediction", choices=["epsilon", "v_prediction"])
    ap.add_argument("--quick", action="store_true", help="a few minutes: 300 UNet steps, a smaller pipeline")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more pipeline overrides")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from flows.cli import parse_sets

    steps = 300 if a.quick else a.unet_steps
    folder = os.path.abspath(os.path.join(a.root, f"_pretrained_digits_{a.prediction_type}_{steps}"))
    t0 = time.perf_counter()
    train_diffusers_unet(folder, steps, prediction_type=a.prediction_type)
    t_unet = time.perf_counter() - t0
    overrides = {"teacher.path": folder}
    if a.quick:
        overrides |= {"pairs.n_pairs": 2000, "pairs.shard_size": 1000, "reflow.train.steps": 500,
                      "eval.n_samples": 500}
    overrides |= parse_sets(a.set)
    cfg = load_preset("digits_diffusers", overrides)
    t0 = time.perf_counter()
    rows = stages.run_local(cfg, a.root, f"{a.run}_{a.prediction_type}")
    t_pipe = time.perf_counter() - t0
    fd = {(r["model"], r["nfe"]): r["fd_digits"] for r in rows}
    print("| model | NFE (Euler) | fd_digits |\n|---|---|---|")
    for (m, n), v in sorted(fd.items()):
        print(f"| {m} | {n} | {v:.2f} |")
    result = {"unet_steps": steps, "unet_seconds": round(t_unet, 1), "pipeline_seconds": round(t_pipe, 1),
              **{f"{'pretrained' if m == 'teacher' else m}_nfe{n}": round(v, 3) for (m, n), v in fd.items()},
              "prediction_type": a.prediction_type,
              "metrics_json": storage.join(a.root, f"{a.run}_{a.prediction_type}", "eval", "metrics.json")}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
