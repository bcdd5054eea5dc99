"""Automatic resume of crashed deployment runs: the attempt a flow run is, its limit, and the labels it leaves.

A flow run of a deployment that ends Crashed (its process or machine died) is run again by the deployment's trigger
(deployments/prefect.yaml, created by `prefect deploy`) with the same parameters and `attempt` + 1; the stages
resume from their checkpoints and shard markers. What the next attempt needs is read from the crashed flow run
itself: its parameters (attempt, max_attempts, ...) and the labels set here (the run name it resolved, so a
`new=True` run resumes its suffixed directory instead of opening another). Only Crashed runs are re-attempted:
Failed (a bad config, missing data, a refused run name), Cancelled and Completed runs are not.
"""
from __future__ import annotations

import logging
from uuid import UUID

from prefect import runtime

RUN_LABEL = "reflow.run"
ATTEMPT_LABEL = "reflow.attempt"
DEFAULT_MAX_ATTEMPTS = 3


class AttemptsExhausted(RuntimeError):
    """The run crashed `max_attempts` times: this attempt stops (Failed, so the trigger does not fire again)."""


def check_attempt(attempt: int, max_attempts: int, run: str) -> None:
    """Refuse an attempt past the limit, saying why and what to do."""
    if attempt > max_attempts:
        raise AttemptsExhausted(
            f"run {run!r}: not re-attempting: its {attempt - 1} attempts crashed and max_attempts is {max_attempts} "
            f"(the crashed flow runs' logs say where each stopped). Its checkpoints are kept: run the deployment "
            f"again with run={run!r} to resume by hand (attempts count from 1 again), or raise max_attempts.")


def attempt_name(base: str, attempt: int) -> str:
    """The flow run's name: `base` for a first attempt, `base-attempt<k>` for the k-th, so re-runs stand out."""
    return base if attempt <= 1 else f"{base}-attempt{attempt}"


def label_flow_run(run: str, attempt: int, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Leave the resolved run name and the attempt on the running flow run, where the resume trigger reads them.

    Outside a Prefect API (a plain function call) there is nothing to label. A failure to label is logged, not
    raised: the next attempt then falls back to this one's parameters."""
    if not runtime.flow_run.id:
        return
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(UUID(runtime.flow_run.id), {RUN_LABEL: run, ATTEMPT_LABEL: attempt})
    except Exception as e:  # the run itself is fine; only a later automatic resume would miss the label
        logger.warning("could not label flow run %s with its run name (%s); a resume after a crash will use the "
                       "flow run's parameters", runtime.flow_run.id, e)
