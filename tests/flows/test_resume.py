"""The shipped resume-on-crash trigger (deployments/prefect.yaml), rendered by Prefect's own server-side templating
against a crashed flow run, gives the crashed run's parameters with attempt + 1, typed as the deployment's
parameter schema wants them; the flow refuses an attempt past max_attempts. (tests/e2e/test_deployment.py runs the
trigger on a real server and worker.)"""
from __future__ import annotations

import copy
import uuid

import jsonschema
import pytest
import yaml
from helpers import REPO
from prefect.server.events.actions import RunDeployment
from prefect.server.schemas.responses import FlowRunResponse
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

from flows import reflow as reflow_module
from flows.resume import ATTEMPT_LABEL, RUN_LABEL, AttemptsExhausted, attempt_name, check_attempt

DEPLOYMENTS = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]


def _render(trigger: dict, parameters: dict, labels: dict) -> dict:
    """What the server's RunDeployment action passes to the new flow run for a crash of this flow run."""
    flow_run = FlowRunResponse(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="toy2d-a", parameters=parameters,
                               labels=labels)
    params = copy.deepcopy(trigger["parameters"])
    RunDeployment(source="selected", deployment_id=uuid.uuid4(), parameters=params)  # the server's own validation
    RunDeployment._upgrade_v1_templates(params)
    context = HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"flow_run": flow_run})
    return hydrate(params, context)


def _schema() -> dict:
    s = parameter_schema(reflow_module.reflow.fn).model_dump()
    return {"type": "object", "properties": s["properties"], "definitions": s["definitions"],
            "additionalProperties": False}


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_each_deployment_resumes_its_own_crashed_runs(deployment):
    (trigger,) = deployment["triggers"]
    assert trigger["expect"] == ["prefect.flow-run.Crashed"] and trigger["name"].endswith("resume on crash")
    related = {(m["prefect.resource.role"], m["prefect.resource.name"]) for m in trigger["match_related"]}
    assert related == {("flow", "reflow"), ("deployment", deployment["name"])}
    assert set(trigger["parameters"]) == set(_schema()["properties"]) - {"redo_stages"}


CASES = {
    "labelled": ({"preset": "toy2d", "run": "a", "overrides": {"teacher.train.steps": 500}, "max_attempts": 2},
                 {RUN_LABEL: "a", ATTEMPT_LABEL: 1},
                 {"preset": "toy2d", "run": "a", "overrides": {"teacher.train.steps": 500}, "max_attempts": 2,
                  "attempt": 2, "new": False, "root": None, "stages": None, "teacher_checkpoint": None}),
    # a `new` run resolved to a suffixed directory: the next attempt reopens that one, not a third
    "new-resolved": ({"preset": "digits", "run": "a", "new": True, "attempt": 2, "root": "s3://b/r",
                      "stages": ["teacher"], "redo_stages": ["teacher"]},
                     {RUN_LABEL: "a-2", ATTEMPT_LABEL: 2},
                     {"preset": "digits", "run": "a-2", "new": False, "attempt": 3, "max_attempts": 3,
                      "root": "s3://b/r", "stages": ["teacher"], "overrides": None, "teacher_checkpoint": None}),
    # crashed before it opened its run directory: its own parameters again
    "unlabelled": ({"preset": "toy2d", "new": True, "teacher_checkpoint": "/ckpt/t.pt"}, {},
                   {"preset": "toy2d", "run": None, "new": True, "attempt": 2, "max_attempts": 3, "root": None,
                    "stages": None, "overrides": None, "teacher_checkpoint": "/ckpt/t.pt"}),
}


@pytest.mark.parametrize("case", CASES)
def test_the_rerun_gets_the_crashed_runs_parameters_and_the_next_attempt(case):
    parameters, labels, expected = CASES[case]
    rendered = _render(DEPLOYMENTS[0]["triggers"][0], parameters, labels)
    assert rendered == expected
    jsonschema.validate(rendered, _schema())  # the server would create this flow run (enforce_parameter_schema)


def test_an_attempt_past_the_limit_stops_saying_why():
    check_attempt(3, 3, "a")
    with pytest.raises(AttemptsExhausted, match=r"run 'a': not re-attempting: its 3 attempts crashed and "
                                                r"max_attempts is 3"):
        check_attempt(4, 3, "a")
    assert attempt_name("toy2d-a", 1) == "toy2d-a" and attempt_name("toy2d-a", 2) == "toy2d-a-attempt2"
    defaults = _schema()["properties"]
    assert defaults["attempt"]["default"] == 1 and defaults["max_attempts"]["default"] == 3
