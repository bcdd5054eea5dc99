"""One training stage from a config file and a run directory; the entry point torchrun starts on every rank.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m reflow_core.stage_main \\
        --stage teacher --config run/config.json --run-dir file:///runs/toy

(`distributed.launch_torchrun` builds this command.) It calls the same pipeline function a one-process run calls;
inside torchrun the pipeline does not launch again, and `train.train` runs DDP.
"""
from __future__ import annotations

import argparse
import json

import torch

from . import storage
from .config import PipelineConfig


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m reflow_core.stage_main", description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, choices=["teacher", "reflow"])
    ap.add_argument("--config", required=True, help="PipelineConfig JSON (path or fsspec URL)")
    ap.add_argument("--run-dir", required=True, help="<root>/<run>")
    ap.add_argument("--teacher", default=None, help="teacher checkpoint (reflow stage)")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    from . import distributed, pipeline

    cfg = PipelineConfig.model_validate(json.loads(storage.read_bytes(a.config)))
    root, run = a.run_dir.rstrip("/").rsplit("/", 1)
    paths = pipeline.RunPaths.of(root, run)
    # a seeded init: every launch of the same config starts from the same weights (DDP then broadcasts rank 0's)
    torch.manual_seed((cfg.teacher.train if a.stage == "teacher" else cfg.reflow.train).seed)
    try:
        if a.stage == "teacher":
            url = pipeline.train_teacher(cfg, paths, device=a.device)
        else:
            teacher = a.teacher or pipeline.model_checkpoint(paths, "teacher")
            url = pipeline.reflow_finetune(cfg, paths, teacher, device=a.device)
    finally:
        distributed.cleanup()
    if distributed.env_info().is_main:
        print(f"checkpoint: {url}", flush=True)
    return url


if __name__ == "__main__":
    main()
