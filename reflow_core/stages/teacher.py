"""Stage `teacher`: a 1-rectified flow on real data (independent coupling of fresh N(0, I) noise and data).

reads:  nothing (or the given `teacher.checkpoint`, or a pretrained diffusion model: teacher.source=diffusers)
writes: <run>/teacher/ckpt-<step>.pt + latest.json, and guide.pt (AutoGuidance's weaker model: the EMA at 1/4 of
        training)
output: {"model": checkpoint URL, "guide": guide.pt URL when there is one}
"""
from __future__ import annotations

from .. import checkpoint, distributed, storage
from ..callbacks import OfTotal
from ..paths import CONVENTION
from ..train import train
from ..velocity import VelocityModel
from .base import Context, Stage, StageOutput, dataset, default_device, model_meta, new_model
from .batches import sr_batches, teacher_batches

GUIDE_FILE = "guide.pt"


def done(stage: Stage, ctx: Context) -> bool:
    if ctx.cfg.teacher.checkpoint:
        return True
    return checkpoint.reached(stage.writes, 0 if ctx.cfg.teacher.source == "diffusers" else ctx.cfg.teacher.train.steps)


def run(stage: Stage, ctx: Context, inputs: dict[str, StageOutput]) -> StageOutput:
    cfg, tc = ctx.cfg, ctx.cfg.teacher.train
    if cfg.teacher.checkpoint:
        checkpoint.load(cfg.teacher.checkpoint)  # fail now, clearly, if it is unusable
        return StageOutput({"model": cfg.teacher.checkpoint})
    if cfg.teacher.source == "diffusers":
        return output(stage, checkpoint.latest(stage.writes) or import_pretrained(stage, ctx))
    if tc.nproc > 1 and not distributed.under_torchrun():  # DDP: torchrun runs this stage on every rank
        url = distributed.launch_torchrun(tc.nproc, stage.name, cfg.model_dump_json(), ctx.rundir.dir, stage.writes)
        return output(stage, url)
    ds = dataset(cfg)
    model = new_model(cfg, ds, tc.seed)
    sr = cfg.data.sr
    batches = teacher_batches(ds, model, tc, cfg.net.class_cond) if sr is None else sr_batches(ds, tc, sr)

    def train_to(steps: int) -> str:
        return train(net=model, batches=batches, cfg=tc.model_copy(update={"steps": steps}), ckpt_dir=stage.writes,
                     stage=stage.name, meta=model_meta(cfg, ds), callback=OfTotal(ctx.callback, tc.steps),
                     device=default_device(ctx.device))

    _guide_snapshot(stage, tc.steps, train_to)
    return output(stage, train_to(tc.steps))


def import_pretrained(stage: Stage, ctx: Context) -> str:
    """A pretrained diffusion model as this run's teacher: adapted to a velocity in our convention
    (`reflow_core.teachers`) and written once as an ordinary checkpoint (step 0) whose meta rebuilds it offline, so
    the pairs are tied to its hash and the reflow stage fine-tunes it (2-Rectified Flow++ starts from EDM's weights)."""
    from .. import teachers

    cfg, ds = ctx.cfg, dataset(ctx.cfg)
    adapter = teachers.from_diffusers(cfg.teacher.path, prediction_type=cfg.teacher.prediction_type)
    num_classes = ds.num_classes if cfg.net.class_cond else 0  # net.class_cond: the pretrained model takes labels
    state = VelocityModel(adapter, num_classes).state_dict()
    meta = {"net": adapter.config(), "shape": list(ds.shape), "num_classes": num_classes,
            "convention": CONVENTION, "source": cfg.teacher.path, "weights_hash": teachers.weights_hash(adapter)}
    return checkpoint.save(stage.writes, {"net": state, "ema": state, "step": 0, "meta": meta})


def output(stage: Stage, url: str) -> StageOutput:
    guide = storage.join(stage.writes, GUIDE_FILE)
    have = storage.exists(guide + checkpoint.SIDECAR_SUFFIX)
    return StageOutput({"model": url} | ({"guide": guide} if have else {}))


def _guide_snapshot(stage: Stage, steps: int, train_to) -> None:
    """AutoGuidance's weaker model: keep the teacher's EMA at 1/4 of training as teacher/guide.pt.

    Trains to step steps // 4 first (train() resumes, so the full run continues from there with the same optimizer,
    EMA, RNG and batches as an uninterrupted one), then keeps that checkpoint's EMA. Skipped when the snapshot
    exists or the teacher is already past that step (then give eval.guide_checkpoint explicitly)."""
    guide_url, guide_step = storage.join(stage.writes, GUIDE_FILE), max(1, steps // 4)
    if guide_step >= steps or storage.exists(guide_url + checkpoint.SIDECAR_SUFFIX):  # written after guide.pt
        return
    info = checkpoint.latest_info(stage.writes)
    if info is not None and info.step > guide_step:
        return
    state = checkpoint.load(train_to(guide_step))
    checkpoint.save_file(guide_url, {"ema": state["ema"], "net": state["ema"], "step": state["step"],
                                     "meta": state["meta"], "train_config": state["train_config"]})
