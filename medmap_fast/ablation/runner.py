"""Train, score and measure every arm of an ablation; resume what was interrupted (docs: ablation).

Each arm is an ordinary training run in ``OUT/runs/<anchor>-seed<k>`` (see ``medmap-fast train``), plus:

* ``heldout/``: the 15-subset evaluation of its final (or best) weights on the held-out cases, with
  ``cases.csv`` per case and subset (the outputs of ``medmap-fast evaluate``);
* ``ablation/features.npz``: per held-out case, the modality gap of the aligned features and each
  modality's channel means (what the feature picture is drawn from);
* ``ablation/arm.json``: written last; an arm that has it is finished and is skipped by a re-run.

An arm with a ``last.pt`` but no ``arm.json`` was interrupted and is resumed exactly. Under torchrun,
process r takes arms r, r + n, r + 2n, ... and trains each alone on the device of its local rank; the
process that finishes the last arm writes the report.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..data import find_cases, iter_cases
from ..data.atomic import atomic_write, atomic_write_text, check_output_dir
from ..metrics import modality_gap
from ..training import checkpoint as ckpt
from ..training.config import TrainConfig, load_config
from ..training.frameworks import build_framework, level_channels
from ..training.sampling import split_cases
from ..training.trainer import case_crop, inference_settings, resolve_amp, resolve_device, train
from .plan import PLAN_FILE, Arm, Plan, check_and_save_plan, run_dir

HELDOUT = "heldout"
ARM_DIR = "ablation"
ARM_DONE = "arm.json"
FEATURES = "features.npz"


def heldout_cases(plan: Plan) -> List[Path]:
    """The cases every arm is scored on: ``test_data``, or the validation split shared by all arms."""
    if plan.test_data:
        cases = find_cases(plan.test_data)
        if not cases:
            raise ValueError(f"--test-data {plan.test_data!r}: no cases found")
        return cases
    return split_cases(find_cases(plan.base.data), plan.base.val_cases, plan.base.split_seed)[1]


def arm_done(out: Path, arm: Arm) -> bool:
    return (run_dir(out, arm) / ARM_DIR / ARM_DONE).exists()


def _train_arm(plan: Plan, arm: Arm, out: Path, quiet: bool, log: Callable[[str], None]) -> float:
    cfg = plan.arm_config(arm)
    folder = run_dir(out, arm)
    resume = (folder / "last.pt").exists()
    if resume:
        stored = load_config(folder / "config.json")
        diff = {k: v for k, v in cfg.to_json().items() if k != "num_workers" and stored.to_json().get(k) != v}
        if diff:
            raise ValueError(f"{folder}: its run has other settings than the ablation's ({sorted(diff)}); remove the "
                             "folder to train the arm afresh")
    log(f"arm {arm.name}: " + ("resuming the interrupted run" if resume else "training") + f" in {folder}")
    t0 = time.perf_counter()
    train(cfg, folder, resume=resume, quiet=quiet, log=log, distributed=False)
    return time.perf_counter() - t0


@torch.no_grad()
def _measure_features(framework, cfg: TrainConfig, cases: List[Path], device, amp) -> Dict[str, np.ndarray]:
    """Per case: the modality gap of the aligned features of a centre crop with all its modalities, and the
    channel means of each modality's features there."""
    names, present, means, gaps = [], [], [], []
    multiple = 2 ** (cfg.depth - 1)
    for case in iter_cases(cases):
        x, p = case_crop(case, cfg.patch_size, device, multiple=multiple)
        if x is None:
            continue
        if cfg.channels_last if cfg.channels_last is not None else device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            feats = framework.aligned_features(x, p).float()  # (1, M, C, d, h, w)
        gap = modality_gap(feats, p).gap
        names.append(case.name)
        present.append(p[0].cpu().numpy())
        means.append(feats[0].mean(dim=(2, 3, 4)).cpu().numpy())
        gaps.append(float(gap))
    channels = level_channels(cfg, cfg.aligned_levels()[0])
    return {"case": np.array(names, dtype=str), "present": np.array(present, dtype=bool).reshape(-1, 4),
            "channel_means": np.stack(means) if means else np.zeros((0, 4, channels), np.float32),
            "gap": np.array(gaps, dtype=np.float64)}


def _score_arm(plan: Plan, arm: Arm, out: Path, cases: List[Path], quiet: bool,
               log: Callable[[str], None]) -> Dict:
    from ..evaluation.evaluate import evaluate_model

    folder = run_dir(out, arm)
    source = folder / ("best.pt" if plan.weights == "best" and (folder / "best.pt").exists() else "last.pt")
    state = ckpt.load_checkpoint(source, map_location="cpu")
    cfg = TrainConfig.from_json(state["config"])
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    amp = resolve_amp(cfg.amp, device)
    framework = build_framework(cfg)
    framework.load_state_dict(state["framework_state"])
    framework.to(device).eval()
    t0 = time.perf_counter()
    evaluate_model(framework.inference_model, cases, folder / HELDOUT, inference_settings(cfg, amp, device),
                   config={"checkpoint": str(source), "ablation_arm": arm.name},
                   log=(lambda s: None) if quiet else log)
    features = _measure_features(framework, cfg, cases, device, amp)
    arm_folder = folder / ARM_DIR
    arm_folder.mkdir(exist_ok=True)
    atomic_write(arm_folder / FEATURES, lambda tmp: np.savez(tmp, **features), suffix=".npz")
    finite = features["gap"][np.isfinite(features["gap"])]
    return {"arm": arm.name, "anchor": arm.anchor, "seed": arm.seed, "weights": source.name,
            "step": int(state["progress"]["step"]), "gap": float(finite.mean()) if finite.size else math.nan,
            "cases": len(cases), "score_seconds": round(time.perf_counter() - t0, 2)}


def run_arm(plan: Plan, arm: Arm, out: Path, cases: List[Path], quiet: bool = False,
            log: Callable[[str], None] = print) -> Dict:
    """Train (or resume) one arm, score it on ``cases`` and mark it finished; a finished arm is only read."""
    done = run_dir(out, arm) / ARM_DIR / ARM_DONE
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    seconds = _train_arm(plan, arm, out, quiet, log)
    summary = _score_arm(plan, arm, out, cases, quiet, log)
    summary["train_seconds"] = round(seconds, 1)
    atomic_write_text(done, json.dumps(summary, indent=2) + "\n")
    log(f"arm {arm.name}: done, modality gap on the held-out cases {summary['gap']:.4g}")
    return summary


def run_ablation(plan: Plan, out, quiet: bool = False, log: Callable[[str], None] = print) -> Optional[Dict]:
    """Run every arm of ``plan`` not yet finished (this process's share of them under torchrun), then write the
    report if every arm is finished. Returns the report's summary, or None while arms of other processes run."""
    from .report import write_report

    out = Path(out)
    check_output_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        check_and_save_plan(out, plan)
    else:  # rank 0 checks and writes the plan first; the others check it too, so that none trains a stray arm
        for _ in range(600):
            if (out / PLAN_FILE).exists():
                break
            time.sleep(0.1)
        check_and_save_plan(out, plan, write=False)
    cases = heldout_cases(plan)
    mine = [a for i, a in enumerate(plan.arms) if i % world == rank]
    todo = [a for a in mine if not arm_done(out, a)]
    log(f"ablation in {out}: {len(plan.arms)} arms ({', '.join(plan.anchors)} x seeds "
        f"{', '.join(map(str, plan.seeds))}), {len(cases)} held-out cases"
        + (f"; this process (rank {rank} of {world}) takes {len(mine)}" if world > 1 else "")
        + f"; {len(mine) - len(todo)} already finished")
    for arm in todo:
        run_arm(plan, arm, out, cases, quiet=quiet, log=log)
    waiting = [a.name for a in plan.arms if not arm_done(out, a)]
    if waiting:
        log(f"arms still running in other processes: {', '.join(waiting)}; the one that finishes last writes "
            "the report")
        return None
    return write_report(plan, out, cases, log=log)
