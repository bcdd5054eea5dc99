"""`reflow.rounds: 0` through the Prefect flow: the same plan as `reflow run --local` (teacher, pairs, distill,
evaluate), bit-identical student, no reflow checkpoint in the result, the student registered as the run's model."""
from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from helpers import assert_same, tiny

from flows import reflow as reflow_module
from flows import tracking
from flows.publish import model_registry_name
from reflow_core import checkpoint, stages, storage
from reflow_core.pairs import PairStore
from reflow_core.preset import load_preset

# the optional distill section is a flow override as a whole
ROUNDS_0 = tiny({"reflow.rounds": 0, "distill": {"distance": "l2", "train": {
    "steps": 20, "batch_size": 64, "ckpt_every": 10, "log_every": 10, "warmup": 5, "seed": 2}}})


@pytest.mark.slow
def test_rounds_0_flow_equals_local(tmp_path, prefect_api, monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "REFLOW_FAULT_STAGE", "REFLOW_FAULT_AT_STEP"):
        monkeypatch.delenv(k, raising=False)
    local_root, flow_root = str(tmp_path / "local"), str(tmp_path / "flow")
    local_rows = stages.run_local(load_preset("toy2d_distill", ROUNDS_0), local_root, "r")
    result = reflow_module.reflow(preset="toy2d_distill", overrides=ROUNDS_0, root=flow_root, run="r")
    assert set(result["checkpoints"]) == {"teacher", "distill"}  # by stage name
    assert result["reflow_checkpoint"] is None and result["teacher_checkpoint"]
    for stage in ("teacher", "distill"):
        a, b = (checkpoint.load_latest(storage.join(r, "r", stage)) for r in (local_root, flow_root))
        assert a["step"] == b["step"] > 0
        assert_same(a["ema"], b["ema"], stage)
    a, b = (PairStore.open(storage.join(r, "r", "pairs.zarr")) for r in (local_root, flow_root))
    assert np.array_equal(a.read_raw(slice(0, a.n))["sample"], b.read_raw(slice(0, b.n))["sample"])

    def strip(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    assert strip(local_rows) == strip(result["metrics"])
    assert {r["model"] for r in local_rows} == {"teacher", "distilled"}
    client = MlflowClient(tracking_uri=result["mlflow_tracking_uri"])
    exp = client.get_experiment_by_name("reflow")
    stages_logged = {r.data.tags[tracking.STAGE_TAG] for r in client.search_runs([exp.experiment_id])
                     if tracking.PARENT_TAG in r.data.tags and not r.data.tags[tracking.STAGE_TAG].startswith("eval/")}
    assert stages_logged == {"teacher", "pairs", "distill", "evaluate"}
    assert set(result["registered_models"]) == {model_registry_name("toy2d_distill", "distilled")}  # the student
