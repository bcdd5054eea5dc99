"""FLOPs per network evaluation of a preset's net, and the GPU plan on paper that follows from them (an ESTIMATE).

    python benchmarks/flops.py                      # cifar10 preset: U-Net 3x32x32, batch 1
    python benchmarks/flops.py --preset digits --json out.json
    python benchmarks/flops.py --mfu 0.35 0.5 --peak-tflops 989 --pairs 1000000

Counts the FLOPs of one forward and of one forward + backward of the preset's velocity net (built as the pipeline
builds it: `velocity.build_velocity_model` from the preset's net config and data shape) with
`torch.utils.flop_counter.FlopCounterMode` on the CPU at batch 1. The counter sees matmuls, convolutions and
attention (SDPA on its math backend, whose matmuls it counts); normalisations, activations and other elementwise
ops are not counted (a small share of the FLOPs, but memory-bound: part of why MFU stays well below 1).

From those counts and an assumed MFU of the GPU's dense bf16 peak (H100 SXM: 989 TFLOP/s) it derives, per GPU:
pairs/s of pair simulation at the preset's solver and NFE (forward only; pairs are simulated without guidance),
training img/s (forward + backward, counted, about 3x the forward), the GPU-hours for `--pairs` pairs and their
storage (noise + sample at the preset's pairs.dtype), and the byte rate the pair writer must sustain. Nothing here
is measured on a GPU. The last line is `RESULT {json}`. Imports torch, numpy and reflow_core only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from reflow_core.preset import load_preset  # noqa: E402
from reflow_core.nets import count_params  # noqa: E402
from reflow_core.velocity import build_velocity_model  # noqa: E402

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
KNOWN_SHAPES = {"cifar10": (3, 32, 32), "natural32": (3, 32, 32), "digits": (1, 8, 8)}


def data_shape(cfg) -> tuple[int, ...]:
    """Per-sample shape of the preset's data without loading (or downloading) the data set."""
    if cfg.data.name in KNOWN_SHAPES:
        return KNOWN_SHAPES[cfg.data.name]
    if cfg.data.name == "toy2d":
        return (2,)
    from reflow_core.data import load_data
    return tuple(load_data(cfg.data).shape)


def num_classes(cfg) -> int:
    return 10 if cfg.net.class_cond and cfg.data.name in ("cifar10", "digits") else 0


def count(model, shape, train: bool) -> int:
    """FLOPs of one forward (train=False) or forward + backward at batch 1. Attention runs on SDPA's math backend
    here: the CPU's fused SDPA kernel has no FLOP formula and would count as 0 (a GPU's flash kernel does the same
    matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, *shape)
    t = torch.full((1,), 0.5)
    label = torch.zeros(1, dtype=torch.long) if model.class_cond else None
    model.train(train)
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        if train:
            model(x, t, label).square().mean().backward()
        else:
            with torch.no_grad():
                model(x, t, label)
    model.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def plan(cfg, fwd: int, fwd_bwd: int, mfus, peak_tflops: float, n_pairs: int) -> dict:
    p = cfg.pairs
    evals = p.nfe  # pairs are simulated without guidance (stages.pairs): one forward per NFE
    shape = data_shape(cfg)
    numel = 1
    for s in shape:
        numel *= s
    # noise + sample at the store's dtype, + label (int64) and direction (int8); uncompressed (random floats barely
    # compress: pairs.compress is off in the presets)
    bytes_per_pair = 2 * numel * DTYPE_BYTES[p.dtype] + 8 + 1
    out = {"pair_solver": p.solver, "pair_nfe": p.nfe, "evals_per_pair": evals, "pair_dtype": p.dtype,
           "bytes_per_pair": bytes_per_pair, "pairs": n_pairs, "storage_GB": n_pairs * bytes_per_pair / 1e9,
           "peak_tflops": peak_tflops, "per_mfu": {}}
    for m in mfus:
        rate = m * peak_tflops * 1e12
        pairs_s = rate / (fwd * evals)
        out["per_mfu"][str(m)] = {
            "pairs_per_s": pairs_s,
            "hours_for_pairs": n_pairs / pairs_s / 3600,
            "write_MB_per_s": pairs_s * bytes_per_pair / 1e6,
            "train_img_per_s": rate / fwd_bwd,
            "teacher_hours": cfg.teacher.train.steps * cfg.teacher.train.batch_size * fwd_bwd / rate / 3600,
            "reflow_hours": cfg.reflow.train.steps * cfg.reflow.train.batch_size * fwd_bwd / rate / 3600,
            "train_read_MB_per_s": rate / fwd_bwd * bytes_per_pair / 1e6,
        }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cifar10")
    ap.add_argument("--mfu", type=float, nargs="+", default=[0.35, 0.5])
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--pairs", type=int, default=None, help="pair count for the time/storage lines (preset's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_preset(a.preset)
    shape = data_shape(cfg)
    model = build_velocity_model(cfg.net, shape, num_classes(cfg))
    fwd, fwd_bwd = count(model, shape, False), count(model, shape, True)
    n_pairs = a.pairs or cfg.pairs.n_pairs
    res = {"preset": a.preset, "shape": list(shape), "params": count_params(model), "gflop_forward": fwd / 1e9,
           "gflop_forward_backward": fwd_bwd / 1e9, "backward_ratio": fwd_bwd / fwd,
           **plan(cfg, fwd, fwd_bwd, a.mfu, a.peak_tflops, n_pairs), "estimate": True}
    print(f"{a.preset}: net {res['params'] / 1e6:.1f}M params, sample {tuple(shape)}, batch 1")
    print(f"  forward           {res['gflop_forward']:.3f} GFLOP (= FLOPs per NFE per sample)")
    print(f"  forward+backward  {res['gflop_forward_backward']:.3f} GFLOP ({res['backward_ratio']:.2f}x forward)")
    print(f"  pairs: {res['pair_solver']} {res['pair_nfe']} NFE = {res['evals_per_pair']} forwards per pair, "
          f"{res['pair_dtype']}: {res['bytes_per_pair']} B per pair, {n_pairs:,} pairs = {res['storage_GB']:.2f} GB")
    print(f"ESTIMATE at {a.peak_tflops:g} TFLOP/s dense bf16 peak (not measured):")
    for m, r in res["per_mfu"].items():
        print(f"  MFU {float(m):.0%}: {r['pairs_per_s']:,.0f} pairs/s, {n_pairs:,} pairs in {r['hours_for_pairs']:.2f} "
              f"GPU-h, writer {r['write_MB_per_s']:.1f} MB/s; training {r['train_img_per_s']:,.0f} img/s "
              f"(teacher {r['teacher_hours']:.1f} GPU-h, reflow {r['reflow_hours']:.1f} GPU-h, "
              f"pair reads {r['train_read_MB_per_s']:.0f} MB/s)")
    line = json.dumps(res)
    if a.json:
        Path(a.json).write_text(line)
    print("RESULT " + line)
    return res


if __name__ == "__main__":
    main()
