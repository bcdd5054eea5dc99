"""`reflow sample --cond`: a super-resolution run's teacher (ODE at an NFE) and OFTSR student (one call at a knob)
on given low-res images, recomputed here from `reflow_core.sr` and the seed; malformed conditions and misplaced
flags refused in one line before any model work; the SR report tables show PSNR.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flows import cli, report
from reflow_core import sr as srmod
from reflow_core import stages
from reflow_core.oftsr import student_from_velocity, student_output
from reflow_core.sr_sample import DEFAULT_KNOB
from reflow_core.stages.base import heldout
from reflow_core.velocity import generate

RUN, TOY = "digits_sr_tiny", "toy2d_tiny"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> dict:
    """digits_sr_tiny and toy2d_tiny run with `reflow run --local`, the terminal output of the SR run, and a low-res
    file: 5 held-out digits degraded by the run's A (float32 (5, 1, 4, 4))."""
    root = tmp_path_factory.mktemp("sr_sample")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["run", "--preset", RUN, "--root", str(root), "--local", "--device", "cpu"]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["run", "--preset", TOY, "--root", str(root), "--local", "--device", "cpu"]) == 0
    cfg = stages.RunDir.of(str(root), RUN).config()
    lowres = srmod.degrade(heldout(cfg).x[:5], cfg.data.sr.scale, cfg.data.sr.degradation).numpy()
    np.save(root / "lowres.npy", lowres.astype(np.float32))
    return {"root": root, "cfg": cfg, "lowres": root / "lowres.npy", "terminal": out.getvalue()}


def _sample(home, out: Path, *extra: str, run: str = RUN) -> np.ndarray:
    argv = ["sample", "--root", str(home["root"]), "--run", run, "--out", str(out), "--device", "cpu", *extra]
    assert cli.main(argv) == 0
    return np.load(out.with_suffix(".npy"))


def _refused(home, capsys, out: Path, *extra: str, run: str = RUN) -> str:
    """The one-line error of a refused `reflow sample` (exit code != 0, nothing written)."""
    argv = ["sample", "--root", str(home["root"]), "--run", run, "--out", str(out), "--device", "cpu", *extra]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not out.exists() and not out.with_suffix(".npy").exists()
    return err


def _model(home, name: str):
    return stages.load_model(stages.model_checkpoint(stages.RunDir.of(str(home["root"]), RUN), name))


def _source(home, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, x_src) of the low-res file, from reflow_core.sr and the seed alone."""
    sr = home["cfg"].data.sr
    c = srmod.lift(torch.from_numpy(np.load(home["lowres"])), sr.scale, sr.degradation)
    eps = torch.randn(c.shape, generator=torch.Generator().manual_seed(seed))
    return c, srmod.source(c, eps, sr.sigma_p)


def test_outputs_are_high_res_images(home, tmp_path):
    for extra in (["--model", "teacher", "--nfe", "3"], ["--model", "distilled", "--knob", "0.7"]):
        x = _sample(home, tmp_path / f"{extra[1]}.npy", "--cond", str(home["lowres"]), *extra)
        assert x.shape == (5, 1, 8, 8) and x.dtype == np.float32
        assert np.isfinite(x).all() and x.min() >= -1 and x.max() <= 1 and x.std() > 0


@pytest.mark.parametrize("nfe", [None, 1, 4])
def test_teacher_output_is_its_ode_from_the_seeded_source(home, tmp_path, nfe):
    extra = [] if nfe is None else ["--nfe", str(nfe)]
    x = _sample(home, tmp_path / "t.npy", "--cond", str(home["lowres"]), "--model", "teacher", "--seed", "3", *extra)
    c, x_src = _source(home, 3)
    steps = home["cfg"].eval.nfes[-1] if nfe is None else nfe  # default: the run's last eval NFE
    want = generate(_model(home, "teacher"), x_src, steps, "euler", cond=c).clamp(-1, 1)
    assert torch.equal(torch.from_numpy(x), want)


@pytest.mark.parametrize("knob", [None, 0.0, 0.3, 1.0])
def test_student_output_is_one_call_at_the_knob(home, tmp_path, knob):
    extra = [] if knob is None else ["--knob", str(knob)]
    x = _sample(home, tmp_path / "s.npy", "--cond", str(home["lowres"]), "--model", "distilled", "--seed", "5", *extra)
    c, x_src = _source(home, 5)
    m = _model(home, "distilled")
    student = student_from_velocity(lambda z, t, cond: m(z, t, None, cond))
    with torch.no_grad():
        want = student_output(student, x_src, c, DEFAULT_KNOB if knob is None else knob).clamp(-1, 1)
    assert torch.equal(torch.from_numpy(x), want)


def test_a_picture_shows_input_and_output(home, tmp_path):
    x = _sample(home, tmp_path / "sr.png", "--cond", str(home["lowres"]), "--model", "distilled")
    assert x.shape == (5, 1, 8, 8) and (tmp_path / "sr.png").stat().st_size > 0


@pytest.mark.parametrize("shape, dtype, says", [
    ((5, 3, 4, 4), np.float32, "(N, 1, 4, 4)"),  # wrong channels
    ((5, 1, 8, 8), np.float32, "(N, 1, 4, 4)"),  # the high-res size, not the low-res one
    ((5, 1, 4, 2), np.float32, "(N, 1, 4, 4)"),
    ((1, 4, 4), np.float32, "4-D"),
    ((5, 1, 4, 4), np.int64, "float"),
])
def test_a_malformed_condition_is_refused(home, tmp_path, capsys, shape, dtype, says):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(shape, dtype=dtype))
    err = _refused(home, capsys, tmp_path / "x.png", "--cond", str(bad), "--model", "teacher")
    assert says in err and str(bad) in err


def test_the_console_command_refuses_a_wrong_shape_in_one_line(home, tmp_path):
    bad, out = tmp_path / "bad.npy", tmp_path / "x.png"
    np.save(bad, np.zeros((2, 3, 4, 4), dtype=np.float32))
    argv = [sys.executable, "-m", "flows.cli", "sample", "--root", str(home["root"]), "--run", RUN, "--model",
            "distilled", "--cond", str(bad), "--out", str(out)]
    p = subprocess.run(argv, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                       cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: --cond {bad}: low-res images must have shape (N, 1, 4, 4) (image size 8x8 / scale 2), "
        "got (2, 3, 4, 4)"]
    assert not out.exists() and not bad.with_name("x.npy").exists()


def test_nan_is_refused_but_out_of_range_values_are_not(home, tmp_path, capsys):
    lowres = np.load(home["lowres"])
    big = tmp_path / "big.npy"
    np.save(big, lowres * 3)
    assert _sample(home, tmp_path / "ok.npy", "--cond", str(big), "--model", "teacher").shape == (5, 1, 8, 8)
    lowres[2, 0, 1, 1] = np.nan
    nan = tmp_path / "nan.npy"
    np.save(nan, lowres)
    assert "NaN" in _refused(home, capsys, tmp_path / "x.npy", "--cond", str(nan), "--model", "teacher")


@pytest.mark.parametrize("extra, says", [
    (["--model", "teacher", "--knob", "0.5"], "--knob"),  # the knob is the student's
    (["--model", "distilled", "--nfe", "2"], "--nfe"),  # the NFE is the teacher's
    (["--model", "distilled", "--knob", "1.5"], "[0, 1]"),
    (["--model", "teacher", "--n", "8"], "--n"),
    (["--model", "teacher", "--label", "3"], "--label"),
])
def test_misplaced_flags_are_refused(home, tmp_path, capsys, extra, says):
    assert says in _refused(home, capsys, tmp_path / "x.npy", "--cond", str(home["lowres"]), *extra)


def test_an_sr_model_needs_cond_and_a_plain_run_refuses_it(home, tmp_path, capsys):
    assert "--cond" in _refused(home, capsys, tmp_path / "x.npy", "--model", "distilled")
    err = _refused(home, capsys, tmp_path / "x.npy", "--cond", str(home["lowres"]), "--model", "reflow", run=TOY)
    assert "not a super-resolution run" in err
    assert "--knob" in _refused(home, capsys, tmp_path / "x.npy", "--knob", "0.5", "--model", "reflow", run=TOY)
    assert _sample(home, tmp_path / "toy.npy", "--model", "reflow", "--n", "7", run=TOY).shape == (7, 2)


def test_report_tables_of_sr_rows_show_psnr(home):
    terminal = home["terminal"]
    assert "fd_digits (lower is better) by model, solver and NFE:" in terminal
    assert "psnr (higher is better) by model, solver and NFE:" in terminal
    rows = json.loads((home["root"] / RUN / "eval" / "metrics.json").read_text())["rows"]
    text = report.summary_table(rows, "fd_digits")
    psnr = text.split("psnr (higher is better)", 1)[1].splitlines()
    teacher = next(r for r in rows if r["model"] == "teacher" and r["nfe"] == 1)
    assert any(line.split()[:3] == ["teacher", "euler", f"{teacher['psnr']:.4g}"] for line in psnr)
    assert any(line.split()[:3] == ["distilled", "knob", "0.01"] for line in psnr)
    images = [str(home["root"] / RUN / "eval" / "fidelity_realism.png")]
    md = report.summary_markdown(report.RunResults(RUN, RUN, "d", rows, "fd_digits", images, "sqlite:///x", "e", "0",
                                                   "r"), "ui")
    assert "## psnr (higher is better) by model, solver and NFE" in md and "`fidelity_realism.png`" in md
    assert "### fidelity_realism.png" in md
    toy = json.loads((home["root"] / TOY / "eval" / "metrics.json").read_text())["rows"]
    assert "psnr" not in report.summary_table(toy, "sliced_w2") and report.extra_columns(toy) == []
