"""The Prefect flow end to end with real Prefect (a temporary API server), real MLflow (sqlite in tmp_path) and the
real reflow_core pipeline on a tiny toy2d configuration; plus resume after an injected fault, and the CLI's
configuration errors.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import time

import pytest
from mlflow import MlflowClient

from helpers import tiny

from flows import cli, tasks, tracking, tracking_store
from flows import reflow as reflow_module
from reflow_core import storage
from reflow_core.config import ConfigError

STAGES = {"teacher", "pairs", "reflow", "evaluate"}

# small enough for a contended 2-CPU runner; all four stages still do real work
TINY = tiny({
    "data.n_train": 2000, "eval.n_samples": 500, "eval.straightness_steps": 8, "net.hidden": 64,
    "pairs.batch_size": 500, "pairs.chunk_size": 500, "pairs.n_pairs": 2000, "pairs.nfe": 15,
    "pairs.shard_size": 1000, "pairs.workers": 2, "reflow.train.batch_size": 128, "reflow.train.ckpt_every": 50,
    "reflow.train.log_every": 20, "reflow.train.steps": 200, "reflow.train.warmup": 100,
    "teacher.train.batch_size": 128, "teacher.train.ckpt_every": 50, "teacher.train.log_every": 20,
    "teacher.train.steps": 200, "teacher.train.warmup": 100,
})


@pytest.fixture()
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("REFLOW_FAULT_STAGE", raising=False)
    monkeypatch.delenv("REFLOW_FAULT_AT_STEP", raising=False)


def _runs(uri: str, experiment: str = "reflow"):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
    # the stage runs (the per-model evaluation runs, tagged eval/<model>, are looked at on their own)
    children = [r for r in runs if tracking.PARENT_TAG in r.data.tags
                and not r.data.tags[tracking.STAGE_TAG].startswith("eval/")]
    return client, parents, children


def _artifact_names(client: MlflowClient, run_id: str) -> set[str]:
    return {os.path.basename(a.path) for a in client.list_artifacts(run_id)}


def test_flow_logs_parent_and_stage_runs(tmp_path, monkeypatch, prefect_api, clean_env):
    root = str(tmp_path / "runs")
    t0 = time.perf_counter()
    result = reflow_module.reflow(preset="toy2d", overrides=TINY, root=root, run="tiny")
    print(f"flow: {time.perf_counter() - t0:.1f}s")

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # default store for a local root
    assert result["mlflow_tracking_uri"] == uri
    # the printed command works as printed (neither mlflow nor reflow is on PATH after `make demo`)
    assert result["ui"].split()[1:] == ["ui", "--root", root]
    shown = subprocess.run([*shlex.split(result["ui"]), "--print-only"], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == f"mlflow ui --backend-store-uri {uri}"
    assert result["run_dir"] == str(tmp_path / "runs" / "tiny")
    assert storage.exists(result["metrics_json"])
    assert {(r["model"], r["nfe"]) for r in result["metrics"]} == {(m, n) for m in ("teacher", "reflow") for n in (1, 2)}

    client, parents, children = _runs(uri)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == result["mlflow_run_id"]
    assert parent.info.run_name == "tiny" and parent.info.status == "FINISHED"
    stored = storage.read_json(storage.join(result["run_dir"], tracking_store.RUN_FILE))
    assert stored["run_id"] == parent.info.run_id

    # params: the flattened config, nothing secret-looking
    params = parent.data.params
    assert params["pairs.n_pairs"] == "2000" and params["teacher.train.steps"] == "200"
    assert params["eval.nfes"] == "[1, 2]"
    assert not [k for k in params if any(s in k.lower() for s in ("secret", "key", "token", "password"))]

    by_stage = {c.info.run_name: c for c in children}
    assert set(by_stage) == STAGES and len(children) == 4
    for stage, run in by_stage.items():
        assert run.data.tags[tracking.PARENT_TAG] == parent.info.run_id
        assert run.data.tags[tracking.STAGE_TAG] == stage
        assert run.info.status == "FINISHED", stage
        assert run.data.params == params, stage  # the compare view of stage runs shows their settings

    for stage in ("teacher", "reflow"):
        loss = client.get_metric_history(by_stage[stage].info.run_id, "loss")
        assert len(loss) >= 5, (stage, loss)
        assert sorted(m.step for m in loss)[-1] == 200
        assert by_stage[stage].data.metrics[f"{stage}_progress"] == 1.0
    assert "pairs_per_s" in by_stage["pairs"].data.metrics
    assert by_stage["pairs"].data.metrics["rows_simulated"] == 2000

    arts = _artifact_names(client, by_stage["evaluate"].info.run_id)
    assert "metrics.json" in arts
    assert any(a.endswith(".png") for a in arts), arts
    assert any(k.startswith("reflow_euler_") for k in by_stage["evaluate"].data.metrics)

    # a second call is a no-op resume: every stage is found finished, same parent and children, no new runs
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(str(tmp_path / "runs" / "tiny" / "teacher" / "*.pt"))}
    again = reflow_module.reflow(preset="toy2d", overrides=TINY, root=root, run="tiny", stages=None)
    assert again["mlflow_run_id"] == parent.info.run_id
    _, parents2, children2 = _runs(uri)
    assert len(parents2) == 1 and len(children2) == 4
    assert {p: os.path.getmtime(p) for p in mtimes} == mtimes

    # as a user compares pipelines: a second, worse pipeline in the same experiment (the same teacher, reflowed
    # for 2 steps only); MLflow ranks the two by the parent's 1-NFE reflow metric, the better one first
    worse = reflow_module.reflow(preset="toy2d", overrides={**TINY, "reflow.train.steps": 2}, root=root, run="worse",
                                 teacher_checkpoint=result["teacher_checkpoint"])
    key = "sliced_w2.reflow.euler.nfe1"
    ranked = client.search_runs([parent.info.experiment_id], filter_string="tags.`reflow.kind` = 'pipeline'",
                                order_by=[f"metrics.`{key}` ASC"])
    assert [r.info.run_name for r in ranked] == ["tiny", "worse"], [(r.info.run_name, r.data.metrics.get(key))
                                                                    for r in ranked]
    rows = {(r["model"], r["nfe"]): r["sliced_w2"] for r in result["metrics"]}
    assert ranked[0].data.metrics[key] == pytest.approx(rows[("reflow", 1)])
    straight = next(r["straightness"] for r in result["metrics"] if r["model"] == "reflow")
    assert ranked[0].data.metrics["straightness.reflow"] == pytest.approx(straight)
    assert {"wall_seconds.teacher", "wall_seconds.reflow", "sliced_w2.teacher.euler.nfe2"} <= set(
        ranked[0].data.metrics)
    assert ranked[0].data.tags["mlflow.source.git.commit"] and ranked[0].data.tags["reflow.version"]
    # one evaluation run per model, with the same keys, so the compare view sets them side by side
    evals = {r.data.tags["reflow.model"]: r for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}' and "
                                                   f"tags.`reflow.model` != ''")}
    assert set(evals) == {"teacher", "reflow"}
    assert set(evals["teacher"].data.metrics) == set(evals["reflow"].data.metrics) >= {"sliced_w2.euler.nfe1",
                                                                                       "straightness"}
    assert evals["reflow"].data.metrics["sliced_w2.euler.nfe1"] == pytest.approx(rows[("reflow", 1)])
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"  # opens in the model-training view

    # the registered model (one version per pipeline) loads as a pyfunc sampler and samples like the checkpoint
    import mlflow
    import pandas as pd
    import torch

    from reflow_core import stages
    from reflow_core.velocity import generate

    versions = {v.run_id: v.version for v in client.search_model_versions("name = 'toy2d-reflow'")}
    assert len(versions) == 2 and evals["reflow"].info.run_id in versions  # one per pipeline, in its eval run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as a user points MLflow at the store
    served = mlflow.pyfunc.load_model(f"models:/toy2d-reflow/{versions[evals['reflow'].info.run_id]}")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    from_registry = torch.from_numpy(served.predict(pd.DataFrame({"noise": list(noise.double().numpy())}),
                                                    params={"nfe": 1}))
    from_checkpoint = generate(stages.load_model(result["reflow_checkpoint"]), noise, nfe=1)
    assert torch.equal(from_registry, from_checkpoint)
    assert worse["registered_models"] == {"toy2d-reflow": str(max(int(v) for v in versions.values()))}
    # @champion stays with the better first pipeline; MLflow's @latest is the worse, newer one
    champion = client.get_model_version_by_alias("toy2d-reflow", "champion")
    assert str(champion.version) == str(versions[evals["reflow"].info.run_id])
    assert str(client.get_model_version_by_alias("toy2d-reflow", "latest").version) == \
        worse["registered_models"]["toy2d-reflow"]
    assert client.get_model_version("toy2d-reflow", worse["registered_models"]["toy2d-reflow"]).tags[
        "reflow.champion_reason"].startswith("not @champion")


def _stage_files(run_dir):
    files = glob.glob(os.path.join(run_dir, "teacher", "*")) + glob.glob(os.path.join(run_dir, "pairs.zarr", "done", "*"))
    return {p: os.path.getmtime(p) for p in files}


def test_resume_after_fault_in_reflow_stage(tmp_path, monkeypatch, prefect_api, clean_env):
    """A fault mid-way through the reflow stage fails the flow; the re-run skips the teacher and the pairs, resumes
    the reflow training from its checkpoint and logs into the same MLflow parent run."""
    root = str(tmp_path / "runs")
    run_dir = str(tmp_path / "runs" / "faulty")
    # no task-level retry here: the retry would resume and succeed inside the first flow run (the reflow stage runs
    # as a stage_task, the task of every non-shard stage instance)
    monkeypatch.setattr(tasks, "stage_task", tasks.stage_task.with_options(retries=0))
    monkeypatch.setenv("REFLOW_FAULT_STAGE", "reflow")
    monkeypatch.setenv("REFLOW_FAULT_AT_STEP", "100")
    with pytest.raises(RuntimeError, match="injected fault"):
        reflow_module.reflow(preset="toy2d", overrides=TINY, root=root, run="faulty")

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client, parents, children = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    first_parent = parents[0].info.run_id
    by_stage = {c.info.run_name: c for c in children}
    assert by_stage["reflow"].info.status == "FAILED"
    assert by_stage["teacher"].info.status == "FINISHED" and by_stage["pairs"].info.status == "FINISHED"
    assert "evaluate" not in by_stage
    before = _stage_files(run_dir)
    assert any("/done/" in p for p in before) and any(p.endswith(".pt") for p in before)

    monkeypatch.delenv("REFLOW_FAULT_STAGE")
    monkeypatch.delenv("REFLOW_FAULT_AT_STEP")
    result = reflow_module.reflow(preset="toy2d", overrides=TINY, root=root, run="faulty")

    assert result["mlflow_run_id"] == first_parent
    assert _stage_files(run_dir) == before  # teacher checkpoints and pair shard markers untouched
    client, parents, children = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_stage = {c.info.run_name: c for c in children}
    assert set(by_stage) == STAGES and len(children) == 4  # the reflow child run was reused, not duplicated
    assert all(c.info.status == "FINISHED" for c in children)
    assert by_stage["teacher"].data.tags.get("reflow.skipped") == "true"
    resumed = client.get_metric_history(by_stage["reflow"].info.run_id, "resumed_from_step")
    assert max(m.value for m in resumed) == 100.0, resumed
    loss_steps = sorted(m.step for m in client.get_metric_history(by_stage["reflow"].info.run_id, "loss"))
    assert loss_steps[0] <= 100 < loss_steps[-1] == 200


@pytest.mark.slow
def test_local_runner_and_prefect_flow_walk_one_plan_bit_identically(tmp_path, prefect_api, clean_env):
    """`reflow run --local` and the Prefect flow walk the same plan (two reflow rounds here): identical checkpoints,
    pair stores and metrics.json rows (all but the wall-clock seconds)."""
    import numpy as np

    from reflow_core import checkpoint, stages
    from reflow_core.preset import load_preset
    from reflow_core.pairs import PairStore
    from helpers import assert_same

    TWO_ROUNDS = tiny({"reflow.rounds": 2})

    local_root, flow_root = str(tmp_path / "local"), str(tmp_path / "flow")
    local_rows = stages.run_local(load_preset("toy2d", TWO_ROUNDS), local_root, "r")
    result = reflow_module.reflow(preset="toy2d", overrides=TWO_ROUNDS, root=flow_root, run="r")
    assert set(result["checkpoints"]) == {"teacher", "reflow", "reflow-2"}
    for stage in ("teacher", "reflow", "reflow-2"):
        a = checkpoint.load_latest(storage.join(local_root, "r", stage))
        b = checkpoint.load_latest(storage.join(flow_root, "r", stage))
        assert a["step"] == b["step"] > 0
        assert_same(a["ema"], b["ema"], stage)
        assert_same(a["net"], b["net"], stage)
    for store in ("pairs.zarr", "pairs-2.zarr"):
        a, b = (PairStore.open(storage.join(r, "r", store)) for r in (local_root, flow_root))
        for arr in ("noise", "sample"):
            assert np.array_equal(a.read_raw(slice(0, a.n))[arr], b.read_raw(slice(0, b.n))[arr])

    def strip(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    assert strip(local_rows) == strip(result["metrics"])
    assert strip(storage.read_json(storage.join(local_root, "r", "eval", "metrics.json"))["rows"]) == \
        strip(storage.read_json(result["metrics_json"])["rows"])
    assert {r["model"] for r in local_rows} == {"teacher", "reflow", "reflow-2"}
    _, parents, children = _runs(result["mlflow_tracking_uri"])
    assert {c.data.tags[tracking.STAGE_TAG] for c in children} == {"teacher", "pairs", "reflow", "pairs-2",
                                                                   "reflow-2", "evaluate"}  # a child run per stage
    # one pair worker: the shards run one after another in the flow's own thread, still a Prefect task run each
    shards = [f"{s}-shard-{k}" for s in ("pairs", "pairs-2") for k in (0, 1)]
    assert _shard_task_runs(parents[0].data.tags["reflow.prefect_flow_run_id"], len(shards)) == \
        dict.fromkeys(shards, "COMPLETED")


def _shard_task_runs(flow_run_id: str, n: int, timeout: float = 30.0) -> dict[str, str]:
    """{task run name: state type} of a flow run's shard tasks, read from the Prefect API (task runs reach it as
    events: wait for n of them, each in a final state)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
        shards = {r.name: r.state.type.value if r.state else "NONE" for r in runs if "-shard-" in r.name}
        if (len(shards) >= n and all(v in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for v in shards.values())) \
                or time.monotonic() > deadline:
            return shards
        time.sleep(0.5)


def test_invalid_config_fails_before_any_work(tmp_path, prefect_api, clean_env):
    root = tmp_path / "runs"
    with pytest.raises(ConfigError, match="chunk_size"):
        reflow_module.reflow(preset="toy2d", overrides={**TINY, "pairs.chunk_size": 3000}, root=str(root), run="bad")
    assert not root.exists() or not any(root.iterdir())


def test_flow_refuses_a_run_name_that_leaves_the_root(tmp_path, prefect_api, clean_env):
    """The typed `run` parameter refuses it before the flow body runs (reflow_core's check_run_name would too)."""
    from prefect.exceptions import ParameterTypeError

    root = tmp_path / "runs"
    for bad in ("../escape", "a/b", ".."):
        with pytest.raises(ParameterTypeError, match="run"):
            reflow_module.reflow(preset="toy2d", overrides=TINY, root=str(root), run=bad)
        with pytest.raises(ConfigError, match="invalid run name"):
            reflow_module.reflow.with_options(validate_parameters=False)(preset="toy2d", overrides=TINY,
                                                                         root=str(root), run=bad)
    assert not any(tmp_path.iterdir())  # nothing written, under the root or beside it


def test_subset_needs_finished_upstream(tmp_path, prefect_api, clean_env):
    with pytest.raises(ValueError, match="needed by"):
        reflow_module.reflow(preset="toy2d", overrides=TINY, root=str(tmp_path / "runs"), run="s",
                             stages=["evaluate"])


# --- no Prefect needed below -----------------------------------------------------------------------------------

def test_cli_config_error_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--preset", "toy2d", "--root", str(tmp_path), "--set", "pairs.nfe=4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "pairs" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--preset", "no-such-preset", "--root", str(tmp_path)])
    assert exc.value.code == 2


def test_cli_set_values_are_yaml():
    assert cli.parse_sets(["a.b=3", "c=1e-4", "d=true", "e=[1, 2]", "f=null", "g=moons"]) == {
        "a.b": 3, "c": 1e-4, "d": True, "e": [1, 2], "f": None, "g": "moons"}
    assert cli.parse_stages("teacher, pairs") == ["teacher", "pairs"]
    with pytest.raises(ConfigError):
        cli.parse_sets(["novalue"])


def test_cli_presets_and_ui(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["presets"]) == 0
    assert "toy2d" in capsys.readouterr().out.split()
    assert cli.main(["ui", "--root", str(tmp_path), "--print-only"]) == 0
    assert capsys.readouterr().out.strip() == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db"


def test_tracking_uri_resolution_and_params(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_store.resolve_tracking_uri("http://mlflow:5000", str(tmp_path)) == "http://mlflow:5000"
    assert tracking_store.resolve_tracking_uri(None, f"file://{tmp_path}") == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking_store.resolve_tracking_uri(None, "s3://bucket/reflow") == "sqlite:///./mlruns.db"
    assert "warning" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking_store.resolve_tracking_uri(None, str(tmp_path)) == "sqlite:////elsewhere.db"

    params = tracking.loggable_params({"a": {"b": 1, "api_key": "x", "aws_secret": "y"}, "Token": "z",
                                       "long": "v" * 10_000, "lst": [1, 2]})
    assert params == {"a.b": "1", "long": "v" * 6000, "lst": "[1, 2]"}


def test_tracker_reuses_parent_and_stage_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = str(tmp_path / "run")
    t1 = tracking.MlflowTracker(uri, "exp", run_dir)
    parent = t1.parent_run_id()
    cb = t1.stage_callback("teacher")
    for step in range(1, 6):
        cb.on_metrics("teacher", step, {"loss": 1.0 / step})
    cb.on_progress("teacher", 2, 5)  # buffered with the metrics: no store write of its own ...
    assert "teacher_progress" not in MlflowClient(uri).get_run(cb.run_id).data.metrics
    cb.on_progress("teacher", 5, 5)  # ... the end of the stage is written at once
    assert MlflowClient(uri).get_run(cb.run_id).data.metrics["teacher_progress"] == 1.0
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG")
    cb.on_artifact("teacher", str(png))
    t1.finish("teacher", "FAILED")

    t2 = tracking.MlflowTracker(uri, "exp", run_dir)  # a resumed pipeline in a new process
    assert t2.parent_run_id() == parent
    assert t2.child_run_id("teacher") == cb.run_id
    t2.finish("teacher", "FINISHED")
    t2.finish(None, "FINISHED")
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(cb.run_id, "loss")] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert client.get_run(cb.run_id).data.metrics["teacher_progress"] == 1.0
    assert _artifact_names(client, cb.run_id) == {"plot.png"}
    assert client.get_run(cb.run_id).info.status == "FINISHED"

    # a stored id that this tracking store does not know is replaced by a new parent run
    other = tracking.MlflowTracker(f"sqlite:///{tmp_path / 'other.db'}", "exp", run_dir)
    new_parent = other.parent_run_id()
    assert new_parent != parent
    assert json.loads((tmp_path / "run" / tracking_store.RUN_FILE).read_text())["run_id"] == new_parent


def test_a_running_stage_shows_its_progress_in_prefect(tmp_path):
    """While the teacher trains, its progress artifact on the flow run (read back through the Prefect API) grows,
    with throughput and ETA in its description; the pairs stage counts its shards; the run logger gets the lines."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterName,
                                                LogFilter, LogFilterFlowRunId)

    over = tiny({"teacher.train.steps": 4000, "teacher.train.ckpt_every": 1000})
    run = f"prog{os.getpid()}x{int(time.time())}"  # artifact keys are global on the API: a key of this run only
    key = f"toy2d-{run}-teacher-progress"
    seen: list[tuple[float, str]] = []
    done = threading.Event()

    def poll():
        with get_client(sync_client=True) as client:
            while not done.is_set():
                arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
                if arts:
                    seen.append((float(arts[0].data), arts[0].description or ""))
                time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        result = reflow_module.reflow(preset="toy2d", overrides=over, root=str(tmp_path), run=run)
    finally:
        done.set()
        poller.join(timeout=30)
    fractions = [f for f, _ in seen]
    running = [f for f in fractions if 0 < f < 100]
    assert len(set(running)) >= 2 and fractions == sorted(fractions), fractions  # it grew while the stage ran
    assert fractions[-1] == 100.0 and "4000/4000 steps" in seen[-1][1]
    assert any("steps/s, ETA" in d for f, d in seen if 0 < f < 100)
    with get_client(sync_client=True) as client:
        shards = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"toy2d-{run}-pairs-progress"])))
        assert shards and float(shards[0].data) == 100.0 and "2/2 shards" in shards[0].description
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"toy2d-{run}"])))
        logs = [r.message for r in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[run.id])))]
    assert any(m.startswith("teacher: 4000/4000 steps") and "loss" in m for m in logs), logs
    assert result["metrics"]


def test_system_metrics_are_an_option_of_the_tracking_settings(tmp_path):
    """`tracking.system_metrics: true` samples MLflow's system metrics into the pipeline's parent run while it runs;
    off (the default) there are none."""
    on = reflow_module.reflow(preset="toy2d", overrides=tiny({"teacher.train.steps": 2500,
                                                              "tracking.system_metrics": True}),
                              root=str(tmp_path), run="sysm")
    off = reflow_module.reflow(preset="toy2d", overrides=tiny(), root=str(tmp_path), run="plain")
    client = MlflowClient(on["mlflow_tracking_uri"])
    keys = {r: set(client.get_run(res["mlflow_run_id"]).data.metrics) for r, res in (("on", on), ("off", off))}
    assert "system/cpu_utilization_percentage" in keys["on"] and "system/system_memory_usage_megabytes" in keys["on"]
    assert not {k for k in keys["off"] if k.startswith("system/")}
