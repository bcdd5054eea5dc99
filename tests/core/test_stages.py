"""Stages as data: the plan of a config, k-rectified flows, exact resume after kill -9, and one plan walked by both
runners (`reflow run --local` and the Prefect flow) with bit-identical results.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_same, tiny

from flows import cli
from reflow_core import checkpoint, stages, storage
from reflow_core.config import ConfigError
from reflow_core.preset import load_preset

REPO = Path(__file__).resolve().parents[2]

# tiny but real: two reflow rounds, every stage does work in a second or two on one thread
TINY = tiny({"reflow.rounds": 2})


def _names(cfg) -> list[str]:
    return [s.name for s in stages.plan(cfg, stages.RunDir("file:///r", "x"))]


# --- the plan ------------------------------------------------------------------------------------------------------

def test_plan_of_one_round_keeps_the_historical_names_and_layout():
    cfg = load_preset("toy2d")
    plan = stages.plan(cfg, stages.RunDir("/r", "toy2d"))
    assert [(s.name, s.kind, s.round) for s in plan] == [
        ("teacher", "teacher", 0), ("pairs", "pairs", 1), ("reflow", "reflow", 1), ("evaluate", "evaluate", 0)]
    assert [s.writes for s in plan] == ["/r/toy2d/teacher", "/r/toy2d/pairs.zarr", "/r/toy2d/reflow",
                                        "/r/toy2d/eval"]
    assert plan[1].inputs == {"model": "teacher"}
    assert plan[2].inputs == {"pairs": "pairs", "init": "teacher"}
    assert plan[3].inputs == {"teacher": "teacher", "reflow": "reflow"}


def test_plan_of_k_rounds_chains_each_round_on_the_last_model():
    cfg = load_preset("digits_3rf")
    assert cfg.reflow.rounds == 2
    plan = stages.plan(cfg, stages.RunDir("/r", "d"))
    assert [s.name for s in plan] == ["teacher", "pairs", "reflow", "pairs-2", "reflow-2", "evaluate"]
    p2, r2, ev = plan[3], plan[4], plan[5]
    assert p2.inputs == {"model": "reflow"} and p2.writes == "/r/d/pairs-2.zarr" and p2.round == 2
    assert r2.inputs == {"pairs": "pairs-2", "init": "reflow"} and r2.writes == "/r/d/reflow-2"
    assert ev.inputs == {"teacher": "teacher", "reflow": "reflow", "reflow-2": "reflow-2"}
    three = load_preset("toy2d", {"reflow.rounds": 3})
    assert _names(three) == ["teacher", "pairs", "reflow", "pairs-2", "reflow-2", "pairs-3", "reflow-3", "evaluate"]


def test_plan_reads_only_earlier_stages_and_writes_distinct_artifacts():
    for preset in ("toy2d", "digits", "digits_3rf", "digits_simple"):
        plan = stages.plan(load_preset(preset), stages.RunDir("/r", "x"))
        seen = set()
        for s in plan:
            assert {src for _, src in s.reads} <= seen, (preset, s)
            seen.add(s.name)
        assert len({s.writes for s in plan}) == len(plan)


def test_eval_models_select_and_autoguidance_reads_the_teacher_guide():
    cfg = load_preset("toy2d", {"reflow.rounds": 2, "eval.models": ["reflow-2"]})
    assert stages.find(stages.plan(cfg, stages.RunDir("/r", "x")), "evaluate").inputs == {"reflow-2": "reflow-2"}
    with pytest.raises(ConfigError, match="reflow-3"):
        stages.plan(load_preset("toy2d", {"reflow.rounds": 2, "eval.models": ["reflow-3"]}), stages.RunDir("/r", "x"))
    guided = load_preset("digits", {"eval.guidance": "autoguidance", "eval.nfes": [2]})
    ev = stages.find(stages.plan(guided, stages.RunDir("/r", "x")), "evaluate")
    assert ev.inputs["guide"] == "teacher"


def test_every_stage_kind_satisfies_the_typed_contract():
    import inspect
    from typing import get_type_hints

    def params(fn) -> list[str]:
        return [p for p in inspect.signature(fn).parameters if p != "self"]

    assert set(stages.KINDS) == {"teacher", "pairs", "reflow", "anneal", "distill", "evaluate"}
    for name, kind in stages.KINDS.items():
        assert isinstance(kind, stages.StageKind), name
        for fn in ("done", "run"):  # the same parameters, in the same order, as the Protocol
            assert params(getattr(kind, fn)) == params(getattr(stages.StageKind, fn)), (name, fn)
            assert get_type_hints(getattr(kind, fn))["return"] is get_type_hints(getattr(stages.StageKind, fn))[
                "return"], (name, fn)
    assert isinstance(stages.pairs, stages.ShardedKind)
    for fn in ("pending", "simulate", "finish"):
        assert params(getattr(stages.pairs, fn)) == params(getattr(stages.ShardedKind, fn)), fn
    assert [n for n, k in stages.KINDS.items() if isinstance(k, stages.ShardedKind)] == ["pairs"]
    plan = stages.plan(load_preset("digits_slim"), stages.RunDir("/r", "x"))
    assert [s.name for s in plan if stages.sharded(s) is not None] == ["pairs", "distill-pairs"]


def test_upstream_and_unknown_names():
    plan = stages.plan(load_preset("digits_3rf"), stages.RunDir("/r", "x"))
    assert [s.name for s in stages.upstream(plan, ["reflow-2"])] == ["teacher", "pairs", "reflow", "pairs-2",
                                                                      "reflow-2"]
    assert [s.name for s in stages.upstream(plan, ["pairs"])] == ["teacher", "pairs"]
    with pytest.raises(ConfigError, match="reflow-3"):
        stages.find(plan, "reflow-3")


def test_reflow_plan_command_prints_the_plan(capsys):
    for preset, expect in (("toy2d", ["teacher", "pairs", "reflow", "evaluate"]),
                           ("digits", ["teacher", "pairs", "reflow", "evaluate"]),
                           ("digits_3rf", ["teacher", "pairs", "reflow", "pairs-2", "reflow-2", "evaluate"])):
        assert cli.main(["plan", "--preset", preset]) == 0
        out = capsys.readouterr().out
        lines = [ln.split() for ln in out.splitlines()[1:]]
        assert [ln[1] for ln in lines] == expect, out
        assert "<run>/pairs.zarr" in out and "<run>/eval" in out
    assert "<run>/pairs-2.zarr" in out and "init=reflow" in out


def test_unknown_stage_names_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--local", "--preset", "toy2d", "--root", str(tmp_path), "--redo-stage", "reflow-2"])
    assert exc.value.code == 2 and "reflow-2" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("runner", ["local", "flow"])
def test_a_pair_layout_the_store_refuses_is_refused_before_the_teacher_trains(tmp_path, capsys, runner):
    """500 backward rows in chunks of 200 with forward pairs after them: a chunk would hold both sections. The store
    refuses that layout; the plan refuses it first, so no teacher step is spent on a run that cannot finish."""
    bad = ["--set", "pairs.n_pairs=500", "--set", "pairs.chunk_size=200", "--set", "pairs.shard_size=400",
           "--set", "pairs.n_forward=100", "--set", "reflow.rounds=1"]
    local = ["--local"] if runner == "local" else []
    with pytest.raises((SystemExit, ConfigError)) as exc:
        cli.main(["run", *local, "--preset", "toy2d", "--root", str(tmp_path), *bad])
    message = str(exc.value) + capsys.readouterr().err
    assert "n_backward (500) must be a multiple of chunk_size (200)" in message
    assert not list(tmp_path.rglob("ckpt-*.pt")) and not list(tmp_path.rglob("*.zarr"))


# --- config: identity vs execution by structure --------------------------------------------------------------------

def test_execution_only_fields_are_marked_in_the_schema_not_a_side_table():
    from reflow_core.config import PairsConfig, TrainConfig, is_execution_only
    execution = {n for n, f in PairsConfig.model_fields.items() if is_execution_only(f)}
    assert execution == {"batch_size", "auto_batch", "max_batch_size", "workers", "compile", "cuda_graph"}
    assert {n for n, f in TrainConfig.model_fields.items() if is_execution_only(f)} == {
        "compile", "channels_last", "log_every", "max_bad_steps"}
    a = load_preset("toy2d")
    b = load_preset("toy2d", {"pairs.batch_size": 7, "pairs.workers": 3, "reflow.ram_budget_mb": 0,
                              "reflow.train.log_every": 3, "teacher.train.compile": True, "eval.nfes": [3]})
    assert a.identity() == b.identity()
    assert "batch_size" not in a.identity()["pairs"] and "n_pairs" in a.identity()["pairs"]
    assert a.identity() != load_preset("toy2d", {"reflow.rounds": 2}).identity()
    assert a.identity() != load_preset("toy2d", {"reflow.train.batch_size": 7}).identity()


# --- exact resume after kill -9 ------------------------------------------------------------------------------------

def _run_local(root: Path, run: str, sets: dict = TINY, **env) -> subprocess.CompletedProcess:
    sets = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    e = {k: v for k, v in os.environ.items() if not k.startswith(("REFLOW_FAULT", "MLFLOW"))}
    e.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **env)
    code = "import sys, torch; torch.set_num_threads(1); from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "run", "--local", "--preset", "toy2d", "--root", str(root),
                           "--run", run, *sets], env=e, capture_output=True, text=True, timeout=600)


def _final_state(root: Path, run: str, stage: str) -> dict:
    return checkpoint.load_latest(storage.join(str(root), run, stage))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    proc = _run_local(root, "r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage,step", [("teacher", 20), ("reflow", 10), ("reflow-2", 20)])
def test_kill_9_after_a_checkpoint_then_rerun_equals_an_uninterrupted_run(tmp_path, uninterrupted, stage, step):
    root = tmp_path / "runs"
    killed = _run_local(root, "r", REFLOW_FAULT_STAGE=stage, REFLOW_FAULT_AT_STEP=str(step), REFLOW_FAULT_KILL="1")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert checkpoint.load_latest(storage.join(str(root), "r", stage))["step"] == step  # it died mid-stage
    again = _run_local(root, "r")
    assert again.returncode == 0, again.stderr[-3000:]
    for s in ("teacher", "reflow", "reflow-2"):  # the killed stage and every later one
        a, b = _final_state(uninterrupted, "r", s), _final_state(root, "r", s)
        assert a["step"] == b["step"]
        assert_same(a["ema"], b["ema"], f"{s}.ema")
        assert_same(a["net"], b["net"], f"{s}.net")
        assert_same(a["opt"], b["opt"], f"{s}.opt")
    rows = [storage.read_json(str(r / "r" / "eval" / "metrics.json"))["rows"] for r in (uninterrupted, root)]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in rows[0]] == \
           [{k: v for k, v in row.items() if k != "seconds"} for row in rows[1]]


@pytest.mark.slow
def test_k_rectified_flow_evaluates_every_model(uninterrupted):
    m = storage.read_json(str(uninterrupted / "r" / "eval" / "metrics.json"))
    assert m["models"] == ["teacher", "reflow", "reflow-2"]
    got = {(r["model"], r["nfe"]) for r in m["rows"]}
    assert got == {(mo, n) for mo in m["models"] for n in (1, 2)}
    store2 = storage.join(str(uninterrupted), "r", "pairs-2.zarr")
    from reflow_core.pairs import PairStore
    attrs = PairStore.open(store2).attrs
    reflow1 = checkpoint.latest(str(uninterrupted / "r" / "reflow"))
    assert attrs["teacher_hash"] == storage.sha256(storage.read_bytes(reflow1))  # round 2 simulated by reflow-1
    assert (uninterrupted / "r" / "eval" / "sliced_w2_vs_nfe.png").exists()
    # the k-th model is sampled by name, through the CLI
    out = uninterrupted / "x.npy"
    assert cli.main(["sample", "--root", str(uninterrupted), "--run", "r", "--model", "reflow-2", "--n", "16",
                     "--out", str(out)]) == 0
    assert out.exists()


def test_time_grid_is_one_tagged_union():
    from reflow_core.config import EvalConfig, ListGrid, PairsConfig, RhoGrid, UniformGrid
    assert isinstance(EvalConfig().grid, UniformGrid) and isinstance(PairsConfig().grid, RhoGrid)
    assert EvalConfig(grid="rho").grid == RhoGrid()  # a bare kind: that kind with its defaults
    g = EvalConfig(grid={"kind": "rho", "rho": 3.0, "per_nfe": {2: 1.5}}).grid
    assert g.solver_args(2) == {"grid": "rho", "rho": 1.5, "times": None}  # the tuned rho of that NFE
    assert g.solver_args(4) == {"grid": "rho", "rho": 3.0, "times": None}  # the others: rho
    lst = EvalConfig(nfes=[3], grid={"kind": "list", "times": [1.0, 0.6, 0.2, 0.0]}).grid
    assert isinstance(lst, ListGrid) and lst.solver_args(3)["times"] == [1.0, 0.6, 0.2, 0.0]
    for bad, match in (({"kind": "list", "times": [1.0, 0.5]}, "strictly down"),
                       ({"kind": "rho", "rho": 2.0, "times": [1.0, 0.0]}, "times"),  # fields of another kind
                       ({"kind": "cosine"}, "kind"), ({"kind": "rho", "per_nfe": {0: 2.0}}, "per_nfe")):
        with pytest.raises(ValueError, match=match):
            EvalConfig(grid=bad)
    with pytest.raises(ValueError, match="3 steps"):  # a list grid fixes the NFE of each solver
        EvalConfig(nfes=[2], grid={"kind": "list", "times": [1.0, 0.6, 0.2, 0.0]})
    with pytest.raises(ValueError, match="kind"):  # inversion needs a grid it can reverse: no list for pairs
        PairsConfig(grid={"kind": "list", "times": [1.0, 0.0]})
    assert UniformGrid().solver_args(8) == {"grid": "uniform", "rho": 1.0, "times": None}


# --- hostile run names (one check, where run paths are built) -------------------------------------------------------

@pytest.mark.parametrize("bad", ["../../escape", "a/b", "..", ".", "", "x" * 101, "a b", "ok\n", "s3://b/x"])
def test_run_names_that_would_leave_the_root_are_refused_before_any_io(tmp_path, capsys, bad):
    root = tmp_path / "root"
    with pytest.raises(ConfigError, match="invalid run name"):
        stages.RunDir.of(str(root), bad)
    with pytest.raises(ConfigError, match="invalid run name"):
        stages.prepare_run(load_preset("toy2d"), str(root), bad)
    for argv in (["run", "--local", "--preset", "toy2d", "--root", str(root), "--run", bad],
                 ["sample", "--root", str(root), "--run", bad, "--out", str(tmp_path / "x.npy")]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2 and "invalid run name" in capsys.readouterr().err
    assert not root.exists() and not any(tmp_path.iterdir())  # nothing written anywhere
    with pytest.raises(ConfigError):
        load_preset("toy2d", {"name": bad if bad else ".."})


def test_safe_run_names_are_accepted():
    for ok in ("toy2d", "run-2", "a.b_c", "x" * 100):
        assert stages.RunDir.of("/r", ok).dir == f"/r/{ok}"


def test_a_config_json_with_the_old_flat_grid_fields_reopens_with_the_same_identity(tmp_path):
    from reflow_core.config import RhoGrid, validate
    new = load_preset("digits_simple")
    old = new.model_dump(mode="json")
    old["pairs"] = {k: v for k, v in old["pairs"].items() if k != "grid"} | {"grid": "uniform", "rho": 1.5}
    old["eval"] = {k: v for k, v in old["eval"].items() if k != "grid"} | {
        "grid": "rho", "rho": 2.0, "rhos": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "times": None}
    cfg = validate(old, "config.json")
    assert cfg.identity() == new.identity()
    assert cfg.eval.grid == RhoGrid(rho=2.0, per_nfe={1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0, 9: 6.0})
    old["eval"] |= {"grid": "uniform", "rho": 1.0, "rhos": None, "times": [1.0, 0.5, 0.0], "nfes": [2],
                    "solvers": ["euler"]}
    assert validate(old).eval.grid.times == [1.0, 0.5, 0.0]


# --- one-step students: the distill stages are modules in the same plan ----------------------------------------------

def test_plan_with_a_distilled_and_a_slim_student():
    same = stages.plan(load_preset("digits_distill"), stages.RunDir("/r", "d"))
    assert [s.name for s in same] == ["teacher", "pairs", "reflow", "distill-pairs", "distill", "evaluate"]
    dp, d, ev = same[3], same[4], same[5]
    assert dp.kind == "pairs" and dp.inputs == {"model": "reflow"} and dp.writes == "/r/d/distill-pairs.zarr"
    assert d.inputs == {"pairs": "distill-pairs", "teacher": "reflow", "init": "reflow"} and d.model == "distilled"
    assert ev.inputs == {"teacher": "teacher", "reflow": "reflow", "distilled": "distill"}
    slim = stages.plan(load_preset("digits_slim"), stages.RunDir("/r", "s"))
    assert [s.name for s in slim] == ["teacher", "pairs", "reflow", "distill-pairs", "anneal", "distill", "evaluate"]
    assert stages.find(slim, "anneal").inputs == {"pairs": "distill-pairs", "teacher": "reflow"}
    assert stages.find(slim, "distill").inputs["init"] == "anneal" and stages.find(slim, "distill").model == "slim"
    assert "anneal" not in stages.find(slim, "evaluate").inputs  # evaluated on request only (eval.models)
    k = load_preset("digits_slim", {"reflow.rounds": 2})
    assert stages.find(stages.plan(k, stages.RunDir("/r", "s")), "distill-pairs").inputs == {"model": "reflow-2"}


def test_distill_config_is_checked():
    with pytest.raises(ConfigError, match="go together"):
        load_preset("digits_slim", {"distill.anneal": None})
    with pytest.raises(ConfigError, match="fgd_t"):
        load_preset("digits_slim", {"distill.fgd_t": [0.5, 1.0]})
    with pytest.raises(ConfigError, match="slim"):
        stages.plan(load_preset("digits", {"eval.models": ["teacher", "slim"]}), stages.RunDir("/r", "x"))
    assert stages.model_names(load_preset("digits_slim")) == ["teacher", "reflow", "anneal", "slim"]


TINY_SLIM = {k: v for k, v in TINY.items() if k != "reflow.rounds"} | {
    "distill.net": {"kind": "mlp", "hidden": 16, "depth": 1},
    "distill.anneal": {"steps": 10, "train": {"steps": 30, "batch_size": 64, "ckpt_every": 10, "log_every": 10,
                                              "warmup": 5, "seed": 3}},
    "distill.train": {"steps": 30, "batch_size": 64, "ckpt_every": 10, "log_every": 10, "warmup": 5, "seed": 2},
    "distill.fgd_weight": 1.0,
}


@pytest.fixture(scope="module")
def uninterrupted_slim(tmp_path_factory):
    root = tmp_path_factory.mktemp("slim")
    proc = _run_local(root, "s", sets=TINY_SLIM)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
def test_the_distill_stage_resumes_after_kill_9_bit_identically(tmp_path, uninterrupted_slim):
    # (anneal and distill train through the same loop as teacher and reflow; the kill lands in distill, after anneal)
    root = tmp_path / "runs"
    killed = _run_local(root, "s", sets=TINY_SLIM, REFLOW_FAULT_STAGE="distill", REFLOW_FAULT_AT_STEP="20",
                        REFLOW_FAULT_KILL="1")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert _run_local(root, "s", sets=TINY_SLIM).returncode == 0
    for s in ("anneal", "distill"):
        a, b = _final_state(uninterrupted_slim, "s", s), _final_state(root, "s", s)
        assert a["step"] == b["step"] == 30
        assert_same(a["ema"], b["ema"], f"{s}.ema")
        assert_same(a["opt"], b["opt"], f"{s}.opt")
    m = storage.read_json(str(root / "s" / "eval" / "metrics.json"))
    assert m["models"] == ["teacher", "reflow", "slim"]
    params = {r["model"]: r["params"] for r in m["rows"]}
    assert params["slim"] < params["reflow"] / 3  # the SlimFlow student is the small net


@pytest.mark.slow
def test_a_distilled_student_of_the_same_size_runs_and_samples(tmp_path):
    cfg = load_preset("toy2d_distill", {k: v for k, v in TINY.items() if k != "reflow.rounds"} | {
        "distill.train": {"steps": 20, "batch_size": 64, "ckpt_every": 10, "log_every": 10, "warmup": 5}})
    rows = stages.run_local(cfg, str(tmp_path), "d")
    assert {r["model"] for r in rows} == {"teacher", "reflow", "distilled"}
    assert len({r["params"] for r in rows}) == 1  # initialised from the reflow model: the same net
    rundir = stages.RunDir.of(str(tmp_path), "d")
    student = checkpoint.load_latest(str(tmp_path / "d" / "distill"))
    reflow = checkpoint.load(stages.model_checkpoint(rundir, "reflow"))
    assert student["step"] == 20 and student["meta"] == reflow["meta"]
    assert not all(torch.equal(student["ema"][k], reflow["ema"][k]) for k in student["ema"])  # it was trained
    out = tmp_path / "x.npy"
    assert cli.main(["sample", "--root", str(tmp_path), "--run", "d", "--model", "distilled", "--n", "8",
                     "--out", str(out)]) == 0 and out.exists()


def test_every_shipped_preset_validates_and_plans():
    from reflow_core.preset import preset_names
    for name in preset_names():
        cfg = load_preset(name)
        plan = stages.plan(cfg, stages.RunDir("/r", cfg.name))
        assert plan[0].name == "teacher" and plan[-1].name == "evaluate", name
        assert {s.model for s in plan if s.model} == set(stages.model_names(cfg)), name
