"""Bad-input fuzzing of the configuration: `reflow_core.config.validate(raw)` turns every invalid input
into a ConfigError whose message names the offending field path, never another exception; valid inputs round-trip.
The same through presets + dotted overrides, and through the CLI (exit 2, the field named, no traceback)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reflow_core.config import ConfigError, PipelineConfig, validate

from reflow_core.preset import load_preset

BASE = PipelineConfig().model_dump(mode="json")
REPO = Path(__file__).resolve().parents[2]


def _leaves(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _leaves(v, prefix + (k,))
    return out


def _sections(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    for k, v in d.items():
        if isinstance(v, dict):
            out += _sections(v, prefix + (k,))
    return out


PATHS = _leaves(BASE)  # every field and section, e.g. ("teacher",), ("teacher", "train"), ("teacher", "train", "lr")
SECTIONS = _sections(BASE)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2.0, 2.0), st.text(max_size=8),
    st.sampled_from(["euler", "heun", "rho", "uniform", "mlp", "unet", "toy2d", "digits", "moons", "1e-3", "", "nan"]),
)
garbage = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=10)


def _set(raw: dict, path: tuple, value) -> None:
    node = raw
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _check(raw, field: str | None) -> None:
    """validate(raw): either a config that round-trips, or a ConfigError naming `field` (when given)."""
    try:
        cfg = validate(raw)
    except ConfigError as err:
        msg = str(err)
        assert msg.startswith("invalid configuration in config:")
        if field is not None:
            leaf, head = field.rsplit(".", 1)[-1], field.split(".", 1)[0]
            # pydantic's loc ("teacher.train.lr: Input should be greater than 0") or a cross-field check's own
            # message ("net.kind must be 'unet' for image data (data.name='digits')")
            assert field in msg or (leaf in msg and head in msg), (field, msg)
        return
    # anything else (TypeError, AttributeError, RecursionError, ...) fails the test by propagating
    assert validate(cfg.model_dump()) == cfg
    assert validate(json.loads(cfg.model_dump_json())) == cfg


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=garbage)
def test_one_bad_field(path, value):
    raw = copy.deepcopy(BASE)
    _set(raw, path, value)
    _check(raw, ".".join(path))


@settings(max_examples=100, deadline=None)
@given(section=st.sampled_from(SECTIONS), key=st.text(min_size=1, max_size=10), value=garbage)
def test_unknown_key(section, key, value):
    raw = copy.deepcopy(BASE)
    node = raw
    for p in section:
        node = node[p]
    if key in node:
        return
    node[key] = value
    with pytest.raises(ConfigError) as exc:
        validate(raw)
    assert ".".join(section + (key,)) in str(exc.value) and "Extra inputs are not permitted" in str(exc.value)


@settings(max_examples=100, deadline=None)
@given(raw=st.one_of(garbage, st.dictionaries(st.sampled_from(list(BASE) + ["x"]), garbage, max_size=6)))
def test_arbitrary_input_only_raises_config_error(raw):
    _check(raw, None)


@settings(max_examples=100, deadline=None)
@given(picks=st.lists(st.tuples(st.sampled_from(PATHS), garbage), max_size=4))
def test_several_bad_fields_only_config_errors(picks):
    raw = copy.deepcopy(BASE)
    for path, value in picks:
        try:
            _set(raw, path, value)
        except (TypeError, KeyError, IndexError):  # an earlier pick replaced a section by a scalar / list
            pass
    _check(raw, None)


@settings(max_examples=80, deadline=None)
@given(overrides=st.dictionaries(
    st.one_of(st.sampled_from([".".join(p) for p in PATHS]),
              st.lists(st.sampled_from(["teacher", "train", "lr", "pairs", "nfe", "x", ""]), min_size=1, max_size=4)
              .map(".".join)),
    garbage, max_size=3))
def test_preset_overrides_only_raise_config_error(overrides):
    try:
        cfg = load_preset("toy2d", overrides)
    except ConfigError:
        return
    assert validate(cfg.model_dump()) == cfg


@pytest.mark.parametrize("path, value, named", [
    (("teacher", "train", "lr"), -1, "teacher.train.lr"),
    (("pairs", "nfe"), 64, "pairs.nfe"),
    (("pairs", "chunk_size"), 3000, "pairs.chunk_size"),
    (("data", "name"), "digits", "data.name"),
    (("reflow", "forward_ratio"), 0.5, "reflow.forward_ratio"),
    (("teacher", "train", "huber_scale"), float("inf"), "teacher.train.huber_scale"),
    (("pairs", "rho"), float("nan"), "pairs.rho"),
    (("eval", "nfes"), [1, "x"], "eval.nfes"),
    (("net",), "big", "net"),
])
def test_known_bad_values_are_named(path, value, named):
    raw = copy.deepcopy(BASE)
    _set(raw, path, value)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        validate(raw)


def test_non_section_override_is_a_config_error():
    with pytest.raises(ConfigError, match="override data.toy.x: data.toy is '8gaussians', not a section"):
        load_preset("toy2d", {"data.toy.x": 1})


def test_cli_bad_value_exits_2_naming_the_field(tmp_path):
    exe = Path(sys.executable).with_name("reflow")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    proc = subprocess.run(argv + ["run", "--preset", "toy2d", "--root", str(tmp_path), "--set", "teacher.train.lr=-1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "teacher.train.lr" in proc.stderr and "greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not any(tmp_path.iterdir())  # nothing written
