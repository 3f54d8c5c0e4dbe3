"""The training loop: one process or several under ``torchrun`` (docs: training).

    from medmap_fast.training import TrainConfig, train
    result = train(TrainConfig.small(data="data/", epochs=20), "runs/sls")

The run folder holds ``config.json`` (the resolved settings, accepted back by ``--config``),
``metrics.csv`` (one row per step), ``validation.csv`` (one row per validation), ``curves.png``,
``last.pt`` and ``best.pt`` (see :mod:`.checkpoint`) and, at the end, ``eval/``: the 15-subset table of
the best weights on the validation cases. Only the process of rank 0 writes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data import BraTSDataset, find_cases, iter_cases
from ..data.atomic import OutputPathError, atomic_write, atomic_write_text, check_output_dir
from ..evaluation.metrics import region_scores
from ..evaluation.pipeline import InferenceSettings, run_info, segment
from ..evaluation.subsets import SUBSETS
from ..metrics import modality_gap
from . import checkpoint as ckpt
from .config import RESUME_OVERRIDES, TrainConfig
from .frameworks import Framework, build_framework
from .losses import hard_dice
from .sampling import SeededItems, StepSampler, split_cases

STEP_COLUMNS = ("step", "epoch", "phase", "loss", "seg", "align", "kd", "feat", "adv", "dice_WT", "dice_TC",
                "dice_ET", "gap", "lr", "samples_per_s", "seconds", "skipped")
VAL_COLUMNS = ("step", "epoch", "phase", "dice_WT_all", "dice_TC_all", "dice_ET_all", "dice_all",
               "dice_WT_subsets", "dice_TC_subsets", "dice_ET_subsets", "dice_subsets", "gap", "best", "seconds")


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient (``on_nonfinite="error"``)."""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_score: float
    best_step: int
    last_validation: Dict[str, float]
    table: Optional[List[dict]]
    skipped: int
    seconds: float


# -- set-up -------------------------------------------------------------------------------------------------


def _distributed() -> tuple:
    """(rank, world size, local rank), initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        # NCCL carries the CUDA tensors (gradients); gloo the few CPU ones (the non-finite flags, the logged row)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and \
            os.environ.get("MEDMAP_FAST_DIST_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(text: str, local_rank: int) -> torch.device:
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r}: this machine has no CUDA GPU available to torch; use cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"device {text!r}: expected cpu, cuda, cuda:N or auto")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (x86: AVX-512 BF16 or AMX; arm: BF16).

    oneDNN's own check also answers yes for AVX-512 CPUs without those instructions, where it emulates
    bf16; so on Linux the CPU flags decide, and oneDNN's check only elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = set()
            for line in f:
                if line.split(":", 1)[0].strip() in ("flags", "Features"):
                    flags.update(line.split(":", 1)[1].split())
        if flags:
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype. ``auto``: bf16 where the hardware computes it natively (CUDA with bf16, CPUs
    with AVX-512 BF16 / AMX), else none: on a CPU without it, oneDNN emulates bf16 convolutions many
    times slower than fp32."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp: fp16 autocast with a gradient scaler needs a CUDA device; on the CPU use "
                         "--amp bf16 or --amp none")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _lr_factor(cfg: TrainConfig, phase_bounds: Sequence[int]) -> Callable[[int], float]:
    """Learning-rate factor of global step s: warm-up, then poly (or constant) over the step's phase."""

    def factor(step: int) -> float:
        start, end = 0, phase_bounds[-1]
        for b0, b1 in zip((0,) + tuple(phase_bounds[:-1]), phase_bounds):
            if b0 <= step < b1:
                start, end = b0, b1
                break
        s = step - start
        if cfg.warmup_steps and s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        return max(0.0, 1.0 - s / max(1, end - start)) ** 0.9

    return factor


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


#: what a run writes beside its checkpoints; a new run in a folder whose earlier run never reached its first
#: checkpoint (killed in its first epoch) starts these afresh instead of appending to them
RUN_LOGS = ("metrics.csv", "validation.csv", "curves.png")


def _prepare_run_dir(out: Path, resume: bool) -> None:
    check_output_dir(out, "--out")
    if not resume and (out / "last.pt").exists():
        raise OutputPathError(f"--out {str(out)!r} already holds a training run (last.pt); continue it with "
                              f"--resume {out}, or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in RUN_LOGS:
            (out / name).unlink(missing_ok=True)


def _truncate_csv(path: Path, columns, step: int) -> None:
    """Keep the rows of a log up to ``step`` (a resumed run rewrites what followed its checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) <= step]
    text = _csv_text(columns, rows)
    atomic_write_text(path, text)


def _csv_text(columns, rows) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


class _CsvLog:
    def __init__(self, path: Path, columns):
        self.path, self.columns = path, columns
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=list(columns), extrasaction="ignore")
        if new:
            self.writer.writeheader()

    def write(self, row: dict) -> None:
        self.writer.writerow({k: _fmt(v) for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


# -- the trainer --------------------------------------------------------------------------------------------


class Trainer:
    """One run. ``Trainer(cfg, out, resume).fit()``; see :func:`train`."""

    def __init__(self, cfg: TrainConfig, out, resume: bool = False, quiet: bool = False,
                 log: Callable[[str], None] = print, distributed: bool = True):
        self.cfg, self.out, self.quiet = cfg, Path(out), quiet
        if distributed:
            self.rank, self.world, local_rank = _distributed()
        else:
            self.rank, self.world, local_rank = 0, 1, int(os.environ.get("LOCAL_RANK", "0"))
        self._log = log
        self.device = resolve_device(cfg.device, local_rank)
        self.amp = resolve_amp(cfg.amp, self.device)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size: {cfg.batch_size} samples per step cannot be split evenly over "
                             f"{self.world} processes")
        if self.rank == 0:
            _prepare_run_dir(self.out, resume)
        self._barrier()

        cases = find_cases(cfg.data)
        self.train_cases, self.val_cases = split_cases(cases, cfg.val_cases, cfg.split_seed)
        self.dataset = BraTSDataset(self.train_cases, patch_size=cfg.patch_size, augment=cfg.augment,
                                    foreground_prob=cfg.foreground_prob, cache=cfg.cache or None, seed=cfg.seed)
        self.steps_per_epoch = cfg.iterations_per_epoch or -(-len(self.train_cases) // cfg.batch_size)

        torch.manual_seed(cfg.seed)
        self.framework: Framework = build_framework(cfg).to(self.device)
        if self.channels_last:
            self.framework.to(memory_format=torch.channels_last_3d)
        self.epoch_phases = [self.framework.phase_of_epoch(e) for e in range(self.total_epochs)]
        bounds = [self.steps_per_epoch * (i + 1) for i, p in enumerate(self.epoch_phases)
                  if i + 1 == len(self.epoch_phases) or self.epoch_phases[i + 1] != p]
        self.total_steps = self.steps_per_epoch * self.total_epochs
        self.optimizer = _optimizer(cfg, [p for p in self.framework.parameters() if p.requires_grad])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(cfg, bounds))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.step, self.skipped, self.best_score, self.best_step = 0, 0, -math.inf, -1
        self.last_validation: Dict[str, float] = {}
        if resume:
            self._restore()
        if cfg.compile:
            for module in self._compiled_units():
                module.compile()
        self.model = self.framework
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.framework, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=len(self.framework.phases) > 1)

    def _compiled_units(self) -> List[torch.nn.Module]:
        """The modules the framework calls, each compiled on its own: its networks, and the members of its
        containers (a ModuleDict of alignment modules is never called itself, so compiling it does nothing)."""
        units = []
        for module in self.framework.children():
            members = module.values() if isinstance(module, torch.nn.ModuleDict) else (
                module if isinstance(module, torch.nn.ModuleList) else [module])
            units.extend(m for m in members if any(True for _ in m.parameters()))
        return units

    @property
    def total_epochs(self) -> int:
        extra = (self.cfg.teacher_epochs or self.cfg.epochs) if self.cfg.framework == "kd" else 0
        return self.cfg.epochs + extra

    # -- logging and synchronisation

    def log(self, text: str) -> None:
        if self.rank == 0 and not self.quiet:
            self._log(text)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _all_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values

    # -- checkpoints

    def _payload(self) -> dict:
        net = self.framework.inference_model
        config = net.config()
        return {
            "config": self.cfg.to_json(),
            "model": {"name": self.framework.inference_model_name, "config": config,
                      "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}},
            "framework": self.cfg.framework,
            "framework_state": {k: v.detach().cpu() for k, v in self.framework.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
            "progress": {"step": self.step, "epoch": self.step // self.steps_per_epoch, "skipped": self.skipped,
                         "best_score": self.best_score, "best_step": self.best_step,
                         "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                         "world_size": self.world, "last_validation": self.last_validation},
        }

    def _save(self, name: str) -> None:
        if self.rank == 0:
            ckpt.save_checkpoint(self.out / name, self._payload())

    def _restore(self) -> None:
        state = ckpt.load_checkpoint(self.out / "last.pt", map_location="cpu")
        stored = TrainConfig.from_json(state["config"])
        diff = {k: (v, getattr(self.cfg, k)) for k, v in dataclasses.asdict(stored).items()
                if v != getattr(self.cfg, k) and k not in RESUME_OVERRIDES}
        if diff:
            raise ValueError(f"--resume: the settings differ from the run's own ({diff}); resume with the stored "
                             "configuration")
        self.framework.load_state_dict(state["framework_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        p = state["progress"]
        if p["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"--resume: the run had {p['steps_per_epoch']} steps per epoch, this data gives "
                             f"{self.steps_per_epoch}: the data set changed")
        self.step, self.skipped = p["step"], p["skipped"]
        self.best_score, self.best_step = p["best_score"], p["best_step"]
        self.last_validation = dict(p.get("last_validation") or {})
        if self.rank == 0:
            _truncate_csv(self.out / "metrics.csv", STEP_COLUMNS, self.step)
            _truncate_csv(self.out / "validation.csv", VAL_COLUMNS, self.step)
        self.log(f"resumed {self.out} at step {self.step} of {self.total_steps}")

    # -- one step

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True)
        if self.channels_last and t.dim() == 5:
            t = t.contiguous(memory_format=torch.channels_last_3d)
        return t

    def _train_step(self, batch) -> dict:
        image = self._to_device(batch["image"])
        mask, present = batch["mask"].to(self.device), batch["present"].to(self.device)
        label = batch["label"].to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            res = self.model(image, mask, present, label)
        loss = res.loss
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.framework.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(), (~torch.isfinite(norm)).float()]).cpu()
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss, bad_grad = bool(flags[0]), bool(flags[1])
        skipped = False
        if bad_loss or (bad_grad and not self.scaler.is_enabled()):
            what = "loss" if bad_loss else "gradient"
            if self.cfg.on_nonfinite == "error":
                raise NonFiniteError(
                    f"non-finite {what} at step {self.step + 1} (epoch {self.step // self.steps_per_epoch + 1}), "
                    f"batch of cases {list(batch['name'])}" + (f" on rank {self.rank}" if self.world > 1 else "")
                    + "; the last checkpoint is kept as it was. --on-nonfinite skip skips such batches")
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            skipped = True
        else:
            # with fp16, an overflowed gradient is the scaler's to handle: it skips the step and lowers the scale
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        row = {k: float(v) for k, v in res.parts.items()}
        row["loss"] = float(loss.detach())
        if not skipped:
            row.update(zip(("dice_WT", "dice_TC", "dice_ET"), hard_dice(res.logits.detach(), label, self.cfg.output)))
        if res.aligned is not None:
            row["gap"] = float(modality_gap(res.aligned[0].float(), res.aligned[1]).gap)
        keys = sorted(row)
        merged = self._all_mean(torch.tensor([row[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, merged.tolist()))

    # -- validation

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Dice with all modalities and the mean over the 15 subsets on the validation cases, sliding windows;
        and the modality gap of the aligned features on each case's centre crop."""
        net = self.framework.validated_model
        was_training = self.framework.training
        self.framework.eval()
        settings = inference_settings(self.cfg, self.amp, self.device)
        subsets = SUBSETS if self.cfg.val_subsets else SUBSETS[-1:]
        full, per_subset, gaps = [], [], []
        t0 = time.perf_counter()
        for case in iter_cases(self.val_cases):
            if case.label is None:
                continue
            for s in subsets:
                m = s.mask & case.present
                if not m.any() or (m != s.mask).any():
                    continue
                scores = region_scores(segment(net, case.image, m, settings), case.label)
                per_subset.append(scores)
                if s is SUBSETS[-1] or m.all():
                    full.append(scores)
            gaps.append(self._case_gap(case))
        self.framework.train(was_training)
        out = {"seconds": time.perf_counter() - t0}
        for name, rows in (("all", full), ("subsets", per_subset)):
            for r in ("WT", "TC", "ET"):
                out[f"dice_{r}_{name}"] = float(np.mean([x[f"dice_{r}"] for x in rows])) if rows else math.nan
            out[f"dice_{name}"] = float(np.mean([out[f"dice_{r}_{name}"] for r in ("WT", "TC", "ET")]))
        finite = [g for g in gaps if g is not None and math.isfinite(g)]
        out["gap"] = float(np.mean(finite)) if finite else math.nan
        return out

    def _case_gap(self, case) -> Optional[float]:
        """Modality gap of the aligned features of a centre crop (all the case's modalities)."""
        x, present = case_crop(case, self.cfg.patch_size, self.device, exact=True)
        if x is None:
            return None
        x = self._to_device(x)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            feats = self.framework.aligned_features(x, present)
        return float(modality_gap(feats.float(), present).gap)

    # -- outputs

    def _write_config(self) -> None:
        info = run_info()
        payload = {"train": self.cfg.to_json(),
                   "resolved": {"device": str(self.device), "amp": str(self.amp).replace("torch.", "") if self.amp
                                else "none", "channels_last": self.channels_last, "world_size": self.world,
                                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                                "train_cases": [c.name for c in self.train_cases],
                                "val_cases": [c.name for c in self.val_cases]},
                   **info}
        atomic_write_text(self.out / "config.json", json.dumps(payload, indent=2) + "\n")

    def write_curves(self) -> None:
        from .plots import write_curves

        write_curves(self.out / "metrics.csv", self.out / "validation.csv", self.out / "curves.png",
                     title=f"{self.cfg.framework.upper()} anchor={self.cfg.anchor}")

    # -- the loop

    def fit(self) -> TrainResult:
        t_start = time.perf_counter()
        if self.rank == 0:
            self._write_config()
        sampler = StepSampler(len(self.dataset), self.cfg.seed, self.steps_per_epoch, self.total_epochs,
                              self.cfg.batch_size, self.rank, self.world, start_step=self.step)
        items = SeededItems(self.dataset, self.cfg.seed, self.cfg.full_modality_prob)
        loader = DataLoader(items, batch_size=self.cfg.batch_size // self.world, sampler=sampler,
                            num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        metrics = _CsvLog(self.out / "metrics.csv", STEP_COLUMNS) if self.rank == 0 else None
        validation = _CsvLog(self.out / "validation.csv", VAL_COLUMNS) if self.rank == 0 else None
        bar = None
        if self.rank == 0 and not self.quiet and self.step < self.total_steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        self.framework.train()
        try:
            t_last = time.perf_counter()
            for batch in loader:
                epoch = self.step // self.steps_per_epoch
                self.framework.phase = self.epoch_phases[epoch]
                lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step (the scheduler moves it on)
                row = self._train_step(batch)
                self.step += 1
                now = time.perf_counter()
                row.update(step=self.step, epoch=epoch + 1, phase=self.framework.phase, lr=lr, seconds=now - t_last,
                           samples_per_s=self.cfg.batch_size / max(now - t_last, 1e-9), skipped=self.skipped)
                t_last = now
                if metrics is not None:
                    metrics.write(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", dice_WT=f"{row.get('dice_WT', math.nan):.2f}",
                                    samples_s=f"{row['samples_per_s']:.2f}", refresh=False)
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if end_of_epoch:
                    self._end_of_epoch(epoch, validation)
                    t_last = time.perf_counter()
                elif self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self._save("last.pt")
                    self._barrier()
        finally:
            if bar is not None:
                bar.close()
            for log in (metrics, validation):
                if log is not None:
                    log.close()
        table = None
        if self.rank == 0:
            self.write_curves()
            if self.cfg.final_eval:
                table = self.final_table()
        self._barrier()
        return TrainResult(self.out, self.step, self.best_score, self.best_step, self.last_validation, table,
                           self.skipped, time.perf_counter() - t_start)

    def _end_of_epoch(self, epoch: int, validation: Optional[_CsvLog]) -> None:
        last_epoch = epoch + 1 == self.total_epochs
        phase_ends = last_epoch or self.epoch_phases[epoch + 1] != self.epoch_phases[epoch]
        due = self.cfg.val_every and (epoch + 1) % self.cfg.val_every == 0
        # the best checkpoint is chosen among the inference network's own validations (the student's, for kd)
        scored_phase = self.epoch_phases[-1]
        if self.rank == 0 and (due or phase_ends):
            val = self.validate()
            self.last_validation = val
            score = val["dice_subsets"] if self.cfg.val_subsets else val["dice_all"]
            better = self.epoch_phases[epoch] == scored_phase and score > self.best_score
            if better:
                self.best_score, self.best_step = score, self.step
            validation.write(dict(val, step=self.step, epoch=epoch + 1, phase=self.epoch_phases[epoch],
                                  best=int(better)))
            self.log(f"epoch {epoch + 1}/{self.total_epochs} ({self.epoch_phases[epoch]}): Dice all modalities "
                     f"{val['dice_all']:.3f} (WT {val['dice_WT_all']:.3f}), mean over subsets "
                     f"{val['dice_subsets']:.3f}, modality gap {val['gap']:.3g}" + (" *best*" if better else ""))
            self._save("last.pt")
            if better:
                self._save("best.pt")
            self.write_curves()
        else:
            self._save("last.pt")
        self._barrier()

    def final_table(self) -> Optional[List[dict]]:
        from ..evaluation.evaluate import evaluate_model

        source = self.out / ("best.pt" if (self.out / "best.pt").exists() else "last.pt")
        model = ckpt.model_from_checkpoint(source, self.device)
        settings = inference_settings(self.cfg, self.amp, self.device)
        log = (lambda s: None) if self.quiet else self._log
        return evaluate_model(model, self.val_cases, self.out / "eval", settings,
                              config={"checkpoint": str(source)}, log=log)


def inference_settings(cfg: TrainConfig, amp: Optional[torch.dtype], device: torch.device) -> InferenceSettings:
    """Sliding-window settings of validation and of the final table: the validation window (default: the
    patch) and overlap, the run's autocast dtype."""
    window = cfg.val_window or cfg.patch_size
    return InferenceSettings(window=tuple(window), overlap=cfg.val_overlap, batch_size=2,
                             amp={None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp],
                             device=str(device), output=cfg.output)


def case_crop(case, size: Sequence[int], device: torch.device, exact: bool = False, multiple: int = 1):
    """(image (1, 4, *crop) with absent modalities zeroed, present (1, 4) bool) of a centre crop of ``case``:
    ``size`` where the case is that large; elsewhere (unless ``exact``, which gives (None, None)) the largest
    multiple of ``multiple`` that fits."""
    crop = []
    for extent, p in zip(case.image.shape[1:], size):
        if extent < p:
            if exact:
                return None, None
            p = extent // multiple * multiple
            if p < 1:
                return None, None
        start = (extent - p) // 2
        crop.append(slice(start, start + p))
    img = torch.from_numpy(np.ascontiguousarray(case.image[(slice(None), *crop)]))[None]
    present = torch.from_numpy(np.asarray(case.present, dtype=bool))[None]
    img = img * present.to(img.dtype)[:, :, None, None, None]
    return img.to(device), present.to(device)


def train(cfg: TrainConfig, out, resume: bool = False, quiet: bool = False,
          log: Callable[[str], None] = print, distributed: bool = True) -> TrainResult:
    """Train ``cfg`` into the run folder ``out`` (or continue it exactly where it stopped: ``resume``).
    Under torchrun the processes train the run together (DDP), unless ``distributed`` is False: then this
    process trains it alone, on the device of its local rank."""
    return Trainer(cfg, out, resume=resume, quiet=quiet, log=log, distributed=distributed).fit()
