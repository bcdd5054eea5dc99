"""Does an SR teacher sample or regress? Its outputs on training and on held-out images, per NFE.

    .venv/bin/python docs/tools/sr_draws.py --root runs --run digits_sr

For the first `--n` training images and the first `--n` held-out images of the run's data, one measurement each
(the run's sigma_y, seeded) and `--draws` sources: per NFE the mean PSNR of a draw, the PSNR of the draws' mean,
the variance across draws (a posterior sampler's is about its error; a regressor's is near 0) and, for digits,
fd_digits against the same images. A teacher far better on the training images than on held-out ones whose
draws barely differ has learnt each training image's map, not the posterior (docs/results.md, digits_sr).
"""
from __future__ import annotations

import argparse

import torch

from reflow_core import metrics, stages, storage
from reflow_core.data import load_heldout
from reflow_core.metrics.sr import psnr
from reflow_core.sr import degrade, lift, source
from reflow_core.velocity import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="runs")
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", default="teacher")
    ap.add_argument("--nfes", nargs="+", type=int, default=[1, 2, 4, 8, 32])
    ap.add_argument("--n", type=int, default=297)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rundir = stages.RunDir.of(a.root, a.run)
    cfg = rundir.config()
    if cfg.data.sr is None:
        raise SystemExit(f"{a.run}: not a super-resolution run (no data.sr)")
    sr = cfg.data.sr
    model = stages.load_model(stages.model_checkpoint(rundir, a.model))
    train = stages.dataset(cfg)
    splits = {"train": train.x[: a.n].float(), "held-out": load_heldout(cfg.data).x[: a.n].float()}
    print(f"{a.run}: {a.model}, sigma_p {sr.sigma_p}, sigma_y {sr.sigma_y}, {a.n} images x {a.draws} draws")
    print("split     NFE  PSNR/draw  PSNR(mean)  draw var  fd_digits")
    for split, x in splits.items():
        ref = (metrics.reference_for(train, x, storage.join(rundir.root, "_cache")) if cfg.data.name == "digits"
               else None)
        low = degrade(x, sr.scale, sr.degradation)
        y = low + sr.sigma_y * torch.randn(low.shape, generator=torch.Generator().manual_seed(a.seed))
        c = lift(y, sr.scale, sr.degradation)
        eps = [torch.randn(x.shape, generator=torch.Generator().manual_seed(a.seed + 1 + k)) for k in range(a.draws)]
        for nfe in a.nfes:
            out = torch.stack([generate(model, source(c, e, sr.sigma_p), nfe, "euler", cond=c).clamp(-1, 1)
                               for e in eps])
            per_draw = float(psnr(out.flatten(0, 1), x.repeat(a.draws, 1, 1, 1)).mean())
            fd = f"{ref.score(out.flatten(0, 1))[ref.metric]:9.2f}" if ref is not None else "        -"
            print(f"{split:9} {nfe:4d}  {per_draw:9.2f}  {float(psnr(out.mean(0), x).mean()):10.2f}  "
                  f"{float(out.var(0).mean()):8.4f}  {fd}")


if __name__ == "__main__":
    main()
