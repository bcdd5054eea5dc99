"""GPU speed of the CIFAR10-size U-Net, every ratio against a baseline measured in the same run.

    python benchmarks/gpu.py            # on a GPU: the cifar10 preset's U-Net, 3x32x32
    python benchmarks/gpu.py --quick    # anywhere (CPU): channels 32, 3x16x16, small batch, few reps

Measures (1) pairs/s of our sampler (bf16 velocity + torch.compile + CUDA graph where available, fp32 state)
against a plain fp32 eager solvers.integrate loop at the same NFE -> pairs_speedup; (2) MFU of our sampler:
FLOPs of one forward (torch.utils.flop_counter) x NFE x pairs/s over the GPU's dense bf16 peak (null off GPU);
(3) training img/s, eager vs compiled (same bf16 autocast) -> train_speedup; (4) peak GPU memory.
The last line is `RESULT {json}`. Imports only torch/numpy and reflow_core (pydantic, pyyaml): no prefect/mlflow.

    python benchmarks/gpu.py --profile DIR   # also: torch.profiler of one sampler call, ours and the fp32 baseline

--profile writes DIR/profile_{ours,plain}.txt (the op table by self device time) and adds `profile` to RESULT:
per sampler call, the share of device time in matmul/conv kernels, attention, and everything else (norms,
activations, copies), and how busy the device was (kernel time / wall time). When MFU is low, this says why.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from reflow_core import accel, solvers  # noqa: E402
from reflow_core.config import TrainConfig  # noqa: E402
from reflow_core.preset import load_preset  # noqa: E402
from reflow_core.nets import build_net, count_params  # noqa: E402
from reflow_core.train import Batch, flow_matching_loss  # noqa: E402
from reflow_core.velocity import VelocityModel  # noqa: E402

from captured import CapturedSampler  # noqa: E402  (benchmarks/, the script's own folder)

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, reps: int) -> float:
    """Median seconds of fn() over reps, after warmup calls (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def forward_flops(net, x, t) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, t, None)
    return int(fc.get_total_flops())


MATMUL_KEYS = ("gemm", "conv", "cutlass", "xmma", "cudnn", "mma", "sm90", "sm80", "addmm", "aten::mm", "aten::bmm",
               "matmul", "linear", "wgrad", "dgrad")
ATTN_KEYS = ("flash", "attention", "fmha", "sdpa", "softmax")


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ATTN_KEYS):
        return "attention"
    if any(k in n for k in MATMUL_KEYS):
        return "matmul_conv"
    return "other"


def profile_call(fn, device, path: Path) -> dict:
    """One fn() under torch.profiler: the op table goes to `path`; returns the time split by kernel class.

    On CUDA the split is over device kernels (self device time); on a CPU over aten ops' self CPU time. `busy` is
    the summed kernel time over the call's wall time: well below 1 means the GPU waits on the host (launches,
    Python), which CUDA graphs remove; a large `other` share means memory-bound elementwise work that tensor
    cores cannot speed up."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()

    def self_time(e) -> float:  # microseconds
        if cuda:
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)
    if cuda:  # the kernels themselves (an aten op's own device time is that of the kernels it launched)
        from torch.autograd import DeviceType
        rows = [(e.key, self_time(e)) for e in events if e.device_type == DeviceType.CUDA and self_time(e) > 0]
    else:
        rows = [(e.key, self_time(e)) for e in events if e.key.startswith("aten::") and self_time(e) > 0]
    total = sum(t for _, t in rows) or 1.0
    split = {"matmul_conv": 0.0, "attention": 0.0, "other": 0.0}
    for name, t in rows:
        split[kernel_class(name)] += t / total
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.write_text(f"wall {wall * 1e3:.2f} ms, summed {'kernel' if cuda else 'aten op'} time {total / 1e3:.2f} ms\n"
                    + events.table(sort_by=sort, row_limit=40))
    top = sorted(rows, key=lambda r: -r[1])[:5]
    return {"wall_ms": wall * 1e3, "busy": total / 1e6 / wall, **{k: round(v, 4) for k, v in split.items()},
            "top": [[name[:80], round(t / total, 4)] for name, t in top]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small net and sizes (CPU smoke run)")
    ap.add_argument("--batch", type=int, default=None, help="sampling batch (default 512; quick 4)")
    ap.add_argument("--train-batch", type=int, default=None, help="training batch (default 128; quick 4)")
    ap.add_argument("--nfe", type=int, default=None, help="heun NFE, odd (default 35 as the cifar10 preset; quick 5)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="auto: on for CUDA, off on CPU (inductor's C++ cold compile takes minutes on a small CPU)")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs", choices=accel.COMPILE_MODES[:2],
                    help="inductor mode; 'default' compiles in far less time, max-autotune tunes kernels")
    ap.add_argument("--device", default=None)
    ap.add_argument("--channels", type=int, default=None, help="U-Net base channels (default: the preset's; quick 32)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 32; quick 16)")
    ap.add_argument("--profile", default=None, metavar="DIR", help="profile one sampler call (ours and plain) into DIR")
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args(argv)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    net_cfg = load_preset("cifar10").net
    size = 32
    if a.quick:
        net_cfg = net_cfg.model_copy(update={"channels": 32, "num_res_blocks": 1})
        size = 16
    if a.channels:
        net_cfg = net_cfg.model_copy(update={"channels": a.channels})
    size = a.size or size
    batch = a.batch or (4 if a.quick else 512)
    tbatch = a.train_batch or (4 if a.quick else 128)
    nfe = a.nfe or (5 if a.quick else 35)
    reps = a.reps or (2 if a.quick else 10)
    use_compile = a.compile == "on" or (a.compile == "auto" and cuda)
    shape = (3, size, size)

    torch.manual_seed(0)
    net = build_net(net_cfg, shape).to(device).eval()
    with torch.no_grad():  # zero-init output layer -> v = 0 would make sampling trivial; randomise it
        torch.nn.init.normal_(net.conv_out.weight, std=0.02)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn((batch, *shape), generator=g).to(device)
    rows = []

    # (1) pairs/s: plain fp32 eager loop vs ours
    plain_v = VelocityModel(net).solver_velocity()
    t_plain = timed(lambda: solvers.sample(plain_v, noise, nfe, "heun", "rho", 7.0), device, 1, reps)
    fast_net = net
    if use_compile or cuda:
        with accel.autocast(device, True, cache_enabled=False):  # compiled (and probed) for the bf16 sampler
            example = (noise.contiguous(memory_format=torch.channels_last) if cuda else noise,
                       torch.ones(batch, device=device), None)
            fast_net = accel.prepare_model(net, channels_last=cuda, compile=use_compile, mode=a.compile_mode,
                                           example=example)
    use_compile = isinstance(fast_net, torch._dynamo.eval_frame.OptimizedModule)  # False after a fallback
    sampler = CapturedSampler(VelocityModel(fast_net, amp=True).solver_velocity(), noise.shape, nfe, "heun",
                                    "rho", 7.0, device=device, graph=cuda)
    noise_in = noise.contiguous(memory_format=torch.channels_last) if cuda else noise
    t_fast = timed(lambda: sampler(noise_in), device, 2, reps)
    ref = solvers.sample(plain_v, noise, nfe, "heun", "rho", 7.0)
    err = float((sampler(noise_in) - ref).norm() / ref.norm().clamp_min(1e-12))
    pairs_plain, pairs_fast = batch / t_plain, batch / t_fast
    rows.append(("pairs/s fp32 eager", pairs_plain))
    rows.append((f"pairs/s ours (bf16{'+compile' if use_compile else ''}{'+cudagraph' if sampler.use_graph else ''})",
                 pairs_fast))

    # (2) MFU of our sampler
    flops = forward_flops(net, noise, torch.ones(batch, device=device))
    achieved = flops * nfe / t_fast
    peak = peak_flops(device)
    mfu = achieved / peak if peak else None
    rows.append(("GFLOP per forward (batch)", flops / 1e9))
    rows.append(("achieved TFLOP/s (sampler)", achieved / 1e12))
    prof = None
    if a.profile:
        out = Path(a.profile)
        out.mkdir(parents=True, exist_ok=True)
        prof = {"ours": profile_call(lambda: sampler(noise_in), device, out / "profile_ours.txt"),
                "plain": profile_call(lambda: solvers.sample(plain_v, noise, nfe, "heun", "rho", 7.0), device,
                                      out / "profile_plain.txt")}

    # (3) training img/s, eager vs compiled, both bf16 autocast (+ channels_last on CUDA)
    cfg = TrainConfig(amp=True)

    def train_rate(compiled: bool) -> tuple[float, bool]:
        """(img/s, whether the module that ran was compiled: False after a fallback)."""
        torch.manual_seed(0)
        tnet = build_net(net_cfg, shape).to(device).train()
        mf = torch.channels_last if cuda else torch.contiguous_format
        xb = torch.randn((tbatch, *shape), device=device).contiguous(memory_format=mf)
        nb = torch.randn((tbatch, *shape), device=device).contiguous(memory_format=mf)
        fwd = accel.prepare_model(tnet, channels_last=cuda)
        if compiled:
            with accel.autocast(device, True):
                fwd = accel.prepare_model(fwd, compile=True, mode=a.compile_mode, probe_backward=True,
                                          example=(xb, torch.rand(tbatch, device=device), None))
        opt = torch.optim.Adam(tnet.parameters(), lr=1e-4)
        gen = torch.Generator(device="cpu").manual_seed(0)

        def step():
            with accel.autocast(device, True):
                loss = flow_matching_loss(fwd, Batch(xb, nb), cfg, gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return tbatch / timed(step, device, 2, reps), isinstance(fwd, torch._dynamo.eval_frame.OptimizedModule)

    train_eager, _ = train_rate(False)
    rows.append(("train img/s eager (bf16)", train_eager))
    train_comp, train_compiled = train_rate(True) if use_compile else (None, False)
    if train_comp is not None:
        rows.append((f"train img/s {'compiled' if train_compiled else 'COMPILE FELL BACK'} (bf16)", train_comp))
    peak_mem = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None

    dev_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()}, " \
                                                               f"{torch.get_num_threads()} threads)"
    result = {"pairs_speedup": pairs_fast / pairs_plain, "mfu": mfu,
              "train_speedup": (train_comp / train_eager) if train_comp is not None else None,
              "peak_mem_GB": peak_mem, "device": dev_name, "quick": a.quick, "compile": use_compile,
              "compile_mode": a.compile_mode if use_compile else None,
              "compile_backend": os.environ.get("REFLOW_COMPILE_BACKEND", "inductor") if use_compile else None,
              "train_compiled": train_compiled,
              "cuda_graph": sampler.use_graph, "batch": batch, "train_batch": tbatch, "nfe": nfe, "shape": list(shape),
              "params_M": count_params(net) / 1e6, "pairs_per_s_plain": pairs_plain, "pairs_per_s_ours": pairs_fast,
              "train_img_per_s_eager": train_eager, "train_img_per_s_compiled": train_comp,
              "sampler_rel_err_vs_fp32": err, "torch": torch.__version__, "profile": prof}
    print(f"{'device':34s} {dev_name}")
    print(f"{'net':34s} U-Net {count_params(net) / 1e6:.1f}M params, {shape}, heun {nfe} NFE, batch {batch}")
    for k, v in rows:
        print(f"{k:34s} {v:12.3f}")
    print(f"{'sampler rel. error vs fp32':34s} {err:12.2e}")
    for which, p in (prof or {}).items():
        print(f"profile {which:26s} busy {p['busy']:.2f}, matmul/conv {p['matmul_conv']:.0%}, attention "
              f"{p['attention']:.0%}, other {p['other']:.0%}; top: {p['top'][0][0]}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
