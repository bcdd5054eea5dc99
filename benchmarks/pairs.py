"""Pair simulation and pair I/O throughput, each against a baseline measured in the same run.

    .venv/bin/python benchmarks/pairs.py --quick      # CPU, well under 3 minutes
    .venv/bin/python benchmarks/pairs.py              # bigger sizes (GPU if available)

(i)   pairs/s of `pairs.simulate_shard` (per-row seeded noise, background zarr writer, done marker) with a small
      U-Net on 3x16x16 at a fixed Euler NFE, vs a plain loop of the same net with an inline fixed-step Euler that
      saves .npy files at the end (and torchdiffeq's fixed-step 'euler' odeint when installed);
      sim_speedup = ours / plain loop.
(ii)  PairStore.write_shard throughput (random data) in MB/s.
(iii) PairSampler read throughput (MB/s, batches/s of `batch(step)` for steps 0, 1, ...) in stream mode (windows of
      chunks read from the store, prefetched) vs the samples/s a real reflow training step of the same net at the
      same batch size consumes; read_over_demand = sampler samples/s / trainer samples/s. The memory mode (whole
      store in RAM) is reported too (read_memory_*).

The last line is `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

from reflow_core import solvers
from reflow_core.config import NetConfig, PairsConfig
from reflow_core.nets import build_net
from reflow_core.pairs import PairSampler, PairStore, simulate_shard, store_for_config

SHAPE = (3, 16, 16)


def _net(device):
    cfg = NetConfig(kind="unet", channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                    dropout=0.0)
    torch.manual_seed(0)
    return build_net(cfg, SHAPE, 0).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_sim(net, n, batch, nfe, device, tmp) -> dict:
    net.eval()

    def v(x, t, label):
        return net(x, t, label).float()

    cfg = PairsConfig(n_pairs=n, shard_size=n, chunk_size=batch, batch_size=batch, solver="euler", nfe=nfe,
                      grid="uniform", seed=0)
    out = {}
    with torch.no_grad():  # warm-up (allocator, kernels)
        solvers.sample(lambda x, t: v(x, t, None), torch.randn(batch, *SHAPE, device=device), 1)

    store = store_for_config(os.path.join(tmp, "sim.zarr"), cfg, shape=SHAPE, teacher_hash="bench")
    _sync(device)
    t0 = time.perf_counter()
    simulate_shard(store, 0, lambda label: (lambda x, t: v(x, t, label)), cfg=cfg, device=device)
    _sync(device)
    out["ours"] = n / (time.perf_counter() - t0)

    # baseline: the same net, an inline fixed-step Euler, .npy files written at the end
    t0 = time.perf_counter()
    noises, samples = [], []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b0 in range(0, n, batch):
            z = torch.randn(min(batch, n - b0), *SHAPE, generator=g)
            x = z.to(device)
            ts = torch.linspace(1.0, 0.0, nfe + 1)
            for i in range(nfe):
                t = torch.full((x.shape[0],), float(ts[i]), device=device)
                x = x + (float(ts[i + 1]) - float(ts[i])) * net(x, t, None).float()
            noises.append(z.numpy())
            samples.append(x.cpu().numpy())
    np.save(os.path.join(tmp, "noise.npy"), np.concatenate(noises))
    np.save(os.path.join(tmp, "sample.npy"), np.concatenate(samples))
    _sync(device)
    out["plain"] = n / (time.perf_counter() - t0)
    ref = np.load(os.path.join(tmp, "sample.npy"))
    assert ref.shape == (n, *SHAPE)

    try:
        from torchdiffeq import odeint
    except ImportError:
        out["torchdiffeq"] = None
    else:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        outs = []
        with torch.no_grad():
            for b0 in range(0, n, batch):
                z = torch.randn(min(batch, n - b0), *SHAPE, generator=g).to(device)
                f = lambda t, x: net(x, t.expand(x.shape[0]), None).float()  # noqa: E731
                outs.append(odeint(f, z, torch.linspace(1.0, 0.0, nfe + 1, device=device), method="euler")[-1]
                            .cpu().numpy())
        np.save(os.path.join(tmp, "sample_tde.npy"), np.concatenate(outs))
        _sync(device)
        out["torchdiffeq"] = n / (time.perf_counter() - t0)
    return out


def bench_write(n, chunk, tmp) -> dict:
    store = PairStore.create(os.path.join(tmp, "write.zarr"), shape=SHAPE, n_backward=n, n_forward=0,
                             chunk_size=chunk, shard_size=n, dtype="float32", attrs={})
    noise, sample = torch.randn(n, *SHAPE), torch.randn(n, *SHAPE)
    t0 = time.perf_counter()
    store.write_shard(0, noise, sample)
    dt = time.perf_counter() - t0
    mb = (noise.numel() + sample.numel()) * 4 / 1e6 + n * 9 / 1e6
    return {"MBps": mb / dt, "MB": mb, "seconds": dt, "store": store}


def bench_read(store, batch, n_batches, mode="stream") -> dict:
    per_batch_mb = batch * (2 * int(np.prod(SHAPE)) * 4 + 9) / 1e6
    budget = 0 if mode == "stream" else 2 * 2 ** 30
    with PairSampler(store, batch, seed=0, window_chunks=8, prefetch=True, ram_budget_bytes=budget) as sp:
        assert sp.mode == mode
        sp.batch(0)  # first window (stream) / nothing more to load (memory)
        t0 = time.perf_counter()
        for step in range(1, n_batches + 1):
            b = sp.batch(step)
        dt = time.perf_counter() - t0
    assert b.noise.shape == (batch, *SHAPE)
    return {"MBps": per_batch_mb * n_batches / dt, "batches_per_s": n_batches / dt,
            "samples_per_s": batch * n_batches / dt}


def bench_train(net, batch, steps, device) -> dict:
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x1, x0 = torch.randn(batch, *SHAPE, device=device), torch.randn(batch, *SHAPE, device=device)

    def step():
        t = torch.rand(batch, device=device)
        tt = t.view(-1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * x1
        loss = (net(xt, t, None) - (x1 - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return {"samples_per_s": batch * steps / (time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CPU sizes (under 3 minutes on 2 cores)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        sim_n, sim_b, nfe, write_n, chunk, read_batches, train_steps = 256, 64, 4, 16384, 1024, 3000, 5
    else:
        sim_n, sim_b, nfe, write_n, chunk, read_batches, train_steps = 8192, 256, 16, 131072, 4096, 10000, 30
    t_start = time.perf_counter()
    net = _net(device)
    with tempfile.TemporaryDirectory() as tmp:
        sim = bench_sim(net, sim_n, sim_b, nfe, device, tmp)
        wr = bench_write(write_n, chunk, tmp)
        store = wr.pop("store")
        rd = bench_read(store, sim_b, read_batches, "stream")
        rd_mem = bench_read(store, sim_b, read_batches, "memory")
    tr = bench_train(net, sim_b, train_steps, device)

    res = {
        "sim_pairs_per_s": round(sim["ours"], 1), "baseline_pairs_per_s": round(sim["plain"], 1),
        "torchdiffeq_pairs_per_s": None if sim["torchdiffeq"] is None else round(sim["torchdiffeq"], 1),
        "sim_speedup": round(sim["ours"] / sim["plain"], 3),
        "sim_speedup_vs_torchdiffeq": None if sim["torchdiffeq"] is None else round(sim["ours"] / sim["torchdiffeq"], 3),
        "write_MBps": round(wr["MBps"], 1), "read_MBps": round(rd["MBps"], 1),
        "read_batches_per_s": round(rd["batches_per_s"], 1), "read_samples_per_s": round(rd["samples_per_s"], 1),
        "read_memory_MBps": round(rd_mem["MBps"], 1), "read_memory_batches_per_s": round(rd_mem["batches_per_s"], 1),
        "train_samples_per_s": round(tr["samples_per_s"], 1),
        "read_over_demand": round(rd["samples_per_s"] / tr["samples_per_s"], 2),
        "quick": args.quick, "device": str(device), "nfe": nfe, "solver": "euler", "batch": sim_b,
        "shape": list(SHAPE), "torch_threads": torch.get_num_threads(), "seconds": 0.0,
    }
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    rows = [
        ("simulation, ours (simulate_shard + zarr writer)", f"{res['sim_pairs_per_s']:.1f} pairs/s"),
        ("simulation, plain Euler loop + .npy (baseline)", f"{res['baseline_pairs_per_s']:.1f} pairs/s"),
        ("simulation, torchdiffeq odeint euler", "n/a" if res["torchdiffeq_pairs_per_s"] is None
         else f"{res['torchdiffeq_pairs_per_s']:.1f} pairs/s"),
        ("sim_speedup (ours / plain)", f"{res['sim_speedup']:.3f}x"),
        ("store write (write_shard, float32)", f"{res['write_MBps']:.1f} MB/s"),
        ("sampler read (PairSampler, stream)", f"{res['read_MBps']:.1f} MB/s, {res['read_batches_per_s']:.1f} batches/s"),
        ("sampler read (PairSampler, memory)",
         f"{res['read_memory_MBps']:.1f} MB/s, {res['read_memory_batches_per_s']:.1f} batches/s"),
        ("trainer demand (reflow step, same net/batch)", f"{res['train_samples_per_s']:.1f} samples/s"),
        ("read_over_demand", f"{res['read_over_demand']:.1f}x"),
    ]
    print(f"# pairs benchmark: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"device {device}, U-Net 3x16x16, euler {nfe} NFE, batch {sim_b}, {'quick' if args.quick else 'full'}")
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
