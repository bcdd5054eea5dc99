"""The plan of a run: the ordered stage instances a config asks for. The list of stages is written here and only here.

    teacher -> pairs -> reflow [-> pairs-2 -> reflow-2 -> ...] [-> distill-pairs [-> anneal] -> distill] -> evaluate
    teacher -> pairs [-> anneal] -> distill -> evaluate                                        (reflow.rounds = 0)
    teacher [-> pairs -> reflow ...] -> distill -> evaluate       (distill.method = oftsr: from the last flow model)

Round r > 1 simulates pairs from round r-1's reflow model and fine-tunes that model (k-rectified flow). With
reflow.rounds = 1 the names and the artifact layout are the historical ones (teacher/, pairs.zarr, reflow/, eval/).
With reflow.rounds = 0 (InstaFlow's ablation: distillation straight from the teacher) the student learns the
teacher's own pairs (pairs.zarr, the round-1 store), so no distill-pairs store is simulated.
"""
from __future__ import annotations

from .. import storage
from ..config import ConfigError, PipelineConfig
from .base import Context, RunDir, Stage, StageOutput
from .kinds import module
from .pairs import check_settings


def suffix(r: int) -> str:
    return "" if r == 1 else f"-{r}"


def plan(cfg: PipelineConfig, rundir: RunDir) -> list[Stage]:
    """The stage instances of `cfg`, in the order they run; each names the stages it reads and the artifact it writes.

    eval.models must name models the run trains, and a run that simulates pairs must have pairs settings the store
    accepts (ConfigError otherwise): both refused before any stage runs."""
    out = _training(cfg, rundir)
    if any(s.kind == "pairs" for s in out):
        check_settings(cfg.pairs)
    by_model = {s.model: s.name for s in out if s.model}
    unknown = [m for m in cfg.eval.models or [] if m not in by_model]
    if unknown:
        raise ConfigError(f"eval.models {unknown} are not trained by this run (reflow.rounds={cfg.reflow.rounds}, "
                          f"distill {'on' if cfg.distill else 'off'}: {list(by_model)})")
    evaluated = cfg.eval.models if cfg.eval.models is not None else [m for m in by_model if m != "anneal"]
    reads = tuple((m, by_model[m]) for m in evaluated)
    if cfg.eval.guidance == "autoguidance" and not cfg.eval.guide_checkpoint:
        reads += (("guide", "teacher"),)  # AutoGuidance's weaker model: the teacher stage's guide.pt
    out.append(Stage("evaluate", "evaluate", 0, reads, rundir.url("eval")))
    return out


def _training(cfg: PipelineConfig, rundir: RunDir) -> list[Stage]:
    """Every stage of the plan before evaluate."""
    out = [Stage("teacher", "teacher", 0, (), rundir.url("teacher"), model="teacher")]
    prev = "teacher"
    for r in range(1, cfg.reflow.rounds + 1):
        s = suffix(r)
        out.append(Stage(f"pairs{s}", "pairs", r, (("model", prev),), rundir.url(f"pairs{s}.zarr")))
        out.append(Stage(f"reflow{s}", "reflow", r, (("pairs", f"pairs{s}"), ("init", prev)), rundir.url(f"reflow{s}"),
                         model=f"reflow{s}"))
        prev = f"reflow{s}"
    if cfg.distill is not None and cfg.distill.method == "oftsr":  # OFTSR: the teacher's ODE, no store
        out.append(Stage("distill", "distill", 1, (("teacher", prev), ("init", prev)), rundir.url("distill"),
                         model="distilled"))
    elif cfg.distill is not None:  # a one-step student of the last reflow model, on pairs of its own
        r = cfg.reflow.rounds + 1  # the round number only picks the store's own noise seed
        pairs = "distill-pairs" if cfg.reflow.rounds else "pairs"  # rounds 0: the teacher's store, round 1's seed
        out.append(Stage(pairs, "pairs", r, (("model", prev),), rundir.url(f"{pairs}.zarr")))
        init = prev
        if cfg.distill.net is not None:  # SlimFlow: a smaller student, first a flow of its own (Annealing Reflow)
            out.append(Stage("anneal", "anneal", r, (("pairs", pairs), ("teacher", prev)),
                             rundir.url("anneal"), model="anneal"))
            init = "anneal"
        out.append(Stage("distill", "distill", r, (("pairs", pairs), ("teacher", prev), ("init", init)),
                         rundir.url("distill"), model="slim" if cfg.distill.net is not None else "distilled"))
    return out


def model_names(cfg: PipelineConfig) -> list[str]:
    """The models the run trains, in plan order, by the names evaluation and `reflow sample --model` use."""
    return [s.model for s in _training(cfg, RunDir("", cfg.name)) if s.model]


def final_models(stages: list[Stage]) -> set[str]:
    """The models a run hands to users (registered by the flow): its last reflow round and its one-step student."""
    reflows = [s.model for s in stages if s.kind == "reflow"]
    return set(reflows[-1:]) | {s.model for s in stages if s.kind == "distill"}


def check_stage_names(cfg: PipelineConfig, names: list[str]) -> None:
    """ConfigError unless every name is a stage of the run's plan (`--stages`, `--redo-stage`)."""
    known = stage_names(cfg)
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"unknown stage(s) {bad}; this run's stages are {known} (`reflow plan` prints them)")


def stage_names(cfg: PipelineConfig) -> list[str]:
    return [s.name for s in plan(cfg, RunDir("", cfg.name))]


def find(stages: list[Stage], name: str) -> Stage:
    for s in stages:
        if s.name == name:
            return s
    raise ConfigError(f"unknown stage {name!r}; this run's stages are {[s.name for s in stages]}")


def upstream(stages: list[Stage], names: list[str]) -> list[Stage]:
    """The named stages and every stage they read from, transitively, in plan order."""
    need = {find(stages, n).name for n in names}
    for s in reversed(stages):
        if s.name in need:
            need.update(src for _, src in s.reads)
    return [s for s in stages if s.name in need]


def stage_done(rundir: RunDir, name: str) -> bool:
    cfg = rundir.config()
    s = find(plan(cfg, rundir), name)
    return module(s).done(s, Context(cfg, rundir))


def reset_stage(rundir: RunDir, name: str) -> list[str]:
    """Delete the artifacts of stage `name` and of every later stage (--redo-stage NAME), so the next run redoes
    them. A given teacher checkpoint (teacher.checkpoint) is never touched: only what lives under the run directory.
    Returns the URLs removed."""
    stages = plan(rundir.config(), rundir)
    first = stages.index(find(stages, name))
    removed = []
    for s in stages[first:]:
        fs, path = storage.fs_and_path(s.writes)
        if fs.exists(path):
            fs.rm(path, recursive=True)
            removed.append(s.writes)
    return removed


def inputs_of(stage: Stage, outputs: dict[str, StageOutput]) -> dict[str, StageOutput]:
    """The stage's inputs by role, from the outputs of the stages it reads."""
    missing = [src for _, src in stage.reads if src not in outputs]
    if missing:
        raise RuntimeError(f"stage {stage.name} reads {missing}, which have not run")
    return {role: outputs[src] for role, src in stage.reads}


def describe(stages: list[Stage], root_dir: str) -> str:
    """The plan as text: one line per stage (`reflow plan`)."""
    rows = []
    for i, s in enumerate(stages, 1):
        reads = ", ".join(f"{role}={src}" for role, src in s.reads) or "-"
        writes = s.writes[len(root_dir) + 1:] if s.writes.startswith(root_dir + "/") else s.writes
        rows.append((f"{i:>2}.", s.name, s.kind, reads, f"<run>/{writes}"))
    w = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join(f"{a:>{w[0]}} {n:<{w[1]}}  {k:<{w[2]}}  reads {r:<{w[3]}}  writes {o}" for a, n, k, r, o in rows)
