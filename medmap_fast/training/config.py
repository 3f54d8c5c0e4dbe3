"""The resolved configuration of a training run: one dataclass, saved as ``config.json`` in the run
folder and in every checkpoint, accepted back with ``--config``; the ``train`` options are made from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

FRAMEWORKS = ("sls", "kd", "da")
ANCHORS = ("none", "normal", "fixed", "learned", "mixture")
ALIGN_LOSSES = ("auto", "kl", "mixture_kl", "moments")
FUSIONS = ("mean", "weighted", "zero_concat", "anchor_impute")
OUTPUTS = ("regions", "classes")
AMPS = ("auto", "none", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("poly", "constant")
ON_NONFINITE = ("error", "skip")


#: settings that ``--resume`` may change: neither alters what the run computes (batches are drawn per item,
#: whatever the number of workers), and a run stopped by a non-finite batch can go on past it with skip
RESUME_OVERRIDES = ("on_nonfinite", "num_workers")


def _field(default, help: str, choices=None, **kw):
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, **kw))


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are for 128^3 BraTS crops on a GPU; ``small`` ones for a CPU."""

    # data
    data: str = _field("", "data root of BraTS-style case folders (searched recursively)")
    val_cases: float = _field(0.2, "held-out validation cases: a count (>= 1) or a fraction of the cases (< 1)")
    split_seed: int = _field(0, "seed of the train/validation split (kept apart from --seed so that seeds "
                                "of one ablation share their split)")
    patch_size: Tuple[int, int, int] = _field((128, 128, 128), "training patch in voxels", nargs=3)
    foreground_prob: float = _field(0.33, "probability that a patch is centred on a tumour voxel")
    augment: bool = _field(True, "random flips and intensity jitter")
    cache: bool = _field(True, "keep decompressed, normalised cases as .npy in the cache folder")
    num_workers: int = _field(2, "data-loader worker processes (0: load in the training process)")
    # model
    framework: str = _field("sls", "sls: per-modality encoders and fusion (SLSNet); kd: teacher UNet3D on all "
                                   "modalities, then a student on missing ones; da: full- and missing-modality "
                                   "UNet3D branches with a domain discriminator", FRAMEWORKS)
    base_channels: int = _field(32, "channels of the first level (doubled per level up to --max-channels)")
    depth: int = _field(5, "levels of the U-Net (the bottleneck is the last)")
    max_channels: int = _field(320, "channel cap")
    fusion: str = _field("mean", "SLSNet fusion of the modality features at each level", FUSIONS)
    output: str = _field("regions", "regions: sigmoid WT, TC, ET; classes: softmax over labels 0, 1, 2, 4", OUTPUTS)
    deep_supervision: bool = _field(True, "losses on every decoder level, weights 2^-level (normalised)")
    fused: bool = _field(True, "fused medmap_fast ops and blocks (False: plain torch.nn and the reference ops)")
    # alignment (MedMAP)
    anchor: str = _field("learned", "the distribution anchor; none trains without alignment", ANCHORS)
    align_loss: str = _field("auto", "kl for P_mix/normal anchors, mixture_kl for the mixture (auto)", ALIGN_LOSSES)
    align_weight: float = _field(0.1, "lambda, the weight of the alignment loss")
    align_levels: Optional[Tuple[int, ...]] = _field(None, "encoder levels aligned (default: the bottleneck)",
                                                    nargs="+")
    num_components: int = _field(4, "J, components of the mixture anchor")
    # knowledge distillation
    teacher_epochs: int = _field(0, "kd: epochs of the teacher before the student's (0: as many as --epochs)")
    kd_temperature: float = _field(3.0, "kd: temperature T of the logit distillation")
    kd_alpha: float = _field(1.0, "kd: weight of the logit distillation (times T^2)")
    kd_beta: float = _field(1.0, "kd: weight of the feature distillation at the aligned level (the bottleneck "
                                 "by default)")
    # domain adaptation
    adv_weight: float = _field(0.1, "da: gamma, weight of the discriminator loss (through gradient reversal)")
    # optimisation
    epochs: int = _field(100, "epochs (of the student, for kd)")
    iterations_per_epoch: int = _field(0, "optimiser steps per epoch (0: one pass over the training cases)")
    batch_size: int = _field(2, "samples per step, over all processes")
    optimizer: str = _field("adamw", "adamw, or sgd with Nesterov momentum 0.99 (nnU-Net's)", OPTIMIZERS)
    lr: float = _field(1e-3, "peak learning rate")
    weight_decay: float = _field(3e-5, "weight decay")
    schedule: str = _field("poly", "poly: lr * (1 - step/steps)^0.9; constant", SCHEDULES)
    warmup_steps: int = _field(0, "linear warm-up steps")
    grad_clip: float = _field(12.0, "clip the gradient norm (0: off)")
    full_modality_prob: float = _field(0.0, "probability that a sample keeps all its modalities; otherwise its "
                                            "mask is drawn uniformly from the 15 non-empty subsets")
    amp: str = _field("auto", "autocast: bf16, fp16 (CUDA, with a gradient scaler), none; auto: bf16 on CUDA and "
                              "on CPUs with native bf16, else none", AMPS)
    compile: bool = _field(False, "torch.compile the networks")
    channels_last: Optional[bool] = _field(None, "channels_last_3d tensors (default: on CUDA, not on the CPU)")
    seed: int = _field(0, "seed of the weights, the batches and the augmentation")
    device: str = _field("auto", "cpu, cuda, cuda:N or auto")
    on_nonfinite: str = _field("error", "a non-finite loss or gradient: stop with an error, or skip the batch",
                               ON_NONFINITE)
    # validation, checkpoints
    val_every: int = _field(1, "validate every N epochs (0: only at the end)")
    val_subsets: bool = _field(True, "validate on all 15 modality subsets (else all modalities only); the best "
                                     "checkpoint is chosen on the mean over the subsets validated")
    val_window: Optional[Tuple[int, int, int]] = _field(None, "sliding window of validation (default: the patch)",
                                                        nargs=3)
    val_overlap: float = _field(0.5, "sliding-window overlap of validation")
    checkpoint_every: int = _field(0, "also write last.pt every N steps (0: at the end of every epoch only)")
    final_eval: bool = _field(True, "at the end, the 15-subset table of the best weights on the validation cases")

    @classmethod
    def small(cls, **overrides) -> "TrainConfig":
        """A configuration that trains in minutes on a CPU (48^3 patches, 8 base channels, 4 levels)."""
        base = dict(patch_size=(48, 48, 48), base_channels=8, depth=4, max_channels=64, batch_size=2, lr=3e-3)
        return cls(**{**base, **overrides})

    def __post_init__(self):
        self.patch_size = tuple(int(v) for v in self.patch_size)
        if self.val_window is not None:
            self.val_window = tuple(int(v) for v in self.val_window)
        if self.align_levels is not None:
            self.align_levels = tuple(int(v) for v in self.align_levels)
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name}: expected one of {', '.join(choices)}, got {value!r}")
        positive = ("base_channels", "depth", "max_channels", "epochs", "batch_size", "num_components")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("num_workers", "iterations_per_epoch", "teacher_epochs", "warmup_steps", "val_every",
                     "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size: expected 3 positive ints, got {self.patch_size}")
        step = 2 ** (self.depth - 1)
        for name in ("patch_size", "val_window"):
            size = getattr(self, name)
            if size is not None and any(s % step for s in size):
                raise ValueError(f"{name}: every size must be a multiple of 2^(depth-1) = {step} for depth "
                                 f"{self.depth}, got {size}")
        if not self.val_cases > 0:
            raise ValueError(f"val_cases: expected a count >= 1 or a fraction in (0, 1), got {self.val_cases}")
        if self.val_cases >= 1 and self.val_cases != int(self.val_cases):
            raise ValueError(f"val_cases: a count must be a whole number, got {self.val_cases}")
        for name in ("foreground_prob", "full_modality_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.val_overlap < 1.0:
            raise ValueError(f"val_overlap: expected a number in [0, 1), got {self.val_overlap}")
        for name in ("lr", "kd_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "align_weight", "kd_alpha", "kd_beta", "adv_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        levels = self.aligned_levels()
        if any(not 0 <= lv < self.depth for lv in levels):
            raise ValueError(f"align_levels: expected levels in [0, {self.depth - 1}] for depth {self.depth}, "
                             f"got {self.align_levels}")
        if self.framework != "sls" and len(levels) != 1:
            raise ValueError(f"align_levels: the {self.framework} framework aligns one encoder level, got {levels}")
        if self.anchor != "none":
            self.resolved_align_loss()  # raises for an anchor/loss pair that does not exist

    def aligned_levels(self) -> Tuple[int, ...]:
        return self.align_levels if self.align_levels is not None else (self.depth - 1,)

    def resolved_align_loss(self) -> str:
        if self.align_loss == "auto":
            return "mixture_kl" if self.anchor == "mixture" else "kl"
        valid = {"normal": ("kl", "mixture_kl", "moments"), "fixed": ("kl", "moments"),
                 "learned": ("kl", "moments"), "mixture": ("mixture_kl", "moments")}
        if self.anchor in valid and self.align_loss not in valid[self.anchor]:
            raise ValueError(f"align_loss: anchor {self.anchor!r} takes {', '.join(valid[self.anchor])}, "
                             f"got {self.align_loss!r}")
        return self.align_loss

    @property
    def num_classes(self) -> int:
        return 3 if self.output == "regions" else 4

    def to_json(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    @classmethod
    def from_json(cls, obj: Dict[str, Any], source: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"{source}: unknown settings {unknown}; known: {sorted(names)}")
        return cls(**obj)


def load_config(path) -> TrainConfig:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--config {str(path)!r}: cannot read it as JSON ({e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("train"), dict):
        obj = obj["train"]  # a run folder's config.json holds the settings under "train"
    if not isinstance(obj, dict):
        raise ValueError(f"--config {str(path)!r}: expected a JSON object of settings")
    return TrainConfig.from_json(obj, f"--config {str(path)!r}")


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser, exclude: Tuple[str, ...] = ()) -> None:
    """One option per setting (``--patch-size 64 64 64``, ``--fused false``) but ``exclude``; all default to
    None so that only the options given override the defaults or the ``--config`` file."""
    defaults = TrainConfig.__dataclass_fields__
    for f in dataclasses.fields(TrainConfig):
        if f.name == "data" or f.name in exclude:
            continue
        meta = f.metadata
        default = defaults[f.name].default
        kind = type(default) if default is not None else None
        # a help text that names its own default (None stands for a computed one) is not given a second
        shown = "" if "(default" in meta["help"] else f" (default: {_shown(default)})"
        kw: Dict[str, Any] = dict(default=None, help=meta["help"] + shown)
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if "nargs" in meta:
            kw.update(nargs=meta["nargs"], type=int, metavar="N")
        elif kind is bool or f.name == "channels_last":
            kw.update(type=_bool, metavar="BOOL")
        elif kind in (int, float):
            kw["type"] = kind
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def config_from_args(args: argparse.Namespace, base: Optional[TrainConfig] = None) -> TrainConfig:
    values = (base or TrainConfig()).to_json()
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return TrainConfig.from_json(values)


def given_settings(args: argparse.Namespace) -> Dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name != "data" and getattr(args, f.name, None) is not None}
