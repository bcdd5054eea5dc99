"""The docs say only what the code accepts: every `reflow ...` command quoted in README.md and docs/*.md parses with
the CLI's own parser, and every config key quoted there is a field of the schema (or one of the flow's settings)."""
from __future__ import annotations

import re
import shlex
import typing

import pytest
from helpers import REPO
from pydantic import BaseModel

from flows.cli import build_parser
from flows.params import KEYS
from reflow_core.config import PipelineConfig

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = tuple(PipelineConfig.model_fields) + ("tracking",)
SUBCOMMANDS = ("run", "sample", "export", "ui", "plan", "presets")


def _quoted(text: str) -> list[str]:
    """The code a document quotes: each line of its fenced blocks (continuation lines joined) and each inline span."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [line for b in blocks for line in b.replace("\\\n", " ").splitlines()] + inline


def _commands(text: str) -> list[str]:
    """`reflow <subcommand> ...` as quoted, cut at a shell comment, pipe or `&&`; `...` (an elision) dropped."""
    out = []
    for code in _quoted(text):
        for m in re.finditer(r"(?:^|[\s/$(])reflow\s+(" + "|".join(SUBCOMMANDS) + r")\b([^#|;&)]*)", code):
            cmd = re.sub(r"\.\.\.|[\[\]]", " ", f"{m.group(1)}{m.group(2)}")
            out.append(re.sub(r"(?<=\s)[A-Z]{1,2}(?=\s|$)", "1", cmd).strip())  # placeholders (N, S) as values
    return out


# dotted names in the docs that are not config keys: files (`pairs.zarr`, `reflow.py`) and the MLflow tags the flow
# writes (`reflow.skipped`), read from the flow's own source
FILES = (".py", ".zarr", ".md", ".json", ".yaml", ".png", ".pt", ".db")
TAGS = {m for f in (REPO / "flows").glob("*.py") for m in re.findall(r"[\"'{](reflow\.[a-z_]+)", f.read_text())}


def _keys(text: str) -> list[str]:
    """Config keys as quoted: a span or `--set` value starting with a config section and a dotted field (files and
    the flow's MLflow tag names excepted)."""
    pat = re.compile(rf"^(?:--set\s+)?((?:{'|'.join(SECTIONS)})(?:\.[a-z_0-9]+)+)(?:\s*[=:].*)?$")
    found = [m.group(1) for code in _quoted(text) for m in [pat.match(code.strip())] if m]
    return [k for k in found if not k.endswith(FILES) and k not in TAGS]


def _lenient(parser):
    """The parser with no required argument, so a quoted fragment (`reflow sample --nfe 1`) is checked for its
    options, their values and choices, not for completeness."""
    for action in parser._actions:
        action.required = False
        if action.nargs is None and not action.option_strings and not action.choices:
            action.nargs = "?"
        if getattr(action, "choices", None) and isinstance(action.choices, dict):
            for sub in action.choices.values():
                _lenient(sub)
    return parser


def _models(annotation) -> list[type[BaseModel]]:
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in args for m in _models(a)]


def _is_field(key: str) -> bool:
    if key in KEYS:
        return True
    models: list[type[BaseModel]] = [PipelineConfig]
    for part in key.split("."):
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            return False
        models = [sub for f in fields for sub in _models(f.annotation)]
    return True


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_quoted_reflow_command_parses(doc):
    parser, bad = _lenient(build_parser()), []
    for cmd in _commands(doc.read_text()):
        try:
            parser.parse_args(shlex.split(cmd))
        except SystemExit:
            bad.append(cmd)
    assert not bad, f"{doc.name}: commands the CLI refuses: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_quoted_config_key_exists(doc):
    bad = [k for k in _keys(doc.read_text()) if not _is_field(k)]
    assert not bad, f"{doc.name}: config keys that are not fields: {bad}"


def test_the_checks_find_what_they_look_for():
    """The extraction rules see commands and keys (so a green result is not an empty one)."""
    text = (REPO / "README.md").read_text() + "".join(p.read_text() for p in DOCS[1:])
    assert len(_commands(text)) > 20 and len(_keys(text)) > 20
    assert not _is_field("eval.rhos") and _is_field("pairs.grid.rho") and _is_field("pairs.engine")
    with pytest.raises(SystemExit):
        build_parser().parse_args(shlex.split("run --preset toy2d --no-such-flag"))


# a line that is only a `str.format` field (`{ov1}`): a template whose values were never filled in
_TEMPLATE_FIELD = re.compile(r"^\{[A-Za-z_][A-Za-z_0-9]*\}$")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_unfilled_template_field(doc):
    bad = [n for n, line in enumerate(doc.read_text().splitlines(), 1) if _TEMPLATE_FIELD.match(line.strip())]
    assert not bad, f"{doc.name}: lines {bad} are unfilled template fields (a measurement's output was never pasted)"
    assert _TEMPLATE_FIELD.match("{ov1}") and not _TEMPLATE_FIELD.match('{"flow_vs_local": 0.9}')
