"""A trained model outside the pipeline: `reflow export` to safetensors + config and to a diffusers pipeline folder
(FlowMatchEulerDiscreteScheduler; its Euler samples equal `reflow sample`'s at the same noise and NFE), the README's
Python snippet, and `reflow sample` with labels, guidance and a picture.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from flows import cli
from reflow_core import export, solvers, stages
from reflow_core.preset import load_preset
from reflow_core.stages import evaluate

from helpers import tiny

ROOT = Path(__file__).resolve().parents[2]
TOY = tiny({
    "data.n_train": 2000, "teacher.train.steps": 60, "teacher.train.batch_size": 128, "teacher.train.warmup": 100,
    "teacher.train.ckpt_every": 60, "teacher.train.log_every": 100, "pairs.shard_size": 500, "pairs.chunk_size": 500,
    "pairs.batch_size": 500, "pairs.nfe": 3, "reflow.train.steps": 40, "reflow.train.batch_size": 128,
    "reflow.train.warmup": 100, "reflow.train.ckpt_every": 40, "reflow.train.log_every": 100, "eval.nfes": [1],
    "eval.straightness_steps": 2,
})
# a class-conditional image teacher: the only stage sample needs for `--model teacher`
DIGITS = {"teacher.train.steps": 10, "teacher.train.batch_size": 32, "teacher.train.ckpt_every": 10}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A directory holding `runs/toy2d` (a finished tiny toy2d run) and `runs/digits` (a tiny teacher only)."""
    home = tmp_path_factory.mktemp("export")
    root = str(home / "runs")
    stages.run_local(load_preset("toy2d", TOY), root, "toy2d")
    stages.run_local(load_preset("digits", DIGITS), root, "digits", stages=["teacher"])
    return home


def _sample(home, tmp_path, *extra: str, run: str = "toy2d", out: str = "x.npy") -> np.ndarray:
    path = tmp_path / out
    assert cli.main(["sample", "--root", str(home / "runs"), "--run", run, "--out", str(path), *extra]) == 0
    return np.load(path.with_suffix(".npy"))


def _readme_export(home, out: Path, fmt: str) -> None:
    """The README's `reflow export` line, run against this directory's runs/, writing to out."""
    line = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith(".venv/bin/reflow export"))
    argv = shlex.split(line.split("#")[0])[1:]
    assert argv[:1] == ["export"] and argv[argv.index("--format") + 1] == "diffusers"
    argv[argv.index("--root") + 1] = str(home / "runs")
    argv[argv.index("--format") + 1] = fmt
    argv[-1] = str(out)
    assert cli.main(argv) == 0


def test_diffusers_export_samples_like_reflow_sample(home, tmp_path):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    out = tmp_path / "toy2d-diffusers"
    _readme_export(home, out, "diffusers")
    assert not [p for p in out.rglob("*") if p.suffix in {".pkl", ".pickle", ".bin", ".pt"}]
    assert (out / "velocity" / "diffusion_pytorch_model.safetensors").exists()
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 1.0
    n, seed = 200, 4
    noise = evaluate.eval_noise((2,), n, seed)  # the noise `reflow sample --seed 4` draws
    for nfe in (1, 2, 3, 8):
        ours = _sample(home, tmp_path, "--nfe", str(nfe), "--n", str(n), "--seed", str(seed))
        theirs = pipe(noise=noise, num_inference_steps=nfe).samples.numpy()
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
        # the convention: sigma is our t on the uniform grid 1 -> 0, timesteps are sigma * 1000
        grid = solvers.time_grid(nfe).float()
        assert torch.allclose(pipe.scheduler.sigmas, grid, atol=1e-7)
        assert torch.allclose(pipe.scheduler.timesteps, grid[:-1] * 1000, atol=1e-4)


def test_diffusers_default_grid_is_not_ours():
    """Why the pipeline passes its own sigmas: the scheduler's default grid for N > 1 steps stops at 1/1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    s.set_timesteps(2)
    assert not torch.allclose(s.sigmas, solvers.time_grid(2).float())


def test_safetensors_export_is_weights_and_config(home, tmp_path):
    out = tmp_path / "st"
    _readme_export(home, out, "safetensors")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.json", "config.json"}
    assert json.loads((out / "config.json").read_text())["name"] == "toy2d"
    model = export.load_weights(out)
    ckpt = stages.load_model(stages.model_checkpoint(stages.RunDir.of(str(home / "runs"), "toy2d"), "reflow"))
    noise = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(export.draw(model, noise, 2), export.draw(ckpt, noise, 2))
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(ckpt.state_dict()) and f.metadata()["convention"] == "t0=data,t1=noise"


def test_readme_snippet_samples_and_saves_a_picture(home, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    snippet = next(b for b in blocks if "sample_model" in b)
    assert len(snippet.strip().splitlines()) == 3
    monkeypatch.chdir(home)  # where `runs/toy2d` is, as after `make demo`
    exec(compile(snippet, "README.md", "exec"), {})
    assert (home / "samples.png").stat().st_size > 1000


def test_sample_class_conditional_labels_guidance_and_grid(home, tmp_path, capsys):
    base = ("--model", "teacher", "--n", "12", "--seed", "0")
    drawn = _sample(home, tmp_path, *base, run="digits", out="drawn.png")
    assert "drawn uniformly" in capsys.readouterr().err
    assert (tmp_path / "drawn.png").exists() and drawn.shape == (12, 1, 8, 8)
    # uniform labels (as the evaluation draws them), not the untrained "no label" row
    rundir = stages.RunDir.of(str(home / "runs"), "digits")
    model = stages.load_model(stages.model_checkpoint(rundir, "teacher"))
    noise = evaluate.eval_noise((1, 8, 8), 12, 0)
    null_row = export.draw(model, noise, 1, image=True).numpy()
    uniform = export.draw(model, noise, 1, labels=export.default_labels(model, 12, 0), image=True).numpy()
    assert np.array_equal(drawn, uniform) and not np.allclose(drawn, null_row)
    # --labels cycles, --label is one class for all
    cycled = _sample(home, tmp_path, *base, "--labels", "3,7", run="digits", out="cycled.npy")
    labels = torch.tensor([3, 7] * 6)
    assert np.array_equal(cycled, export.draw(model, noise, 1, labels=labels, image=True).numpy())
    assert "drawn uniformly" not in capsys.readouterr().err
    one = _sample(home, tmp_path, *base, "--label", "5", run="digits", out="one.npy")
    assert np.array_equal(one, export.draw(model, noise, 1, labels=torch.full((12,), 5), image=True).numpy())
    # CFG: two network evaluations a step; weight 1 is the conditional model itself
    cfg2 = _sample(home, tmp_path, *base, "--label", "5", "--guidance", "cfg", "--weight", "2", "--nfe", "2",
                   run="digits", out="cfg2.npy")
    cfg1 = _sample(home, tmp_path, *base, "--label", "5", "--guidance", "cfg", "--weight", "1", "--nfe", "2",
                   run="digits", out="cfg1.npy")
    assert np.array_equal(cfg1, one) and not np.allclose(cfg2, one)
    with pytest.raises(SystemExit):
        _sample(home, tmp_path, *base, "--labels", "0,10", run="digits")
    assert "classes 0..9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _sample(home, tmp_path, "--label", "1")  # toy2d is unconditional
    assert "unconditional" in capsys.readouterr().err


def test_pyfunc_sampler_labels_and_guidance_like_reflow_sample(home, tmp_path):
    """The MLflow sampler's predict on a class-conditional model: uniform labels by default, `label`, CFG params,
    the same numbers as `reflow sample` (the class is used directly here; test_serving loads it through MLflow)."""
    import pandas as pd
    from types import SimpleNamespace

    from flows.sampler_model import ReflowSampler

    rundir = stages.RunDir.of(str(home / "runs"), "digits")
    files = export.save_weights(stages.model_checkpoint(rundir, "teacher"), tmp_path / "m")
    sampler = ReflowSampler()
    sampler.load_context(SimpleNamespace(artifacts=files))
    base = ("--model", "teacher", "--n", "6", "--seed", "2")

    def predict(params, **cols):
        return sampler.predict(None, pd.DataFrame({"n": [6], "seed": [2], **cols}), params).reshape(6, 1, 8, 8)

    assert np.array_equal(predict({"nfe": 1}), _sample(home, tmp_path, *base, run="digits"))
    assert np.array_equal(predict({"nfe": 1}, label=[4]), _sample(home, tmp_path, *base, "--label", "4",
                                                                  run="digits"))
    guided = _sample(home, tmp_path, *base, "--label", "4", "--guidance", "cfg", "--weight", "3", "--nfe", "2",
                     run="digits")
    assert np.array_equal(predict({"nfe": 2, "guidance": "cfg", "guidance_weight": 3.0}, label=[4]), guided)
