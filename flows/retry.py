"""The flow's retry policy: which task failures a retry may fix (transient ones) and which it cannot.

Errors a retry cannot fix: a bad config or changed identity (ConfigError), a corrupt store, checkpoint or tracking
file, a run directory held by another runner, and programming errors. Anything else (a dropped S3 connection, a
pre-empted GPU, an OOM kill of a subprocess) is retried; the retry resumes from the artifacts.
"""
from __future__ import annotations

from flows.tracking_store import TrackingFileError
from reflow_core import lease
from reflow_core.checkpoint import CheckpointError
from reflow_core.config import ConfigError
from reflow_core.pairs import PairStoreCorrupt, PairStoreMismatch

DETERMINISTIC = (ConfigError, PairStoreMismatch, PairStoreCorrupt, CheckpointError, TrackingFileError, lease.RunInUse,
                 ValueError, TypeError, KeyError, AttributeError, AssertionError, NotImplementedError)


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry unless the failure is deterministic (`DETERMINISTIC`)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result could not be read back: judge the error that says so
        exc = e
    return not isinstance(exc, DETERMINISTIC)
