"""`reflow` command line: run the pipeline, sample or export a trained model, open the MLflow UI, list presets.

    reflow run --preset toy2d --root ./runs --run demo --set teacher.train.steps=500 --set eval.nfes=[1,2,4]
    reflow run --preset toy2d --root ./runs --run demo --stages evaluate
    reflow run --preset toy2d --root ./runs --run demo --redo-stage pairs
    reflow sample --root ./runs --run demo --model reflow --nfe 2 --solver euler --n 1000 --out samples.npy
    reflow sample --root ./runs --run digits --labels 0,1,2,3,4,5,6,7,8,9 --n 100 --out grid.png
    reflow sample --root ./runs --run digits_sr --model distilled --cond lowres.npy --knob 0.5 --out sr.png
    reflow export --root ./runs --run demo --model reflow --format diffusers ./toy2d-diffusers
    reflow plan --preset digits_3rf
    reflow ui --root ./runs
    reflow presets
"""
from __future__ import annotations

import argparse
import atexit
import gc
import os
import re
import shlex
import sys
from typing import Any

import yaml

from flows import FLOW_NAME, with_teacher_checkpoint
from reflow_core.config import ConfigError
from reflow_core.preset import load_preset, preset_names
from reflow_core.lease import RunInUse


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs -> overrides; values are YAML (`3`, `1e-4`, `true`, `[1, 2]`, `null`, `text`)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: cannot parse {value!r} as YAML ({err})") from None
        if isinstance(parsed, str) and _FLOAT.fullmatch(parsed.strip()):
            parsed = float(parsed)  # YAML 1.1 reads "1e-4" (no dot) as a string
        out[key.strip()] = parsed
    return out


def parse_stages(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_sets(args.set)
    stages = parse_stages(args.stages)
    # fail fast with a clear message, before Prefect starts
    cfg = load_preset(args.preset, with_teacher_checkpoint(overrides, args.teacher_checkpoint))
    # the temporary API server first: the checks below already import torch (seconds), the server's start-up runs
    # on another core meanwhile
    server = None if args.local else _start_api_server()
    if not args.local:  # and MLflow's (imports, store, the model's logging) in a process of its own, meanwhile
        from flows.tracking_process import start_process
        start_process()
    from reflow_core.stages import check_run_name, check_stage_names

    check_stage_names(cfg, (stages or []) + (args.redo_stage or []))
    if args.run is not None:
        check_run_name(args.run)
    root = args.root or os.environ.get("REFLOW_ROOT") or "./runs"
    if args.local:
        from flows.report import quality_column, summary_table
        from reflow_core.callbacks import ConsoleCallback
        from reflow_core.host import steady_malloc
        from reflow_core.stages import RunDir, run_local

        steady_malloc()  # as the flow does (flows/reflow.py)
        rows = run_local(cfg, root, args.run, callback=ConsoleCallback(), device=args.device, new=args.new,
                            redo_stages=args.redo_stage or (), stages=stages)
        if rows:
            print(summary_table(rows, quality_column(rows)))
        if not args.new:  # (with --new the run may have been given a suffixed name: run_local returns rows only)
            print(f"run directory:  {RunDir.of(root, args.run or cfg.name).dir}")
        return 0

    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.reflow import reflow
    from flows.tracking_store import open_store, resolve_tracking_uri
    from flows.params import allow_any_preset_path, leaf_overrides, orchestration

    orch = orchestration(args.preset, overrides)
    open_store(resolve_tracking_uri(orch.mlflow_uri, root))  # (for a new store: creates its tables)
    settings = {}
    if server is not None:
        # (a server that lost its port to another process meanwhile was restarted on another one)
        settings[PREFECT_API_URL] = server.wait(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
        # heartbeats let a lasting server tell a crashed flow run; this one ends with the run. Without them the
        # run does not wait (up to 1 s) at its end for the heartbeat thread
        settings[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
    # the caller may load any YAML it can read (a deployment may not)
    with allow_any_preset_path(), temporary_settings(updates=settings):
        # the flow's overrides are typed per config field: `--set pairs.grid.rho=2` becomes `pairs.grid: {...}`
        reflow(preset=args.preset, overrides=leaf_overrides(args.preset, overrides) or None, root=root, run=args.run,
               new=args.new, stages=stages, teacher_checkpoint=args.teacher_checkpoint,
               redo_stages=args.redo_stage or None)  # prints the summary table and the MLflow UI command
    return 0


def _start_api_server():
    """The temporary Prefect API server of a flow run without one configured (flows/api_server.py), started now so
    it comes up while this process imports prefect, torch and mlflow; None when `PREFECT_API_URL` is set, or when
    prefect is already imported (a test process: its settings are read once, so Prefect's own ephemeral mode
    starts a server as before)."""
    # Telemetry heartbeats only add database-lock noise to a short local run: off unless asked for
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    # the server gets 120 s to answer (Prefect's default of 20 s timed out on a busy 2-core machine)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    from flows.api_server import TemporaryServer

    server = TemporaryServer().start()
    server.warm_up(FLOW_NAME)  # its first-request costs while this process imports
    # stopped at exit, after Prefect's own exit handlers (registered later, run earlier) have sent the last logs
    # and events to it
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = server.api_url
    os.environ["PREFECT_UI_URL"] = ""  # it serves no UI: no "View at" link to a page that never was
    return server


def _cmd_plan(args: argparse.Namespace) -> int:
    from reflow_core import stages

    cfg = load_preset(args.preset, parse_sets(args.set))
    rundir = stages.RunDir.of(args.root, args.run or cfg.name)
    print(f"plan of preset {args.preset!r} (run {rundir.run!r} under {args.root}; reflow.rounds={cfg.reflow.rounds}):")
    print(stages.describe(stages.plan(cfg, rundir), rundir.dir))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from reflow_core import plots, stages

    cfg = _run_config(args.root, args.run)
    if cfg.data.sr is not None or args.cond is not None or args.knob is not None:
        return _sample_sr(args, cfg)
    args.nfe = 1 if args.nfe is None else args.nfe
    args.n = 1000 if args.n is None else args.n
    rundir = stages.prepare_run(cfg, args.root, args.run)
    labels = _sample_labels(args)
    if cfg.net.class_cond and labels is None:
        print(f"note: {args.model} is class-conditional and no --label/--labels was given: labels are drawn "
              f"uniformly over the classes (seed {args.seed + 1})", file=sys.stderr)
    x = stages.sample_model(rundir, args.model, args.nfe, args.solver, args.n, args.seed, args.device, labels,
                            guidance=args.guidance, guidance_weight=args.weight)
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    stem, ext = os.path.splitext(args.out)
    out = args.out if ext == ".npy" else stem + ".npy"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.save(out, arr)
    what = f"({args.model}, {args.solver}, NFE {args.nfe})"
    print(f"saved {arr.shape} samples {what} to {out}")
    if ext in (".png", ".jpg", ".pdf", ".svg"):
        plots.save_samples(x, args.out, title=f"{args.run}: {args.model}, {args.solver}, NFE {args.nfe}")
        print(f"saved a {'scatter' if arr.ndim == 2 else 'grid'} of them to {args.out}")
    return 0


def _sample_sr(args: argparse.Namespace, cfg) -> int:
    """`reflow sample --cond LOWRES.npy` of a super-resolution run (reflow_core/sr_sample.py): every check first
    (flags, run, model, the condition's file, shape and values), then the model; x.png also writes x.npy and a grid
    of (lifted low-res input, output) pairs."""
    import numpy as np
    import torch

    from reflow_core import plots, sr_sample, stages

    sr = cfg.data.sr
    if sr is None:
        flag = "--cond" if args.cond is not None else "--knob"
        raise ConfigError(f"{flag}: run {args.run!r} is not a super-resolution run (no data.sr): it takes no "
                          "low-res condition or knob")
    if args.cond is None:
        raise ConfigError(f"run {args.run!r} is a super-resolution run: give the low-res images with --cond "
                          f"LOWRES.npy, float32 (N, {cfg.net.cond_channels}, {cfg.data.image_size // sr.scale}, "
                          f"{cfg.data.image_size // sr.scale}) in [-1, 1]")
    given = [f for f, v in (("--n", args.n), ("--label", args.label), ("--labels", args.labels),
                            ("--guidance", args.guidance), ("--weight", args.weight)) if v is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: not for super-resolution (--cond): one output per low-res image, "
                          "no labels or guidance")
    if args.model == sr_sample.STUDENT and args.solver != "euler":
        raise ConfigError(f"--solver: {sr_sample.STUDENT!r} is OFTSR's one-call student, it takes no solver")
    try:
        knob, nfe = sr_sample.setting(args.model, knob=args.knob, nfe=args.nfe, eval_nfes=cfg.eval.nfes)
    except ValueError as err:
        raise ConfigError(f"{'--knob' if args.knob is not None else '--nfe'}: {err}") from None
    url = stages.model_checkpoint(stages.RunDir.of(args.root, args.run), args.model)  # unknown: a ConfigError
    try:
        arr = np.load(args.cond, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--cond: cannot read {args.cond} as a .npy array ({err})".splitlines()[0]) from None
    if arr.dtype.kind not in "biuf":
        raise ConfigError(f"--cond: low-res images must be float (float32 in [-1, 1]), got dtype {arr.dtype}")
    lowres = torch.from_numpy(np.ascontiguousarray(arr))
    size = cfg.data.image_size
    try:
        sr_sample.check_lowres(lowres, (cfg.net.cond_channels, size, size), sr)
    except ValueError as err:
        raise ConfigError(f"--cond {args.cond}: {err}") from None

    stages.prepare_run(cfg, args.root, args.run)  # (as `reflow sample` of any run: refuses a changed config)
    model = stages.load_model(url, device=stages.default_device(args.device))
    x = sr_sample.super_resolve(model, lowres, sr, knob=knob, nfe=nfe, seed=args.seed, solver=args.solver)
    arr = x.numpy()
    stem, ext = os.path.splitext(args.out)
    out = args.out if ext == ".npy" else stem + ".npy"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.save(out, arr)
    what = f"knob {knob:g}" if knob is not None else f"{args.solver}, NFE {nfe}"
    print(f"saved {arr.shape} super-resolved images ({args.model}, {what}, seed {args.seed}) to {out}")
    if ext in (".png", ".jpg", ".pdf", ".svg"):
        c = sr_sample.condition(lowres, sr).clamp(-1, 1)
        per_row = max(1, int(np.ceil(np.sqrt(len(x)))))
        plots.sample_grid(torch.stack([c, x], 1).flatten(0, 1), args.out, nrow=2 * per_row,
                          title=f"{args.run}: {args.model}, {what}; pairs: low-res input (lifted), output")
        print(f"saved a grid of (low-res input, output) pairs to {args.out}")
    return 0


def _sample_labels(args: argparse.Namespace) -> list[int] | None:
    if args.label is not None and args.labels:
        raise ConfigError("give --label or --labels, not both")
    if args.labels:
        try:
            return [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--labels expects comma-separated class indices, got {args.labels!r}") from None
    return None if args.label is None else [args.label]


def _cmd_export(args: argparse.Namespace) -> int:
    from reflow_core import export, stages, storage

    cfg = _run_config(args.root, args.run)
    rundir = stages.RunDir.of(args.root, args.run)
    ckpt = stages.model_checkpoint(rundir, args.model)
    config = storage.read_json(rundir.config_json)
    if args.format == "diffusers":
        export.write_diffusers(ckpt, args.out, config)
        print(f"wrote a diffusers pipeline of {args.run}/{args.model} to {args.out}: "
              f"DiffusionPipeline.from_pretrained({args.out!r}, trust_remote_code=True)")
    else:
        export.save_weights(ckpt, args.out, config)
        print(f"wrote {export.WEIGHTS}, {export.META} and {export.CONFIG} of {args.run}/{args.model} "
              f"({cfg.name}) to {args.out}")
    return 0


def _run_config(root: str, run: str):
    """The validated config stored with an existing run."""
    from reflow_core import storage
    from reflow_core.stages import RunDir, read_run_config

    url = RunDir.of(root, run).config_json  # refuses a run name that would leave the root
    if not storage.exists(url):
        raise ConfigError(f"no run {run!r} under {root} ({url} not found)")
    return read_run_config(url)  # truncated / invalid JSON: a ConfigError naming the file


def _cmd_worker(args: argparse.Namespace) -> int:
    from flows import worker

    return worker.run(args.worker_args, grace=args.grace)


def _cmd_ui(args: argparse.Namespace) -> int:
    from flows.tracking_store import resolve_tracking_uri, ui_command

    uri = resolve_tracking_uri(args.uri, args.root)
    cmd = ui_command(uri)
    print(cmd)
    if args.print_only or uri.startswith(("http://", "https://")):
        return 0
    argv = shlex.split(cmd) + ["--port", str(args.port)]
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")  # the mlflow next to this interpreter
    if os.path.exists(exe):
        argv[0] = exe
    sys.stdout.flush()
    os.execvp(argv[0], argv)
    return 0  # not reached


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reflow", description="ReFlow (rectified flow) pipeline")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run or resume a pipeline (a Prefect flow; --local: plain Python)")
    r.add_argument("--preset", default="toy2d", help="preset name or YAML path (see `reflow presets`)")
    r.add_argument("--root", default=None, help="root of all runs: a directory or fsspec URL (s3://...); default "
                   "$REFLOW_ROOT, else ./runs")
    r.add_argument("--run", default=None, help="run name; reuse it to resume (default: the config's name, i.e. "
                   "the preset's, so rerunning a preset resumes it)")
    r.add_argument("--new", action="store_true", help="when the run directory exists with a different configuration, "
                   "start a fresh one with a suffixed name (<run>-2, ...) instead of refusing; with the same "
                   "configuration the run is resumed as without --new")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (YAML value)")
    r.add_argument("--stages", default=None, help="comma-separated stage names of the run's plan (teacher, pairs, "
                   "reflow, [pairs-2, reflow-2, ...,] evaluate; see `reflow plan`)")
    r.add_argument("--teacher-checkpoint", default=None, help="use this teacher checkpoint instead of training")
    r.add_argument("--redo-stage", action="append", metavar="STAGE", help="delete this stage's artifacts (and those "
                   "of later stages) first, so they are redone: a stage name of the plan, e.g. pairs, reflow-2, "
                   "evaluate (repeatable)")
    r.add_argument("--local", action="store_true", help="run the stages in this process without Prefect")
    r.add_argument("--device", default=None, help="--local only: torch device (default: cuda if available)")
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("sample", help="draw samples from a trained model of a run")
    s.add_argument("--root", default="./runs")
    s.add_argument("--run", required=True)
    s.add_argument("--model", default="reflow", help="teacher, reflow, reflow-2, ... (a model the run trained)")
    s.add_argument("--nfe", type=int, default=None, help="network evaluations (default 1; super-resolution: the "
                   "teacher's, default the run's last eval NFE)")
    s.add_argument("--solver", choices=["euler", "heun"], default="euler")
    s.add_argument("--n", type=int, default=None, help="number of samples (default 1000; not with --cond)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", type=int, default=None, help="class of every sample (class-conditional models)")
    s.add_argument("--labels", default=None, help="comma-separated classes, cycled over the samples (0,1,2,...)")
    s.add_argument("--guidance", choices=["none", "cfg", "autoguidance"], default=None,
                   help="default: the run's eval.guidance")
    s.add_argument("--weight", type=float, default=None, help="guidance weight (default: eval.guidance_weight)")
    s.add_argument("--cond", default=None, metavar="LOWRES.npy", help="super-resolution runs (data.sr): low-res "
                   "images, float32 (N, C, H / scale, W / scale) in [-1, 1]; one output per image (N, C, H, W)")
    s.add_argument("--knob", type=float, default=None, help="super-resolution: OFTSR's student (model distilled) "
                   "at this knob in [0, 1], 0 fidelity (posterior mean) to 1 realism (default 0.5)")
    s.add_argument("--out", required=True, help="output .npy file; x.png writes x.npy and an image grid (images; "
                   "with --cond: low-res input and output side by side) or a scatter (2-D) next to it")
    s.add_argument("--device", default=None)
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser("export", help="write a trained model as safetensors + config, or as a diffusers pipeline")
    e.add_argument("--root", default="./runs")
    e.add_argument("--run", required=True)
    e.add_argument("--model", default="reflow", help="reflow, reflow-2, ..., distilled (a model the run trained)")
    e.add_argument("--format", choices=["diffusers", "safetensors"], default="diffusers")
    e.add_argument("out", help="output directory")
    e.set_defaults(func=_cmd_export)

    u = sub.add_parser("ui", help="start the MLflow UI on the tracking store of a root")
    u.add_argument("--root", default="./runs")
    u.add_argument("--uri", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI, else the root's sqlite)")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--print-only", action="store_true", help="print the command without starting the UI")
    u.set_defaults(func=_cmd_ui)

    pl = sub.add_parser("plan", help="print the stage instances a preset runs, what each reads and writes")
    pl.add_argument("--preset", default="toy2d", help="preset name or YAML path")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (YAML value)")
    pl.add_argument("--root", default="./runs")
    pl.add_argument("--run", default=None)
    pl.set_defaults(func=_cmd_plan)

    w = sub.add_parser("worker", usage="reflow worker [--grace S] ARGS...",
                       help="a Prefect process worker that stops its flow runs cleanly (SIGTERM) when stopped",
                       description="Runs `prefect worker start ARGS...`; on SIGTERM or SIGINT it first sends SIGTERM "
                                   "to the worker's flow-run processes (they end Crashed, resumable), then stops "
                                   "the worker.")
    w.add_argument("--grace", type=float, default=25.0, help="seconds to wait for the flow runs to stop (default 25)")
    w.set_defaults(func=_cmd_worker)  # every other argument goes to `prefect worker start` (main)

    ps = sub.add_parser("presets", help="list the preset names")
    ps.set_defaults(func=_cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    # At exit, move every live object out of the collector's reach, so the interpreter's teardown skips its
    # collection passes over the heap of torch, prefect and mlflow (1-3 s on the 2-core box). Registered first, it
    # runs after every other exit handler (Prefect's last log flush, the temporary server's stop).
    atexit.unregister(gc.freeze)  # (once, however often main() is called)
    atexit.register(gc.freeze)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.func is _cmd_worker:
        args.worker_args = rest  # e.g. --pool reflow-process --limit 2, for `prefect worker start`
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunInUse as err:  # another runner holds the run directory: say who, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    sys.exit(main())
