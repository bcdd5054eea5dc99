"""reflow_core.checkpoint: atomic, hash-checked, weights_only checkpoints and single-file artifacts."""
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import assert_same

from reflow_core import checkpoint, storage
from reflow_core.checkpoint import CheckpointError
from reflow_core.config import NetConfig, TrainConfig
from reflow_core.nets import build_net


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def training_state(step: int) -> dict:
    """What train() stores: net, EMA, Adam state (after real steps), counters, RNG, config dump, meta."""
    net, ema = _net(0), _net(1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
    meta = {"net": NetConfig(kind="mlp", hidden=16, depth=1).model_dump(), "shape": [2], "num_classes": 0,
            "convention": "t0=data,t1=noise"}
    return {"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step, "bad_steps": 1,
            "rng": checkpoint.rng_state(), "train_config": TrainConfig(steps=10).model_dump(mode="json"),
            "meta": meta}


@pytest.fixture(params=["plain", "file_url"])
def root(request, tmp_path):
    """The same tests on a plain path and on a file:// URL."""
    return str(tmp_path) if request.param == "plain" else f"file://{tmp_path}"


def _local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


# --- training checkpoints ------------------------------------------------------------------------------------------

def test_training_state_round_trips_with_weights_only(root):
    d = storage.join(root, "ck")
    state = training_state(7)
    url = checkpoint.save(d, state)
    assert url == storage.join(d, "ckpt-0000007.pt")
    assert checkpoint.latest(d) == url
    out = checkpoint.load(url)
    assert_same(state, out)
    # the state restores a real module and optimizer
    net = _net(5)
    net.load_state_dict(out["net"])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt.load_state_dict(out["opt"])
    assert TrainConfig.model_validate(out["train_config"]) == TrainConfig(steps=10)
    # and it is a plain torch file that weights_only=True reads directly
    direct = torch.load(_local(url), map_location="cpu", weights_only=True)
    assert direct["step"] == 7
    assert_same(checkpoint.load_latest(d), out)


def test_latest_points_to_newest_and_old_ones_are_pruned(root):
    d = storage.join(root, "ck")
    assert checkpoint.latest(d) is None and checkpoint.load_latest(d) is None
    stray = _local(d) / "ckpt-0000003.pt.tmp-0123abcd"  # what a writer killed mid-write leaves
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half")
    for step in (5, 10, 15, 20):
        checkpoint.save(d, {"step": step, "w": torch.full((4,), float(step))})
    names = sorted(p.name for p in _local(d).iterdir())
    assert names == ["ckpt-0000015.pt", "ckpt-0000020.pt", "latest.json"]
    info = json.loads((_local(d) / "latest.json").read_text())
    data = (_local(d) / "ckpt-0000020.pt").read_bytes()
    assert info == {"step": 20, "file": "ckpt-0000020.pt", "sha256": storage.sha256(data), "bytes": len(data)}
    assert checkpoint.latest(d).endswith("ckpt-0000020.pt")
    assert checkpoint.latest_info(d) == checkpoint.LatestPointer(**info)
    assert checkpoint.load_latest(d)["step"] == 20
    checkpoint.save(d, {"step": 30}, keep=1)
    assert sorted(p.name for p in _local(d).glob("ckpt-*.pt")) == ["ckpt-0000030.pt"]
    # the pruning order is by step, not by name
    checkpoint.save(d, {"step": 10_000_000}, keep=2)
    assert sorted(p.name for p in _local(d).glob("ckpt-*.pt")) == ["ckpt-0000030.pt", "ckpt-10000000.pt"]


@pytest.mark.parametrize("torn", [b'{"step": 20, "file": "ckpt-00', b"", b'{"step": 20}',
                                  b'{"step": 20, "file": "../../etc/x.pt", "sha256": "' + b"0" * 64 + b'", "bytes": 1}',
                                  b'{"step": 20, "file": "ckpt-0000020.pt", "sha256": "nothex", "bytes": 1}'])
def test_torn_latest_json_is_refused_naming_it(root, torn):
    d = storage.join(root, "ck")
    checkpoint.save(d, {"step": 20})
    (_local(d) / "latest.json").write_bytes(torn)
    with pytest.raises(CheckpointError, match=r"latest\.json") as exc:
        checkpoint.latest(d)
    with pytest.raises(CheckpointError, match=r"latest\.json"):
        checkpoint.latest_info(d)
    assert "--redo-stage" in str(exc.value)
    with pytest.raises(CheckpointError, match=r"latest\.json"):
        checkpoint.load(storage.join(d, "ckpt-0000020.pt"))


def test_truncated_checkpoint_is_refused_naming_it(root):
    d = storage.join(root, "ck")
    url = checkpoint.save(d, training_state(10))
    p = _local(url)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="ckpt-0000010.pt") as exc:
        checkpoint.load(url)
    assert "truncated or corrupt" in str(exc.value) and "--redo-stage" in str(exc.value)
    # without the hash check the truncated zip still fails to unpickle: a CheckpointError, not a zip error
    with pytest.raises(CheckpointError, match="ckpt-0000010.pt.*truncated or corrupt"):
        checkpoint.load(url, verify=False)


def test_sha_mismatch_is_refused(root):
    d = storage.join(root, "ck")
    url = checkpoint.save(d, {"step": 3, "w": torch.zeros(16)})
    p = _local(url)
    other = io.BytesIO()
    torch.save({"step": 3, "w": torch.ones(16)}, other)  # a valid checkpoint, but not the one latest.json names
    p.write_bytes(other.getvalue())
    with pytest.raises(CheckpointError, match=r"ckpt-0000003\.pt does not match the sha256 in .*latest\.json"):
        checkpoint.load(url)
    assert torch.equal(checkpoint.load(url, verify=False)["w"], torch.ones(16))  # verify=False skips only the hash


def test_missing_checkpoint_is_a_checkpoint_error(root):
    with pytest.raises(CheckpointError, match="ckpt-0000001.pt does not exist"):
        checkpoint.load(storage.join(root, "nowhere", "ckpt-0000001.pt"))


class _Payload:
    """Unpickling this calls _touch(marker): arbitrary code a weights_only=False load would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path: str) -> str:
    Path(path).write_text("code ran")
    return path


@pytest.mark.parametrize("writer", ["torch_save", "raw_pickle"])
def test_pickled_callable_is_refused_and_never_runs(root, tmp_path, writer):
    marker = tmp_path / "pwned"
    d = storage.join(root, "ck")
    url = storage.join(d, "ckpt-0000001.pt")
    _local(d).mkdir(parents=True)
    evil = {"step": 1, "net": {}, "x": _Payload(str(marker))}
    if writer == "torch_save":
        torch.save(evil, _local(url))
    else:
        _local(url).write_bytes(pickle.dumps(evil, protocol=2))
    # sanity: the payload is live (a full unpickle would run it), in a throwaway copy
    pickle.loads(pickle.dumps(_Payload(str(tmp_path / "live"))))
    assert (tmp_path / "live").exists()
    # no latest.json: nothing to verify against, so only weights_only stands between the file and the code
    with pytest.raises(CheckpointError, match="ckpt-0000001.pt") as exc:
        checkpoint.load(url)
    assert not marker.exists(), "the pickled callable ran"
    msg = str(exc.value)
    assert "weights_only=True" in msg and "_touch" in msg  # names the refused global
    # pointed at by a latest.json whose hash matches (an attacker who can write the root writes both): still refused
    data = _local(url).read_bytes()
    storage.write_json(storage.join(d, "latest.json"),
                       {"step": 1, "file": "ckpt-0000001.pt", "sha256": storage.sha256(data), "bytes": len(data)})
    with pytest.raises(CheckpointError, match="ckpt-0000001.pt"):
        checkpoint.load_latest(d)
    # the same for a single-file artifact with a matching sidecar
    art = storage.join(root, "guide.pt")
    _local(art).write_bytes(data)
    _local(art + ".sha256").write_text(f"{storage.sha256(data)}  guide.pt\n")
    with pytest.raises(CheckpointError, match="guide.pt"):
        checkpoint.load_file(art)
    assert not marker.exists(), "the pickled callable ran"


def test_save_refuses_what_weights_only_cannot_load(root):
    import enum

    class Kind(enum.Enum):
        A = "a"

    d = storage.join(root, "ck")
    with pytest.raises(TypeError, match=r"state\['meta'\]\['kind'\]"):
        checkpoint.save(d, {"step": 1, "meta": {"kind": Kind.A}})
    with pytest.raises(TypeError, match="fn"):
        checkpoint.save_file(storage.join(root, "a.pt"), {"fn": print})
    with pytest.raises(ValueError, match="step"):
        checkpoint.save(d, {"w": torch.zeros(1)})
    assert not _local(d).exists() or not list(_local(d).iterdir())  # nothing was written


# --- RNG -----------------------------------------------------------------------------------------------------------

def test_rng_state_round_trip_reproduces_draws(root):
    torch.manual_seed(123)
    torch.rand(7)
    d = storage.join(root, "ck")
    checkpoint.save(d, {"step": 1, "rng": checkpoint.rng_state()})
    expected = torch.rand(100)
    torch.manual_seed(999)  # move the generator elsewhere
    checkpoint.set_rng_state(checkpoint.load_latest(d)["rng"])
    assert torch.equal(torch.rand(100), expected)


def test_set_rng_state_tolerates_states_without_cuda_and_legacy_tensors():
    state = checkpoint.rng_state()
    assert set(state) == ({"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"})
    a = torch.rand(5)
    checkpoint.set_rng_state({"cpu": state["cpu"]})  # saved on a machine without CUDA
    assert torch.equal(torch.rand(5), a)
    checkpoint.set_rng_state(state["cpu"])  # a checkpoint from before this module stored the bare CPU state
    assert torch.equal(torch.rand(5), a)
    checkpoint.set_rng_state({"cpu": state["cpu"], "cuda": []})
    assert torch.equal(torch.rand(5), a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_round_trip():
    torch.cuda.manual_seed_all(3)
    state = checkpoint.rng_state()
    a = torch.rand(10, device="cuda")
    torch.cuda.manual_seed_all(4)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(10, device="cuda"), a)


# --- single-file artifacts -----------------------------------------------------------------------------------------

def test_save_file_load_file_round_trip(root):
    url = storage.join(root, "teacher", "guide.pt")
    net = build_net(NetConfig(kind="mlp", hidden=16, depth=1), (2,))
    state = {"ema": net.state_dict(), "net": net.state_dict(), "step": 2, "meta": {"shape": [2]}}
    assert checkpoint.save_file(url, state) == url
    side = _local(url + ".sha256").read_text()
    assert side == f"{storage.sha256(_local(url).read_bytes())}  guide.pt\n"  # sha256sum -c format
    assert_same(checkpoint.load_file(url), state)
    assert_same(checkpoint.load(url), state)  # load() checks the sidecar when there is one
    assert not list(_local(url).parent.glob("*.tmp-*"))


def test_load_file_detects_tampering(root):
    url = storage.join(root, "cache", "digit_net.pt")
    checkpoint.save_file(url, {"w": torch.zeros(8), "n": 1})
    other = io.BytesIO()
    torch.save({"w": torch.ones(8), "n": 1}, other)
    _local(url).write_bytes(other.getvalue())
    with pytest.raises(CheckpointError, match=r"digit_net\.pt does not match the sha256 in .*digit_net\.pt\.sha256"):
        checkpoint.load_file(url)
    with pytest.raises(CheckpointError, match="digit_net.pt"):
        checkpoint.load(url)
    # a truncated payload, a torn sidecar and a missing sidecar are refused too, each naming the file
    checkpoint.save_file(url, {"w": torch.zeros(8)})
    data = _local(url).read_bytes()
    _local(url).write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="digit_net.pt"):
        checkpoint.load_file(url)
    _local(url).write_bytes(data)
    _local(url + ".sha256").write_text("garbage")
    with pytest.raises(CheckpointError, match=r"digit_net\.pt\.sha256 is unreadable"):
        checkpoint.load_file(url)
    os.remove(_local(url + ".sha256"))
    with pytest.raises(CheckpointError, match=r"no hash sidecar"):
        checkpoint.load_file(url)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_file(storage.join(root, "missing.pt"))
