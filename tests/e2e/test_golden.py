"""Golden outputs: tiny toy2d, toy2d-with-student and digits runs on CPU with one thread give the pair stores, trained
EMA weights and evaluation rows recorded in tests/e2e/golden.json.

A refactor that keeps the maths must keep these bits. The last bits of CPU float maths depend on the machine (the
CPU, the instruction set torch and MKL dispatch to, torch's version), so golden.json holds one record of sha256s per
machine it was recorded on, and one set of reference numbers (summaries of every array, and the evaluation rows):
- `test_outputs_bit_identical`: the bits equal a record's; on a machine with a record, they must equal its own;
  on a machine without one it skips and says how to add one;
- `test_outputs_close`: on any machine, every summary and row within a relative 1e-4 of the reference numbers
  (fd_digits within 10%: LOOSE says why). Torch's scalar and AVX-512 kernels give numbers 1e-5 apart here.
The fingerprints are taken with plain zarr and torch.load, not with our own readers. After an intended change of
outputs, re-record with `python tests/e2e/test_golden.py --record` (this machine's record and the numbers; the other
machines' records are dropped, as they no longer hold) and say why in the commit; `--record --add` adds this
machine's record to the others without touching them.
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

GOLDEN = Path(__file__).with_name("golden.json")
RTOL = 1e-4
# fd_digits goes through a digit classifier trained for 400 steps inside the run, which carries a machine's last bits
# into its features' covariance: 0.6% apart between two CPUs, 4.6% between torch's scalar and AVX-512 kernels
LOOSE = {"fd_digits": 0.1}

_TRAIN = {"batch_size": 64, "warmup": 5, "ckpt_every": 20, "log_every": 10}
CASES = {
    "toy2d": ("toy2d", {
        "data.n_train": 1000, "net.hidden": 32, "net.depth": 2,
        "teacher.train": {**_TRAIN, "steps": 40}, "reflow.train": {**_TRAIN, "steps": 30, "seed": 1},
        "pairs": {"n_pairs": 600, "shard_size": 250, "chunk_size": 125, "batch_size": 250, "nfe": 5,
                  "solver": "heun", "grid": "uniform"},
        "eval": {"n_samples": 200, "nfes": [1, 2], "straightness_steps": 4}}),
    "toy2d_distill": ("toy2d_distill", {
        "data.n_train": 1000, "net.hidden": 32, "net.depth": 2,
        "teacher.train": {**_TRAIN, "steps": 40}, "reflow.train": {**_TRAIN, "steps": 20, "seed": 1},
        "distill.train": {**_TRAIN, "steps": 20, "seed": 2},
        "pairs": {"n_pairs": 500, "shard_size": 250, "chunk_size": 125, "batch_size": 250, "nfe": 3,
                  "solver": "euler", "grid": "uniform"},
        "eval": {"n_samples": 200, "nfes": [1, 2], "straightness_steps": 4}}),
    "digits": ("digits", {
        "teacher.train": {**_TRAIN, "steps": 30, "batch_size": 32}, "reflow.train": {**_TRAIN, "steps": 20,
                                                                                     "batch_size": 32, "seed": 1},
        "pairs": {"n_pairs": 300, "shard_size": 150, "chunk_size": 75, "batch_size": 150, "nfe": 3,
                  "solver": "heun", "grid": "uniform"},
        "eval": {"n_samples": 100, "nfes": [1, 2], "straightness_steps": 4}}),
}
# wall-clock fields of an evaluation row: everything else must match
TIMING = {"seconds"}


def machine() -> dict:
    """What decides the last bits of CPU float maths here: the CPU, the instruction set torch dispatches to, torch."""
    info = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("vendor_id", "model name"):
                info.setdefault(key.strip(), value.strip())
    cpu = " ".join(info.get(k, "") for k in ("vendor_id", "model name")).strip() or platform.processor()
    return {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def summary(a: np.ndarray) -> list[float]:
    """Mean, std, mean |x| and a fixed random +-1 projection (per element), in float64: a change of the values
    moves one of them even when the first three are symmetric to it."""
    x = np.asarray(a, dtype=np.float64).ravel()
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=x.size)
    return [float(v) for v in (x.mean(), x.std(), np.abs(x).mean(), (x * signs).mean())] if x.size else []


def store_fingerprint(url: str) -> tuple[dict, dict]:
    """sha256 and summary of every array of a pair store, read with plain zarr."""
    g = zarr.open_group(url, mode="r")
    arrays = {name: np.asarray(g[name][...]) for name in sorted(g.array_keys())}
    return {k: _sha(a) for k, a in arrays.items()}, {k: summary(a) for k, a in arrays.items()}


def ema_fingerprint(ckpt_dir: Path) -> tuple[str, list[float]]:
    """sha256 over the EMA tensors of a stage's latest checkpoint in key order, and the summary of all of them
    together (one small tensor's summary is not a machine-independent number: Adam moves a weight whose gradient is
    near zero by a full step either way, whichever way its last bits fall)."""
    latest = json.loads((ckpt_dir / "latest.json").read_text())
    state = torch.load(ckpt_dir / latest["file"], map_location="cpu", weights_only=True)
    h, arrays = hashlib.sha256(), []
    for k in sorted(state["ema"]):
        v = state["ema"][k]
        h.update(k.encode())
        if torch.is_tensor(v):
            a = v.detach().contiguous().numpy()
            h.update(a.tobytes())
            if a.dtype.kind == "f":
                arrays.append(a.ravel())
        else:
            h.update(repr(v).encode())
    return h.hexdigest(), summary(np.concatenate(arrays))


def fingerprint(tmp: Path, case: str) -> tuple[dict, dict]:
    """The bits (sha256s and evaluation rows) of a case's run, and its numbers (summaries and rows)."""
    from reflow_core.preset import load_preset
    from reflow_core.stages import run_local

    preset, overrides = CASES[case]
    torch.set_num_threads(1)
    run_local(load_preset(preset, overrides), str(tmp), case)
    run = tmp / case
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics["rows"]]
    trained = sorted(p.name for p in run.iterdir() if (p / "latest.json").exists())
    stores = {p.name: store_fingerprint(str(p)) for p in sorted(run.iterdir()) if p.name.endswith(".zarr")}
    emas = {d: ema_fingerprint(run / d) for d in trained}
    bits = {"stores": {s: v[0] for s, v in stores.items()}, "ema": {d: v[0] for d, v in emas.items()},
            "rows": rows}
    numbers = {"stores": {s: v[1] for s, v in stores.items()}, "ema": {d: v[1] for d, v in emas.items()},
               "rows": rows}
    return json.loads(json.dumps(bits)), json.loads(json.dumps(numbers))  # floats through JSON, as recorded


def far_apart(got, ref, rtol: float = RTOL, path: str = "") -> list[str]:
    """Where two nested records of numbers differ by more than rtol (a key of LOOSE sets its own). A float is
    compared relative to its own size, and within an array's summary relative to the summary's largest (the array's
    scale), so a mean or projection near zero is not held to a tighter bound than its array; ints, strings and keys
    must be equal."""
    if isinstance(ref, dict) and isinstance(got, dict):
        if set(got) != set(ref):
            return [f"{path}: keys {sorted(set(got) ^ set(ref))} differ"]
        return [m for k in sorted(ref) for m in far_apart(got[k], ref[k], LOOSE.get(k, rtol), f"{path}/{k}")]
    if isinstance(ref, list) and isinstance(got, list):
        if len(got) != len(ref):
            return [f"{path}: length {len(got)} != {len(ref)}"]
        if ref and all(type(v) is float for v in ref + got):
            scale = max(abs(v) for v in ref)
            return [f"{path}[{i}]: {g!r} vs {r!r}" for i, (g, r) in enumerate(zip(got, ref))
                    if abs(g - r) > rtol * scale]
        return [m for i, (g, r) in enumerate(zip(got, ref)) for m in far_apart(g, r, rtol, f"{path}[{i}]")]
    if type(ref) is float and type(got) is float:
        return [] if abs(got - ref) <= rtol * max(abs(got), abs(ref)) else [f"{path}: {got!r} vs {ref!r}"]
    return [] if got == ref else [f"{path}: {got!r} != {ref!r}"]


_RUNS: dict[str, tuple[dict, dict]] = {}


@pytest.fixture
def run_of(tmp_path_factory):
    """A case's fingerprint, run once per session for both tests."""
    def get(case: str) -> tuple[dict, dict]:
        if case not in _RUNS:
            _RUNS[case] = fingerprint(tmp_path_factory.mktemp(case), case)
        return _RUNS[case]
    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_bit_identical(run_of, case):
    records = json.loads(GOLDEN.read_text())["records"]
    bits, _ = run_of(case)
    if any(r["cases"][case] == bits for r in records):
        return
    here = machine()
    own = [r for r in records if r["machine"] == here]
    if not own:
        pytest.skip(f"no golden record for this machine ({here}) and its bits match none of the {len(records)} "
                    "recorded (test_outputs_close checks the numbers); add one with "
                    "`python tests/e2e/test_golden.py --record --add`")
    assert bits["stores"] == own[0]["cases"][case]["stores"]
    assert bits["ema"] == own[0]["cases"][case]["ema"]
    assert bits["rows"] == own[0]["cases"][case]["rows"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_close(run_of, case):
    reference = json.loads(GOLDEN.read_text())["numbers"][case]
    _, numbers = run_of(case)
    assert far_apart(numbers, reference) == []


def _record(add: bool) -> None:
    import tempfile

    old = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"records": [], "numbers": {}}
    here, bits, numbers = machine(), {}, {}
    for name in sorted(CASES):
        with tempfile.TemporaryDirectory() as d:
            bits[name], numbers[name] = fingerprint(Path(d), name)
    if add:
        apart = far_apart(numbers, old["numbers"])
        if apart:
            raise SystemExit("this machine's numbers are not within the tolerance of the recorded ones; the outputs "
                             "changed, so record them with --record alone:\n" + "\n".join(apart[:20]))
    others = [r for r in old["records"] if r["machine"] != here] if add else []
    out = {"records": others + [{"machine": here, "cases": bits}],
           "numbers": old["numbers"] if add else numbers}
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"recorded {GOLDEN} for {here} ({len(out['records'])} machine records)")


if __name__ == "__main__" and sys.argv[1:2] == ["--record"]:
    _record(add=sys.argv[2:] == ["--add"])
