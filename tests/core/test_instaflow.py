"""InstaFlow's two ablations as pipeline options: a one-step student distilled straight from the teacher's pairs
(`reflow.rounds: 0`), and pairs simulated with classifier-free guidance (`pairs.guidance: cfg`)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from helpers import tiny

from reflow_core import checkpoint, stages, storage
from reflow_core.config import ConfigError
from reflow_core.pairs import PairStore, PairStoreMismatch, simulate_shard, store_for_config
from reflow_core.preset import load_preset
from reflow_core.velocity import build_velocity_model, velocity_for

REPO = Path(__file__).resolve().parents[2]


def _plan(cfg):
    return stages.plan(cfg, stages.RunDir("/r", "x"))


# --- reflow.rounds: 0 ----------------------------------------------------------------------------------------------

def test_rounds_0_distils_the_teacher_from_its_own_pairs():
    cfg = load_preset("digits_distill", {"reflow.rounds": 0})
    plan = _plan(cfg)
    assert [(s.name, s.kind, s.round) for s in plan] == [
        ("teacher", "teacher", 0), ("pairs", "pairs", 1), ("distill", "distill", 1), ("evaluate", "evaluate", 0)]
    assert [s.writes for s in plan] == ["/r/x/teacher", "/r/x/pairs.zarr", "/r/x/distill", "/r/x/eval"]
    assert plan[1].inputs == {"model": "teacher"}
    assert plan[2].inputs == {"pairs": "pairs", "teacher": "teacher", "init": "teacher"}
    assert plan[3].inputs == {"teacher": "teacher", "distilled": "distill"}
    assert stages.model_names(cfg) == ["teacher", "distilled"]
    assert stages.final_models(plan) == {"distilled"}
    slim = load_preset("digits_slim", {"reflow.rounds": 0})
    assert [s.name for s in _plan(slim)] == ["teacher", "pairs", "anneal", "distill", "evaluate"]
    assert stages.find(_plan(slim), "anneal").inputs == {"pairs": "pairs", "teacher": "teacher"}
    assert stages.model_names(slim) == ["teacher", "anneal", "slim"]


def test_rounds_1_and_more_keep_their_plans():
    one = _plan(load_preset("digits_distill"))
    assert [s.name for s in one] == ["teacher", "pairs", "reflow", "distill-pairs", "distill", "evaluate"]
    assert stages.find(one, "distill").inputs == {"pairs": "distill-pairs", "teacher": "reflow", "init": "reflow"}
    assert stages.find(one, "distill-pairs").round == 2
    two = load_preset("digits_distill", {"reflow.rounds": 2})
    assert stages.model_names(two) == ["teacher", "reflow", "reflow-2", "distilled"]


def test_rounds_0_needs_a_student_and_eval_models_of_the_run():
    with pytest.raises(ConfigError, match="reflow.rounds: 0 .*distill"):
        load_preset("digits", {"reflow.rounds": 0})
    with pytest.raises(ConfigError, match=r"eval.models \['reflow'\].*reflow.rounds=0"):
        _plan(load_preset("digits_distill", {"reflow.rounds": 0, "eval.models": ["reflow"]}))


@pytest.mark.slow
def test_rounds_0_runs_end_to_end_through_the_cli(tmp_path):
    """`reflow run --local` of a tiny toy2d_distill with no reflow round: the student starts from the teacher's EMA,
    learns the teacher's store (made by the teacher's checkpoint), and is evaluated beside it; no reflow artifact."""
    sets = tiny({"reflow.rounds": 0, "distill.train": {"steps": 20, "batch_size": 64, "ckpt_every": 10,
                                                       "log_every": 10, "warmup": 5}})
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REFLOW_FAULT", "MLFLOW"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    code = "import sys, torch; torch.set_num_threads(1); from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "run", "--local", "--preset", "toy2d_distill", "--root",
                           str(tmp_path), "--run", "z", *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "z"
    assert sorted(p.name for p in run.iterdir() if p.name not in ("config.json",) and not p.name.startswith(".")) \
        == ["distill", "eval", "pairs.zarr", "teacher"]
    m = storage.read_json(str(run / "eval" / "metrics.json"))
    assert m["models"] == ["teacher", "distilled"] and {r["model"] for r in m["rows"]} == {"teacher", "distilled"}
    teacher_url = stages.model_checkpoint(stages.RunDir.of(str(tmp_path), "z"), "teacher")
    attrs = dict(zarr.open_group(str(run / "pairs.zarr"), mode="r").attrs)
    assert attrs["teacher_hash"] == storage.sha256(storage.read_bytes(teacher_url)) and "guidance" not in attrs
    student, teacher = checkpoint.load_latest(str(run / "distill")), checkpoint.load(teacher_url)
    assert student["step"] == 20 and student["meta"] == teacher["meta"]
    assert not all(torch.equal(student["ema"][k], teacher["ema"][k]) for k in student["ema"])  # it was trained


# --- pairs.guidance: cfg -------------------------------------------------------------------------------------------

W = 2.5
TINY_DIGITS = {"net": {"kind": "unet", "channels": 8, "channel_mult": [1], "num_res_blocks": 1,
                       "attn_resolutions": [], "dropout": 0.0, "class_cond": True},
               "pairs": {"n_pairs": 16, "shard_size": 16, "chunk_size": 8, "batch_size": 16, "solver": "euler",
                         "nfe": 2, "grid": "uniform"}}


def _simulate(root: Path, guidance: dict) -> tuple[PairStore, "torch.nn.Module"]:
    """The pairs stage of a digits run whose teacher is a class-conditional U-Net with random weights, saved as an
    ordinary checkpoint."""
    cfg = load_preset("digits", {**copy.deepcopy(TINY_DIGITS), **{f"pairs.{k}": v for k, v in guidance.items()}})
    rundir = stages.prepare_run(cfg, str(root), "g")
    ds = stages.dataset(cfg)
    model = stages.base.new_model(cfg, ds, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every weight random (a fresh U-Net zero-initialises its output and label paths)
        for prm in model.parameters():
            prm.copy_(0.2 * torch.randn(prm.shape, generator=g))
    url = checkpoint.save(rundir.url("teacher"), {"net": model.state_dict(), "ema": model.state_dict(), "step": 1,
                                                  "meta": stages.base.model_meta(cfg, ds)})
    st = stages.find(stages.plan(cfg, rundir), "pairs")
    stages.pairs.run(st, stages.Context(cfg, rundir), {"model": stages.StageOutput({"model": url})})
    return PairStore.open(st.writes), model.eval()


def test_guided_pairs_follow_cfg_and_differ_from_unguided(tmp_path):
    """Stored CFG pairs equal two Euler steps of v_null + w (v_cond - v_null), the two velocities computed here
    from the network's labelled and null-label calls; unguided pairs of the same noise and labels differ."""
    guided, model = _simulate(tmp_path / "a", {"guidance": "cfg", "guidance_weight": W})
    plain, _ = _simulate(tmp_path / "b", {})
    g = zarr.open_group(guided.url, mode="r")
    p = zarr.open_group(plain.url, mode="r")
    noise, sample, label = (torch.from_numpy(np.asarray(g[k][...])) for k in ("noise", "sample", "label"))
    assert np.array_equal(g["noise"][...], p["noise"][...]) and np.array_equal(g["label"][...], p["label"][...])
    assert (label >= 0).all() and len(set(label.tolist())) > 1
    assert not np.allclose(g["sample"][...], p["sample"][...], atol=1e-3)
    rows = slice(0, 5)
    x, lab = noise[rows], label[rows]

    def v_cfg(x, t):
        tt = torch.full((x.shape[0],), t)
        with torch.no_grad():
            cond = model.backbone(x, tt, lab)
            null = model.backbone(x, tt, torch.full_like(lab, model.num_classes))
        return null + W * (cond - null)

    x = x - 0.5 * v_cfg(x, 1.0)  # Euler, uniform grid 1 -> 0.5 -> 0
    x = x - 0.5 * v_cfg(x, 0.5)
    torch.testing.assert_close(sample[rows], x, rtol=1e-5, atol=1e-5)
    assert guided.attrs["guidance"] == "cfg" and guided.attrs["guidance_weight"] == W
    assert "guidance" not in plain.attrs and "guidance_weight" not in plain.attrs  # unguided attrs as before


def test_guided_pairs_need_a_class_conditional_net():
    with pytest.raises(ConfigError, match="pairs.guidance='cfg' needs a class-conditional net"):
        load_preset("toy2d", {"pairs.guidance": "cfg"})
    assert load_preset("digits").identity() != load_preset("digits", {"pairs.guidance": "cfg"}).identity()


def test_a_store_is_never_resumed_across_a_guidance_change(tmp_path):
    """Both ways, at create (store_for_config) and at simulate (a store opened directly, then simulated with another
    config); a store without the keys reads as unguided."""
    from reflow_core.config import PairsConfig
    base = dict(n_pairs=32, shard_size=16, chunk_size=8, batch_size=16, solver="euler", nfe=2, grid="uniform")
    plain, cfg = PairsConfig(**base), PairsConfig(**base, guidance="cfg", guidance_weight=W)
    other_w = PairsConfig(**base, guidance="cfg", guidance_weight=1.5)
    v = velocity_for(build_velocity_model(load_preset("digits", TINY_DIGITS).net, (1, 8, 8), 10),
                     guidance="cfg", weight=W)
    for first, second in ((plain, cfg), (cfg, plain), (cfg, other_w)):
        url = str(tmp_path / f"{first.guidance}-{first.guidance_weight}-{second.guidance_weight}.zarr")
        store = store_for_config(url, first, shape=(1, 8, 8), teacher_hash="h")
        with pytest.raises(PairStoreMismatch, match="guidance"):
            store_for_config(url, second, shape=(1, 8, 8), teacher_hash="h")
        with pytest.raises(PairStoreMismatch, match="guidance"):
            simulate_shard(store, 0, v, cfg=second, num_classes=10)
        assert store.pending_shards() == [0, 1]
    again = store_for_config(str(tmp_path / "p.zarr"), plain, shape=(1, 8, 8), teacher_hash="h")
    assert store_for_config(again.url, plain, shape=(1, 8, 8), teacher_hash="h").attrs == again.attrs
