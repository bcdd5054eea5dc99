"""The flow's typed parameters, the team root, the run-directory lease, retries and the result views.

Typed overrides are checked against the config (every leaf has a typed, bounded key; what the config refuses the
schema refuses) and against a peer validator (jsonschema, as the Prefect server uses it). The lease is exercised
with real processes racing for a local run directory and on the moto S3 server.
"""
from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jsonschema
import pytest
from prefect.states import Failed
from prefect.utilities.callables import parameter_schema

from flows import report, root
from flows.retry import retry_transient
from flows import reflow as reflow_module
from reflow_core import lease, storage
from flows.params import KEYS, OVERRIDE_KEYS, ConfigOverrides, leaf_overrides, override_dict
from reflow_core.config import ConfigError
from reflow_core.preset import load_preset, preset_names
from reflow_core.pairs import PairStoreCorrupt

REPO = Path(__file__).resolve().parents[2]


def _schema() -> dict:
    s = parameter_schema(reflow_module.reflow.fn).model_dump()
    return {"type": "object", "properties": s["properties"], "definitions": s["definitions"],
            "additionalProperties": False}


def test_every_config_leaf_is_a_typed_override_key():
    cfg = load_preset("toy2d").model_dump(mode="json")

    def leaves(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and path not in OVERRIDE_KEYS:
                out |= leaves(v, f"{path}.")
            else:
                out.add(path)
        return out

    assert leaves(cfg) | set(KEYS) == set(OVERRIDE_KEYS)  # and the flow's own settings (engine, tracking)
    assert len(OVERRIDE_KEYS) > 80


def test_orchestration_settings_are_the_flows_and_old_configs_still_load():
    """Shard engine, Dask address and tracking are read by the flow (flows/params.py), not the torch core's schema;
    a config that still carries them (every config.json written before) loads to the same config."""
    from flows.params import orchestration
    from reflow_core.config import PairsConfig, PipelineConfig, validate

    old = load_preset("toy2d").model_dump(mode="json") | {"tracking": {"mlflow_uri": "sqlite:///x.db", "experiment": "e"}}
    old["pairs"] = {**old["pairs"], "engine": "dask", "dask_address": "tcp://h:8786"}
    assert validate(old) == load_preset("toy2d")
    assert "engine" not in PairsConfig.model_fields and "tracking" not in PipelineConfig.model_fields
    o = orchestration("toy2d", {"pairs.engine": "dask", "tracking.experiment": "e"})
    assert (o.engine, o.experiment, o.dask_address, o.mlflow_uri) == ("dask", "e", None, None)
    with pytest.raises(ConfigError, match="engine"):
        orchestration("toy2d", {"pairs.engine": "ray"})
    with pytest.raises(ConfigError, match="tracking"):  # an unknown key of the old section is still an error
        load_preset("toy2d", {"tracking.experimnet": "e"})


@pytest.mark.parametrize("bad", [
    {"teacher.train.steps": 0}, {"teacher.train.steps": "many"}, {"pairs.n_pairs": -5}, {"eval.nfes": "1"},
    {"pairs.grid": "list"}, {"pairs.grid": {"kind": "rho", "rho": -1}}, {"teacher.train.stepz": 3},
    {"net.kind": "transformer"}, {"teacher.train.lr": float("inf")},
])
def test_bad_overrides_are_refused_by_the_schema_and_by_the_config(bad):
    """What the config refuses, the JSON schema a Prefect server enforces refuses too (checked with jsonschema)."""
    with pytest.raises(ConfigError):
        load_preset("toy2d", bad)
    if bad == {"teacher.train.lr": float("inf")}:
        return  # JSON has no inf: a client cannot send it
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"overrides": bad}, _schema())


@pytest.mark.parametrize("good", [
    {"teacher.train.steps": 500, "pairs.n_pairs": 4000}, {"eval.nfes": [1, 2, 4]}, {"pairs.grid": "uniform"},
    {"eval.grid": {"kind": "list", "times": [1.0, 0.5, 0.0]}, "eval.nfes": [2]}, {"teacher.checkpoint": None},
    {"distill": {"fgd_weight": 0.5}},
])
def test_good_overrides_pass_the_schema_and_load_the_same_config(good):
    jsonschema.validate({"overrides": good}, _schema())
    typed = ConfigOverrides.model_validate(good)
    assert load_preset("toy2d", override_dict(typed)) == load_preset("toy2d", good)


def test_preset_and_run_names_in_the_schema():
    schema = _schema()
    assert set(schema["properties"]["preset"]["anyOf"][0]["enum"]) == set(preset_names())
    for ok in ({"preset": "digits"}, {"preset": "team/mine.yaml"}, {"run": "cifar-a.2"}, {"stages": ["reflow-2"]},
               {"redo_stages": ["distill-pairs"]}):
        jsonschema.validate(ok, schema)
    for bad in ({"preset": "nope"}, {"preset": "x.txt"}, {"run": "a/b"}, {"run": ".."}, {"run": "x" * 101},
                {"stages": ["Reflow"]}, {"nonsense": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_cli_sets_at_any_depth_fold_into_typed_leaves():
    deep = {"pairs.grid.rho": 2.5, "teacher.train.steps": 7}
    folded = leaf_overrides("cifar10", deep)
    assert set(folded) == {"pairs.grid", "teacher.train.steps"}
    assert load_preset("cifar10", override_dict(ConfigOverrides.model_validate(folded))) == \
        load_preset("cifar10", deep)


def test_flow_run_name_is_preset_and_run(monkeypatch):
    from prefect import runtime

    for params, name in (({"preset": "digits", "run": "a"}, "digits-a"), ({"preset": "toy2d"}, "toy2d-toy2d"),
                         ({"preset": "/p/team.yaml", "overrides": {"name": "x"}}, "team-x")):
        monkeypatch.setattr(runtime.flow_run, "parameters", params, raising=False)
        assert reflow_module._flow_run_name() == name


def test_retries_skip_deterministic_errors():
    for exc, retry in ((ConfigError("bad"), False), (PairStoreCorrupt("hash"), False),
                       (lease.RunInUse("held"), False), (OSError("connection reset"), True),
                       (RuntimeError("CUDA error: unspecified launch failure"), True)):
        assert retry_transient(None, None, Failed(data=exc)) is retry, exc


def test_root_comes_from_the_parameter_the_team_variable_or_the_env(tmp_path, monkeypatch, prefect_api):
    from prefect.variables import Variable

    monkeypatch.delenv(root.ROOT_ENV, raising=False)
    Variable.unset(root.ROOT_VARIABLE)
    with pytest.raises(ConfigError, match="prefect variable set reflow_root"):
        root.resolve_root(None)
    monkeypatch.setenv(root.ROOT_ENV, str(tmp_path / "env-root"))
    assert root.resolve_root(None) == (str(tmp_path / "env-root"), "$REFLOW_ROOT")
    Variable.set(root.ROOT_VARIABLE, "s3://team-bucket/reflow", overwrite=True)
    try:
        assert root.resolve_root(None)[0] == "s3://team-bucket/reflow"  # the team setting wins over env
        monkeypatch.chdir(tmp_path)
        assert root.resolve_root("rel")[0] == str(tmp_path / "rel")  # a parameter, made absolute
    finally:
        Variable.unset(root.ROOT_VARIABLE)


def test_summary_table_reads_like_the_rows():
    rows = [{"model": m, "solver": "euler", "nfe": n, "sliced_w2": q, "straightness": s}
            for m, s, qs in (("teacher", 1.3, (1.9, 0.6)), ("reflow", 0.01, (0.16, 0.15))) for n, q in zip((1, 2), qs)]
    text = report.summary_table(rows, "sliced_w2")
    lines = text.splitlines()
    assert lines[0].startswith("sliced_w2 (lower is better)")
    assert lines[1].split() == ["model", "solver", "NFE", "1", "NFE", "2", "straightness"]
    assert lines[3].split() == ["teacher", "euler", "1.9", "0.6", "1.3"]
    assert lines[4].split() == ["reflow", "euler", "0.16", "0.15", "0.01"]
    md = report.markdown_table(rows, "sliced_w2").splitlines()
    assert md[0] == "| model | solver | NFE 1 | NFE 2 | straightness |"
    assert md[3] == "| reflow | euler | 0.16 | 0.15 | 0.01 |"
    assert report.artifact_key("My Run_1", "metrics") == "my-run-1-metrics"


# --- the run-directory lease ---------------------------------------------------------------------------------


RACER = """
import sys, time
from reflow_core import lease
run_dir, start_at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))  # both processes try at the same instant
try:
    with lease.hold(run_dir, lease.local_owner()):
        print("won", flush=True)
        time.sleep(1.0)
except lease.RunInUse:
    print("refused", flush=True)
"""


def test_of_two_processes_racing_for_a_run_exactly_one_wins(tmp_path):
    start_at = str(time.time() + 5.0)  # after every interpreter has imported reflow_core.lease
    races = {trial: [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / f"run{trial}"), start_at],
                                      cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)]
             for trial in range(3)}  # three run directories, two racers each, all at once
    for trial, procs in races.items():
        outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert outcomes == ["refused", "won"], (trial, outcomes)
        assert not (tmp_path / f"run{trial}" / lease.LEASE_FILE).exists()  # released by the winner


def test_lease_heartbeat_expiry_and_takeover(tmp_path):
    run_dir = str(tmp_path / "r")
    a = lease.acquire(run_dir, "A", ttl=0.8)
    with pytest.raises(lease.RunInUse, match=r"in use by A .*expires 1 s after"):
        lease.acquire(run_dir, "B", ttl=0.8)
    time.sleep(1.0)  # A's heartbeat (every ttl/4) keeps it alive
    with pytest.raises(lease.RunInUse):
        lease.acquire(run_dir, "B", ttl=0.8)
    a._stop.set()  # A is "lost" (another machine): no more heartbeats, nothing released
    a._thread.join()
    time.sleep(1.0)
    b = lease.acquire(run_dir, "B", ttl=0.8)  # stale: taken over
    a.release()  # a late release by A must not remove B's lease
    assert lease.read(storage.join(run_dir, lease.LEASE_FILE))["owner"] == "B"
    b.release()
    assert lease.read(storage.join(run_dir, lease.LEASE_FILE)) is None
    # the caller may know better than the clock: a holder whose flow run ended is stale at once
    c = lease.acquire(run_dir, "C")
    d = lease.acquire(run_dir, "D", is_stale=lambda holder: holder["owner"] == "C")
    d.release()
    c.release()


@pytest.mark.s3
def test_lease_on_an_object_store(moto_s3):
    moto_s3["client"].create_bucket(Bucket="lease-test")
    run_dir = "s3://lease-test/runs/r"
    a = lease.acquire(run_dir, "A", settle=0.1)
    with pytest.raises(lease.RunInUse, match="in use by A"):
        lease.acquire(run_dir, "B", settle=0.1)
    a.release()
    b = lease.acquire(run_dir, "B", settle=0.1)
    assert lease.read(storage.join(run_dir, lease.LEASE_FILE))["owner"] == "B"
    b.release()


def test_local_runner_refuses_a_held_run(tmp_path):
    from reflow_core import stages

    cfg = load_preset("toy2d")
    with lease.hold(str(tmp_path / "toy2d"), "someone-else"):
        with pytest.raises(lease.RunInUse, match="someone-else"):
            stages.run_local(cfg, str(tmp_path))


# --- packaging ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_built_wheel_ships_the_presets(tmp_path):
    """A non-editable install (a Docker image) has the presets: they are package data of reflow_core."""
    import shutil

    src = tmp_path / "src"  # setuptools builds in the source tree (build/, *.egg-info): a copy, not the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".*", "runs", "build", "*.egg-info", "__pycache__",
                                                             "tests", "docs", "benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("reflow-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).stem for n in names if n.startswith("reflow_core/presets/") and n.endswith(".yaml")}
    assert shipped == set(preset_names()) and "toy2d" in shipped


def test_a_killed_local_runner_leaves_no_lock_behind(tmp_path):
    """A holder on this machine whose process is gone (kill -9) is stale at once, not after the ttl."""
    run_dir = str(tmp_path / "r")
    proc = subprocess.Popen([sys.executable, "-c", "import time, sys\nfrom reflow_core import lease\n"
                             "lease.acquire(sys.argv[1], 'victim')\nprint('held', flush=True)\ntime.sleep(60)",
                             run_dir], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(lease.RunInUse, match="victim"):
        lease.acquire(run_dir, "next")
    proc.kill()
    proc.wait()
    lease.acquire(run_dir, "next").release()


def test_cli_names_the_holder_of_a_busy_run(tmp_path, capsys):
    from flows import cli

    with lease.hold(str(tmp_path / "busy"), "someone-else"):
        with pytest.raises(SystemExit) as e:
            cli.main(["run", "--local", "--preset", "toy2d", "--root", str(tmp_path), "--run", "busy"])
    assert e.value.code == 3 and "in use by someone-else" in capsys.readouterr().err
