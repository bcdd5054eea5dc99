"""One training stage instance of a run's plan; the entry point torchrun starts on every rank.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m reflow_core.stage_main \\
        --stage reflow-2 --config run/config.json --run-dir file:///runs/toy

(`distributed.launch_torchrun` builds this command.) It runs the same stage module a one-process run runs, with the
outputs of the stages it reads taken from the run directory (they must be finished); inside torchrun the stage does
not launch again, and `train.train` runs DDP.
"""
from __future__ import annotations

import argparse
import json

from . import distributed, stages, storage
from .config import PipelineConfig


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m reflow_core.stage_main", description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, help="a training stage of the plan: teacher, reflow, reflow-2, ...")
    ap.add_argument("--config", required=True, help="PipelineConfig JSON (path or fsspec URL)")
    ap.add_argument("--run-dir", required=True, help="<root>/<run>")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)

    cfg = PipelineConfig.model_validate(json.loads(storage.read_bytes(a.config)))
    root, run = a.run_dir.rstrip("/").rsplit("/", 1)
    ctx = stages.Context(cfg, stages.RunDir.of(root, run), device=a.device)
    if stages.find(stages.plan(cfg, ctx.rundir), a.stage).kind not in ("teacher", "reflow"):
        raise SystemExit(f"stage_main runs training stages (teacher, reflow-r), not {a.stage!r}")
    try:  # the stages it reads must have finished (`schedule`); they are only asked for their outputs
        outputs = stages.walk(ctx, stages.schedule(ctx, [a.stage]), lambda step: step.run(ctx))
    finally:
        distributed.cleanup()
    url = outputs[a.stage].urls["model"]
    if distributed.env_info().is_main:
        print(f"checkpoint: {url}", flush=True)
    return url


if __name__ == "__main__":
    main()
