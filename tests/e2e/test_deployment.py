"""deployments/prefect.yaml against a real Prefect server and a real process worker, as a team would use it.

Starts `prefect server start` (SQLite under tmp), creates the `reflow-process` work pool, deploys every deployment,
sets the team's run root once (the Prefect variable `reflow_root`) and starts a worker. Then, through the CLI and the
REST API only: a bad override is refused when the run is created (no flow run, no worker involved); a typed
deployment run is started; a second run on the same run directory is refused while the first runs; the first is
cancelled mid-teacher and re-run from the deployment, continuing from the teacher's checkpoint; the flow run's
artifacts are read back through the Prefect API; the MLflow store holds the headline metrics and the registered model.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO, tiny
from mlflow import MlflowClient
from prefect_stack import (PREFECT, TERMINAL, flow_run, post_json, prefect, prefect_stack, run_deployment,
                           start_worker, stop, tail, wait_for, wait_state)

from flows import tracking

TINY = tiny({
    "data.n_train": 2000, "eval.n_samples": 256, "eval.straightness_steps": 8, "net.hidden": 64,
    "pairs.chunk_size": 250, "pairs.n_pairs": 1000, "pairs.nfe": 9, "pairs.shard_size": 500, "pairs.workers": 2,
    "reflow.train.batch_size": 128, "reflow.train.ckpt_every": 50, "reflow.train.log_every": 20,
    "reflow.train.steps": 100, "reflow.train.warmup": 100, "teacher.train.batch_size": 128,
    "teacher.train.ckpt_every": 50, "teacher.train.log_every": 20, "teacher.train.steps": 100,
    "teacher.train.warmup": 100,
})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A Prefect server with the deployments, the team root variable, and a process worker; MLflow in sqlite."""
    with prefect_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


def _run_deployment(stack, params: dict) -> str:
    return run_deployment(stack, "toy2d", params)


# long enough a teacher to be caught mid-way: the cancel comes after a second flow run's start and refusal, 10-30 s
# in. This net trains at ~360 steps/s alone on the 2-core box (2400 steps were all done by then once the runs stopped
# oversubscribing the cores), so 16000 steps are ~45 s of work, with a checkpoint every ~0.5 s
LONG_TEACHER = {**TINY, "teacher.train.steps": 16000, "teacher.train.ckpt_every": 200}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployment_lifecycle_on_a_process_worker(stack):
    api, env, root = stack["api"], stack["env"], stack["root"]
    deployments = post_json(f"{api}/deployments/filter", {})
    assert {"toy2d", "digits", "cifar10"} <= {d["name"] for d in deployments}, stack["deploy_output"]
    toy = next(d for d in deployments if d["name"] == "toy2d")
    assert toy["entrypoint"] == "flows/reflow.py:reflow" and toy["parameters"] == {"preset": "toy2d"}
    assert toy["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == \
        "{{ $REFLOW_REPO }}"
    # typed parameters: the UI's form comes from this schema, and the server enforces it
    schema = toy["parameter_openapi_schema"]
    assert toy["enforce_parameter_schema"] is True
    assert "toy2d" in schema["properties"]["preset"]["anyOf"][0]["enum"]
    overrides_schema = schema["definitions"]["ConfigOverrides"]
    assert overrides_schema["additionalProperties"] is False
    assert overrides_schema["properties"]["teacher.train.steps"] == {
        "default": None, "minimum": 1, "title": "teacher.train.steps", "type": "integer"}

    # 1. bad values are refused when the run is created, naming the field; no flow run exists for a worker to take
    for bad, field in (({"overrides": {"teacher.train.steps": -1}}, "-1"),
                       ({"overrides": {"teacher.train.stepz": 5}}, "teacher.train.stepz"),
                       ({"preset": "no-such-preset"}, "no-such-preset"),
                       ({"run": "../escape"}, "../escape")):
        out = subprocess.run([PREFECT, "deployment", "run", "reflow/toy2d", "--params", json.dumps(bad)], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "Validation" in text and field in text, (bad, text)
        print(f"refused {bad}: {text.strip()}")  # shown with -s: docs/cloud.md quotes it
    assert post_json(f"{api}/flow_runs/filter", {}) == []

    # 2. a typed run; the root comes from the team's variable, not from any parameter or the worker's cwd
    params = {"run": "shared", "overrides": LONG_TEACHER}
    first = _run_deployment(stack, params)
    latest = root / "shared" / "teacher" / "latest.json"
    wait_for(latest.exists, "the first flow run's first teacher checkpoint", stack)
    assert flow_run(stack, first)["name"] == "toy2d-shared"

    # 3. a second flow run on the same run directory is refused while the first holds it, naming the holder
    second = _run_deployment(stack, params)
    fr = wait_state(stack, second, {"FAILED", "COMPLETED", "CRASHED", "CANCELLED"})
    assert fr["state"]["type"] == "FAILED", fr["state"]
    assert flow_run(stack, first)["state"]["type"] == "RUNNING"
    logs = post_json(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [second]}}})
    text = "\n".join(entry["message"] for entry in logs)
    assert "is in use by toy2d-shared" in text and first in text, text[-3000:]

    # 4. cancel the first mid-teacher, then run the deployment again: the teacher continues from its checkpoint
    prefect(["flow-run", "cancel", first], env, REPO)
    wait_state(stack, first, {"CANCELLED"}, timeout=180)
    step_at_cancel = json.loads(latest.read_text())["step"]
    assert 0 < step_at_cancel < LONG_TEACHER["teacher.train.steps"], step_at_cancel
    third = _run_deployment(stack, params)
    fr = wait_state(stack, third, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
    assert fr["state"]["type"] == "COMPLETED", (fr["state"], tail(stack["logs"]["worker"], 8000))
    run_dir = root / "shared"
    assert (run_dir / "eval" / "metrics.json").exists() and not (run_dir / "run.lock").exists()

    client = MlflowClient(tracking_uri=stack["mlflow_uri"])
    exp = client.get_experiment_by_name("reflow")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    teacher = next(r for r in runs if r.data.tags.get(tracking.STAGE_TAG) == "teacher")
    resumed = [m.value for m in client.get_metric_history(teacher.info.run_id, "resumed_from_step")]
    # the first flow run started from 0 once; the re-run continued from the checkpoint the cancelled one left
    assert resumed.count(0.0) == 1 and float(step_at_cancel) in resumed, (resumed, step_at_cancel)
    parents = [r for r in runs if r.data.tags.get("reflow.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert "sliced_w2.reflow.euler.nfe1" in parent.data.metrics and "wall_seconds.teacher" in parent.data.metrics
    assert parent.data.tags["reflow.prefect_flow_run_id"] == third
    assert client.search_model_versions("name = 'toy2d-reflow'")  # the final model is registered

    # 5. the flow run's artifacts, through the Prefect API
    arts = post_json(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [third]}}})
    by_type = {a["type"]: a for a in arts}
    assert {"table", "markdown"} <= set(by_type), arts
    table = by_type["table"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert {(r["model"], r["nfe"]) for r in table} == {(m, n) for m in ("teacher", "reflow") for n in (1, 2)}
    metrics_json = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert {(r["model"], r["nfe"]): r["sliced_w2"] for r in table} == \
        {(r["model"], r["nfe"]): r["sliced_w2"] for r in metrics_json["rows"]}
    summary = by_type["markdown"]["data"]
    assert parent.info.run_id in summary and "data:image/png;base64," in summary and "models:/toy2d-reflow/" in summary


# --- docs/cloud.md's commands, as written -----------------------------------------------------------------------


def _doc_commands(text: str) -> list[tuple[list[str], bool]]:
    """(argv, expected to be refused) of every `prefect ...` and `reflow run ...` command in the page's bash blocks;
    a block that shows "Error creating flow run" is an example of a refused command."""
    import shlex

    blocks: list[tuple[str, list[str]]] = []  # (language, lines) of each fenced block
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            if fenced:
                blocks.append((line.strip()[3:], []))
        elif fenced:
            blocks[-1][1].append(line)
    out = []
    for block in ("\n".join(lines) + "\n" for lang, lines in blocks if lang in ("", "bash")):
        refused = "Error creating flow run" in block
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith(("prefect deployment run ", "prefect variable set ", "reflow run ")):
                out.append((shlex.split(line, comments=True), refused))
    return out


def test_cloud_doc_commands_validate_and_resume(tmp_path):
    """Every `prefect deployment run` in docs/cloud.md passes the deployment's parameter schema (a refused example
    is refused), every `reflow run` parses and validates, and commands that name the same run (a start and its
    resume) open it with the same identity, as `prepare_run` would on the team's root."""
    import jsonschema
    import yaml
    from prefect.utilities.callables import parameter_schema

    from flows import cli
    from flows import reflow as reflow_module
    from flows.root import ROOT_VARIABLE
    from reflow_core import stages
    from flows.params import override_dict
    from reflow_core.preset import load_preset

    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
                   ["deployments"]}
    s = parameter_schema(reflow_module.reflow.fn).model_dump()
    schema = {"type": "object", "properties": s["properties"], "definitions": s["definitions"],
              "additionalProperties": False}
    commands = _doc_commands((REPO / "docs" / "cloud.md").read_text())
    assert sum(argv[:3] == ["prefect", "deployment", "run"] for argv, _ in commands) >= 3, commands
    roots: dict[str, Path] = {}  # each root URL of the page -> a local stand-in
    team_root = None
    opened = 0
    for argv, refused in commands:
        if argv[:3] == ["prefect", "variable", "set"]:
            assert argv[3] == ROOT_VARIABLE, argv
            team_root = argv[4]
            continue
        if argv[0] == "prefect":
            params = dict(deployments[argv[3].split("/", 1)[1]]["parameters"])
            rest = argv[4:]
            for flag, value in zip(rest[::2], rest[1::2]):
                if flag == "--param":
                    k, _, v = value.partition("=")
                    params[k] = v
                else:
                    assert flag == "--params", argv
                    params.update(json.loads(value))
            if refused:
                with pytest.raises(jsonschema.ValidationError):
                    jsonschema.validate(params, schema)
                continue
            jsonschema.validate(params, schema)
            preset, overrides = params["preset"], override_dict(params.get("overrides"))
            root, run = params.get("root") or team_root, params.get("run")
            assert root, f"{argv}: no root parameter and no `prefect variable set reflow_root` before it"
        else:
            args = cli.build_parser().parse_args(argv[1:])
            preset, overrides, root, run = args.preset, cli.parse_sets(args.set), args.root, args.run
        cfg = load_preset(preset, overrides)
        local = roots.setdefault(root, tmp_path / f"root{len(roots)}")
        stages.prepare_run(cfg, str(local), run)  # a resume with other settings would be refused here
        opened += 1
    assert opened >= 5


# --- automatic resume (the deployments' triggers) and a stopped worker ------------------------------------------


def _flow_runs(stack) -> list[dict]:
    return post_json(f"{stack['api']}/flow_runs/filter", {})


def _attempt_of(stack, run: str, attempt: int, timeout: float = 180) -> dict:
    """The flow run the resume trigger created for `run`'s attempt `attempt` (waits for it)."""
    found: list[dict] = []

    def created() -> bool:
        found[:] = [fr for fr in _flow_runs(stack)
                    if fr["parameters"].get("run") == run and fr["parameters"].get("attempt") == attempt]
        return bool(found)

    wait_for(created, f"attempt {attempt} of run {run!r}", stack, timeout=timeout)
    assert len(found) == 1, found  # one re-run per crash
    return found[0]


def _teacher_resumes(stack, run_dir: Path) -> list[float]:
    """`resumed_from_step` of the teacher's MLflow child run of the pipeline run at run_dir, in logging order."""
    client = MlflowClient(tracking_uri=stack["mlflow_uri"])
    exp = client.get_experiment_by_name("reflow")
    runs = client.search_runs([exp.experiment_id], f"tags.`reflow.run_dir` = '{run_dir}'")
    parents = [r for r in runs if r.data.tags.get("reflow.kind") == "pipeline"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    teacher = next(r for r in children if r.data.tags.get(tracking.STAGE_TAG) == "teacher")
    return [m.value for m in client.get_metric_history(teacher.info.run_id, "resumed_from_step")]


def _parent_tags(stack, run_dir: Path) -> dict:
    client = MlflowClient(tracking_uri=stack["mlflow_uri"])
    exp = client.get_experiment_by_name("reflow")
    runs = client.search_runs([exp.experiment_id], f"tags.`reflow.run_dir` = '{run_dir}'")
    return next(r for r in runs if r.data.tags.get("reflow.kind") == "pipeline").data.tags


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_crashed_run_is_resumed_by_the_shipped_trigger(stack):
    """The flow-run process is SIGKILLed mid-teacher (an OOM kill, a reclaimed VM); with no further command the
    deployment's trigger runs it again as attempt 2, which resumes from the teacher's checkpoint and completes,
    logging into the same MLflow parent run. Runs that fail on a deterministic error are not re-attempted, and an
    attempt past max_attempts stops at once, saying why."""
    api, root = stack["api"], stack["root"]
    automations = post_json(f"{api}/automations/filter", {})
    resume = {a["name"]: a for a in automations}
    assert {f"reflow/{d}: resume on crash" for d in ("toy2d", "digits", "natural32", "cifar10")} <= set(resume), \
        sorted(resume)
    assert resume["reflow/toy2d: resume on crash"]["trigger"]["expect"] == ["prefect.flow-run.Crashed"]

    params = {"run": "crashy", "overrides": LONG_TEACHER, "max_attempts": 2}
    first = _run_deployment(stack, params)
    latest = root / "crashy" / "teacher" / "latest.json"
    wait_for(latest.exists, "the first attempt's first teacher checkpoint", stack)
    pid = int(str(flow_run(stack, first)["infrastructure_pid"]).rsplit(":", 1)[-1])
    os.kill(pid, signal.SIGKILL)
    t_crash = time.monotonic()
    fr = wait_state(stack, first, TERMINAL, timeout=120)
    assert fr["state"]["type"] == "CRASHED", fr["state"]
    assert fr["labels"]["reflow.run"] == "crashy" and fr["labels"]["reflow.attempt"] == 1, fr["labels"]
    step_at_kill = json.loads(latest.read_text())["step"]
    assert 0 < step_at_kill < LONG_TEACHER["teacher.train.steps"], step_at_kill

    second = _attempt_of(stack, "crashy", 2)
    trigger_latency = time.monotonic() - t_crash
    assert second["parameters"]["overrides"] == flow_run(stack, first)["parameters"]["overrides"]
    assert second["parameters"]["max_attempts"] == 2 and second["parameters"]["preset"] == "toy2d"

    # meanwhile: failures a re-run cannot fix end Failed, and nothing re-runs them
    missing = _run_deployment(stack, {"run": "missing-data", "overrides": TINY,
                                      "teacher_checkpoint": str(root / "no-such-teacher.pt")})
    exhausted = _run_deployment(stack, {"run": "exhausted", "overrides": TINY, "attempt": 3, "max_attempts": 2})
    for fr_id in (missing, exhausted):
        assert wait_state(stack, fr_id, TERMINAL)["state"]["type"] == "FAILED"
    logs = post_json(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [exhausted]}}})
    assert any("not re-attempting: its 2 attempts crashed and max_attempts is 2" in e["message"] for e in logs), logs

    fr = wait_state(stack, second["id"], TERMINAL)
    assert fr["state"]["type"] == "COMPLETED", (fr["state"], tail(stack["logs"]["worker"], 8000))
    assert fr["name"] == "toy2d-crashy-attempt2" and fr["labels"]["reflow.attempt"] == 2, (fr["name"], fr["labels"])
    run_dir = root / "crashy"
    assert (run_dir / "eval" / "metrics.json").exists() and not (run_dir / "run.lock").exists()
    # attempt 2 started the teacher from the checkpoint the killed attempt left (the killed attempt's own metrics
    # still in its buffer, its start from 0 included, died with it; a later entry is the guide snapshot's)
    resumed = _teacher_resumes(stack, run_dir)
    assert [r for r in resumed if r > 0][0] == float(step_at_kill), (resumed, step_at_kill)
    tags = _parent_tags(stack, run_dir)  # both attempts log into the one parent run, which names each
    assert tags["reflow.attempt"] == "2" and tags["reflow.prefect_flow_run_id.attempt1"] == first
    assert tags["reflow.prefect_flow_run_id.attempt2"] == second["id"]

    time.sleep(max(15.0, 3 * trigger_latency))  # the crash's re-run came within trigger_latency
    names = {fr["name"] for fr in _flow_runs(stack) if fr["parameters"].get("run") in ("crashy", "missing-data",
                                                                                        "exhausted")}
    assert names == {"toy2d-crashy", "toy2d-crashy-attempt2", "toy2d-missing-data", "toy2d-exhausted-attempt3"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stopped_worker_stops_its_run_cleanly_and_the_run_resumes(stack):
    """`reflow worker` (the process worker that passes a stop signal on) gets SIGTERM to its process group
    mid-teacher, as from a supervisor or a drained VM: the flow run ends within 30 s with its final state in the API
    and its run directory's lease released; a new worker then runs the re-attempt the trigger created, which
    completes from the checkpoint. Runs last: it replaces the stack's worker."""
    root = stack["root"]
    stop(stack["worker"])  # (idle) replaced by the launcher the docs prescribe
    stack["worker"] = start_worker(stack, reflow_worker=True)
    first = _run_deployment(stack, {"run": "drained", "overrides": LONG_TEACHER})
    latest = root / "drained" / "teacher" / "latest.json"
    wait_for(latest.exists, "the teacher's first checkpoint", stack)
    worker = stack["worker"]
    os.killpg(worker.pid, signal.SIGTERM)
    t0 = time.monotonic()
    deadline = t0 + 30
    while flow_run(stack, first)["state"]["type"] not in TERMINAL:
        assert time.monotonic() < deadline, f"still {flow_run(stack, first)['state']} 30 s after SIGTERM"
        time.sleep(0.5)
    stopped_in = time.monotonic() - t0
    state = flow_run(stack, first)["state"]
    assert state["type"] == "CRASHED", state
    while (root / "drained" / "run.lock").exists():
        assert time.monotonic() < deadline, "the run directory's lease was not released"
        time.sleep(0.5)
    assert worker.wait(timeout=60) == 128 + signal.SIGTERM
    step_at_stop = json.loads(latest.read_text())["step"]
    print(f"flow run {state['type']} {stopped_in:.1f} s after SIGTERM to the worker's group; teacher at {step_at_stop}")

    stack["worker"] = start_worker(stack)
    rerun = _attempt_of(stack, "drained", 2)["id"]  # the trigger re-runs the Crashed run
    fr = wait_state(stack, rerun, TERMINAL)
    assert fr["state"]["type"] == "COMPLETED", (fr["state"], tail(stack["logs"]["worker"], 8000))
    resumed = _teacher_resumes(stack, root / "drained")
    assert resumed[0] == 0.0 and [r for r in resumed if r > 0][0] == float(step_at_stop), (resumed, step_at_stop)
