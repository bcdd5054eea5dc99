"""The registered model as its users take it: a pyfunc sampler logged from code (no pickle anywhere, loadable with
pickle disabled, reflow_core travelling with it), the same numbers as `reflow sample`, served over HTTP by
`mlflow models serve` (the README's command), and `@champion` moved only by a better 1-NFE metric.

One tiny toy2d run (`runs/toy2d` under a temporary directory, its MLflow store at `runs/mlflow.db`, as `make demo`
leaves them) is registered through the function the flow's publish task uses.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import tiny

from flows import cli, serving
from flows.tracking import MlflowTracker
from reflow_core import stages
from reflow_core.preset import load_preset

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny({
    "data.n_train": 2000, "eval.n_samples": 500, "net.hidden": 64, "pairs.batch_size": 500,
    "pairs.chunk_size": 500, "pairs.n_pairs": 2000, "pairs.nfe": 15, "pairs.shard_size": 1000,
    "reflow.train.batch_size": 128, "reflow.train.ckpt_every": 100, "reflow.train.log_every": 100,
    "reflow.train.steps": 200, "reflow.train.warmup": 100, "teacher.train.batch_size": 128,
    "teacher.train.ckpt_every": 100, "teacher.train.log_every": 100, "teacher.train.steps": 200,
    "teacher.train.warmup": 100,
})
NAME = "toy2d-reflow"


def _register(root: str, run: str, name: str, overrides: dict) -> tuple[str, tuple[str, float]]:
    """A tiny local run, its results and model published as the flow's publish task does."""
    cfg = load_preset("toy2d", overrides)
    rows = stages.run_local(cfg, root, run)
    rundir = stages.RunDir.of(root, run)
    tracker = MlflowTracker(f"sqlite:///{Path(root).resolve() / 'mlflow.db'}", "reflow", rundir.dir)
    eval_runs = tracker.log_results(rows, "sliced_w2", {})
    head = serving.headline(rows, "sliced_w2", "reflow")
    version = serving.log_sampler(tracker, eval_runs["reflow"], stages.model_checkpoint(rundir, "reflow"),
                                  rundir.config_json, name, head,
                                  serving.version_description("toy2d", "reflow", run, head))
    return version, head


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A directory holding `runs/toy2d` and `runs/mlflow.db` with `toy2d-reflow` version 1."""
    home = tmp_path_factory.mktemp("demo")
    version, head = _register(str(home / "runs"), "toy2d", NAME, TINY)
    assert version == "1"
    return {"home": home, "root": str(home / "runs"), "uri": f"sqlite:///{home / 'runs' / 'mlflow.db'}",
            "head": head}


@pytest.fixture()
def tracking(demo, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", demo["uri"])
    mlflow.set_tracking_uri(demo["uri"])
    yield mlflow
    mlflow.set_tracking_uri(None)


def _reflow_sample(demo, tmp_path, n: int, seed: int, nfe: int) -> np.ndarray:
    out = tmp_path / "x.npy"
    assert cli.main(["sample", "--root", demo["root"], "--run", "toy2d", "--nfe", str(nfe), "--n", str(n),
                     "--seed", str(seed), "--out", str(out)]) == 0
    return np.load(out)


def test_pyfunc_predict_equals_reflow_sample(demo, tracking, tmp_path):
    model = tracking.pyfunc.load_model(f"models:/{NAME}@champion")
    expected = _reflow_sample(demo, tmp_path, 50, 3, 2)
    got = model.predict(pd.DataFrame({"n": [50], "seed": [3]}), params={"nfe": 2})
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    # the same noise given row by row
    noise = torch.randn((50, 2), generator=torch.Generator().manual_seed(3)).numpy().astype(np.float64)
    rows = model.predict(pd.DataFrame({"noise": list(noise)}), params={"nfe": 2})
    assert np.array_equal(rows, expected)
    # params reach the solver: one NFE is another sample
    assert not np.allclose(model.predict(pd.DataFrame({"n": [50], "seed": [3]}), params={"nfe": 1}), expected)
    with pytest.raises(Exception, match="guidance"):
        model.predict(pd.DataFrame({"n": [2], "seed": [0]}), params={"guidance": "autoguidance"})


def test_logged_model_has_signature_example_and_installable_requirements(demo, tracking, tmp_path):
    from importlib.metadata import version

    from mlflow.models import Model

    local = Path(tracking.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path)))
    mlmodel = Model.load(str(local))
    assert {p.name for p in mlmodel.signature.params.params} == {"nfe", "solver", "guidance", "guidance_weight"}
    assert {c.name for c in mlmodel.signature.inputs.inputs} == {"noise", "n", "seed", "label"}
    assert (local / "input_example.json").exists() and (local / "serving_input_example.json").exists()
    assert {p.name for p in (local / "artifacts").iterdir()} == {"model.safetensors", "model.json", "config.json"}
    assert (local / "code" / "reflow_core" / "export.py").exists()  # the project's code travels with the model
    reqs = [r.strip() for r in (local / "requirements.txt").read_text().splitlines() if r.strip()]
    assert not [r for r in reqs if r.lower().startswith("reflow")], reqs
    for req in reqs:  # public packages, pinned to what runs here
        name, _, pinned = req.partition("==")
        assert pinned == version(name), req


def test_no_pickle_in_the_model_and_loading_never_unpickles(demo, tracking, tmp_path):
    """No pickle file in the logged model; a fresh process whose pickle.load / loads / Unpickler,
    cloudpickle.loads and torch.load(weights_only=False) raise loads it and samples, with reflow_core imported from
    the model's own code directory."""
    local = Path(tracking.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "model")))
    for f in local.rglob("*"):
        if f.is_file():
            assert f.suffix not in {".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".pyc"}, f
            head = f.read_bytes()[:2]
            assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), f"{f} starts like a pickle"
    expected = _reflow_sample(demo, tmp_path, 8, 0, 1)
    script = textwrap.dedent(f"""
        import pickle, sys
        import torch
        def refuse(*a, **k):
            raise RuntimeError("unpickling refused")
        pickle.load = pickle.loads = pickle.Unpickler = refuse
        import cloudpickle
        cloudpickle.load = cloudpickle.loads = refuse
        _load = torch.load
        def safe_load(*a, weights_only=None, **k):
            if weights_only is False:
                raise RuntimeError("torch.load(weights_only=False) refused")
            return _load(*a, weights_only=True, **k)
        torch.load = safe_load
        import mlflow, numpy as np, pandas as pd
        model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
        np.save(sys.argv[1], model.predict(pd.DataFrame({{"n": [8], "seed": [0]}}), params={{"nfe": 1}}))
        print(sys.modules["reflow_core"].__file__)
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": demo["uri"], "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # reflow_core must come from the model, not from this checkout
    out = tmp_path / "pyfunc.npy"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "/code/reflow_core/" in proc.stdout.strip().splitlines()[-1], proc.stdout
    assert np.array_equal(np.load(out), expected)


def _readme_line(prefix: str) -> str:
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines() if ln.strip().startswith(prefix)]
    assert len(lines) == 1, (prefix, lines)
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_serve_command_answers_invocations(demo, tmp_path):
    """The README's `mlflow models serve` line, run from the directory holding `runs/` (on a free port), answers
    the README's curl request with the samples `reflow sample` draws."""
    serve = _readme_line("PATH=")
    curl = _readme_line("curl ")
    port = _free_port()
    tokens = shlex.split(serve.replace("--port 5001", f"--port {port}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # reflow_core comes with the model
    while "=" in tokens[0]:  # the leading VAR=value assignments, $PWD being the checkout (where .venv is)
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value.replace("$PWD/.venv/bin", str(Path(sys.executable).parent)).replace("$PATH", env["PATH"])
    argv = tokens
    assert argv[:3] == ["mlflow", "models", "serve"] and "--env-manager" in argv and f"{port}" in argv
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:///runs/mlflow.db"
    payload = json.loads(shlex.split(curl)[shlex.split(curl).index("-d") + 1])
    expected = _reflow_sample(demo, tmp_path, payload["dataframe_split"]["data"][0][0],
                              payload["dataframe_split"]["data"][0][1], payload["params"]["nfe"])
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(argv, cwd=demo["home"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no server in 180 s: " + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        req = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        got = np.asarray(answer["predictions"], dtype=np.float32)
        assert got.shape == expected.shape and np.array_equal(got, expected)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_champion_moves_only_to_a_better_version(demo, tracking):
    """Three more runs from the demo's teacher, registered as the flow does: 2 reflow steps (v1, champion), 200
    steps (v2: better, @champion moves), 1 step (v3: worse, @champion stays); @latest is always the newest."""
    client = tracking.MlflowClient()
    teacher = stages.model_checkpoint(stages.RunDir.of(demo["root"], "toy2d"), "teacher")
    name = "toy2d-reflow-aliases"
    quick = {**TINY, "teacher.checkpoint": teacher, "eval.nfes": [1], "pairs.n_pairs": 1000,
             "pairs.shard_size": 1000}
    results = []
    for run, steps in (("short", 2), ("long", 200), ("shorter", 1)):
        version, head = _register(demo["root"], run, name, {**quick, "reflow.train.steps": steps})
        results.append((version, head[1]))
        latest = client.get_model_version_by_alias(name, "latest")
        assert str(latest.version) == version
    (v1, m1), (v2, m2), (v3, m3) = results
    assert m2 < m1 and m3 > m2, results  # the premise: 200 steps beat 2 and 1
    assert str(client.get_model_version_by_alias(name, "champion").version) == v2
    tags = {v: client.get_model_version(name, v).tags for v in (v1, v2, v3)}
    assert tags[v1]["reflow.champion_reason"].startswith("@champion: first version")
    assert re.match(rf"@champion: sliced_w2.reflow.euler.nfe1 = \S+ beats champion v{v1}", tags[v2][
        "reflow.champion_reason"])
    assert tags[v3]["reflow.champion_reason"].startswith("not @champion: sliced_w2.reflow.euler.nfe1 = ")
    assert f"champion v{v2}" in tags[v3]["reflow.champion_reason"]
    assert float(tags[v2]["reflow.metric_value"]) == pytest.approx(m2)
    mv = client.get_model_version(name, v2)
    assert "preset toy2d" in mv.description and "sliced_w2.reflow.euler.nfe1" in mv.description
    assert "quality at 1 NFE with euler" in mv.description
    assert "@champion" in client.get_registered_model(name).description
