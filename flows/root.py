"""Where a flow run's artifacts live: the `root` parameter, the team's Prefect variable, or a worker's environment."""
from __future__ import annotations

import os

from flows.tracking_store import local_path
from reflow_core import storage
from reflow_core.config import ConfigError

ROOT_VARIABLE = "reflow_root"  # `prefect variable set reflow_root s3://bucket/reflow`: the team's root, set once
ROOT_ENV = "REFLOW_ROOT"  # or per worker (a process pool's job_variables.env, a Kubernetes job template)


def resolve_root(root: str | None) -> tuple[str, str]:
    """(root, where it came from): the `root` parameter, else the Prefect variable `reflow_root`, else $REFLOW_ROOT;
    never a worker's working directory by default. A local root is made absolute (logged, so a resume can name
    it)."""
    source = "the root parameter"
    if not root:
        from prefect.variables import Variable

        root, source = Variable.get(ROOT_VARIABLE, default=None), f"the Prefect variable {ROOT_VARIABLE}"
        if not root:
            root, source = os.environ.get(ROOT_ENV), f"${ROOT_ENV}"
    if not root or not isinstance(root, str):
        raise ConfigError(f"no run root: pass root=..., or set the team's root once with `prefect variable set "
                          f"{ROOT_VARIABLE} s3://bucket/reflow` (or ${ROOT_ENV} on every worker); a worker's "
                          "working directory is never used by default, so a run resumed on another worker finds "
                          "its artifacts")
    if storage.is_local(root):
        root = str(local_path(root))
    return root, source
