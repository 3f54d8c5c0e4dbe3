"""The three framework families the MedMAP alignment is evaluated on (docs: training).

Each framework is one ``nn.Module`` whose ``forward(batch)`` returns the loss of a training step, so
that one DistributedDataParallel wrapper covers every network it trains:

* ``sls``: :class:`~medmap_fast.models.SLSNet` (per-modality encoders, masked fusion at every level,
  one decoder); the alignment pulls the present modalities' encoder features to the anchor.
* ``kd``: a full-modality teacher :class:`~medmap_fast.models.UNet3D` trained first with the alignment
  on its modality-specific features (the encoder run on each modality alone, as one batch of B*M
  inputs); then a student UNet3D on missing-modality inputs, with logit distillation (KL at
  temperature T, times T^2) and feature distillation to the frozen teacher's bottleneck.
* ``da``: a full-modality and a missing-modality UNet3D trained together; a small discriminator tells
  their bottleneck features apart, and the missing branch learns to fool it through gradient
  reversal; the alignment acts on the full branch's modality-specific features, as in ``kd``.

The network that ``predict`` and ``evaluate`` run (``inference_model``) is the SLSNet, the student and
the missing-modality branch respectively.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import SLSNet, UNet3D
from ..nn import MedMAPAlign
from . import losses
from .config import TrainConfig

M = 4  # modalities


class StepResult(NamedTuple):
    loss: Tensor  # the scalar to minimise
    parts: Dict[str, Tensor]  # its named terms, detached
    logits: Tensor  # full-resolution logits of the network being trained
    aligned: Optional[Tuple[Tensor, Tensor]]  # (features (B, M, C, ...), mask) whose modality gap is logged


def level_channels(cfg: TrainConfig, level: int) -> int:
    return min(cfg.base_channels * 2 ** level, cfg.max_channels)


def _unet(cfg: TrainConfig) -> UNet3D:
    return UNet3D(in_channels=M, num_classes=cfg.num_classes, base_channels=cfg.base_channels, depth=cfg.depth,
                  max_channels=cfg.max_channels, deep_supervision=cfg.deep_supervision, fused=cfg.fused)


def _align(cfg: TrainConfig, level: int) -> Optional[MedMAPAlign]:
    if cfg.anchor == "none":
        return None
    return MedMAPAlign(M, level_channels(cfg, level), anchor=cfg.anchor, loss=cfg.resolved_align_loss(),
                       weight=cfg.align_weight, num_components=cfg.num_components,
                       backend=None if cfg.fused else "reference")


def _masked(image: Tensor, mask: Tensor) -> Tensor:
    return image * mask.to(image.dtype)[:, :, None, None, None]


def _seg(logits, label, output) -> Tensor:
    return losses.deep_supervision_loss(logits, label, output).mean()


def modality_specific(net: UNet3D, image: Tensor, level: int) -> Tensor:
    """Encoder features of every modality fed alone (the other channels zero) at ``level``, as one batched
    pass of B*M inputs: (B, M, C, d, h, w)."""
    B = image.shape[0]
    eye = torch.eye(M, dtype=image.dtype, device=image.device)
    single = image.unsqueeze(1) * eye[None, :, :, None, None, None]  # (B, M, M, D, H, W)
    single = single.flatten(0, 1)
    if image.is_contiguous(memory_format=torch.channels_last_3d):
        single = single.contiguous(memory_format=torch.channels_last_3d)
    feats = net.encode(single)[level]
    return feats.unflatten(0, (B, M))


def _align_full_branch(align: Optional[MedMAPAlign], net: UNet3D, full: Tensor, present: Tensor, level: int,
                       loss: Tensor, parts: Dict[str, Tensor]) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """``loss`` plus the alignment of the full-modality network's modality-specific features (recorded in
    ``parts``), and those features with their mask for the modality-gap log; unchanged without alignment."""
    if align is None:
        return loss, None
    feats = modality_specific(net, full, level)
    term = align(feats, present)
    parts["align"] = term.detach()
    return loss + term, (feats.detach(), present)


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def gradient_reversal(x: Tensor, scale: float = 1.0) -> Tensor:
    """Identity forward; the gradient is multiplied by -scale."""
    return _GradientReversal.apply(x, scale)


class Discriminator(nn.Module):
    """Which branch a bottleneck feature map comes from: one logit per sample."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 2, 8)
        self.conv = nn.Conv3d(channels, hidden, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.conv(x)).float().mean((2, 3, 4))
        return self.head(h).squeeze(1)


class Framework(nn.Module):
    """Common interface: ``forward(image, mask, present, label) -> StepResult``.

    image: (B, 4, D, H, W) with the case's modalities (zeros for files it lacks); present: (B, 4) the
    modalities the case has; mask: (B, 4) the training subset drawn for the step (within present).
    """

    kind = ""
    phases: Tuple[str, ...] = ("train",)

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.phase = self.phases[0]

    @property
    def inference_model(self) -> nn.Module:
        raise NotImplementedError

    @property
    def validated_model(self) -> nn.Module:
        """The network the validation of the current phase scores (the inference model but for kd's teacher)."""
        return self.inference_model

    @property
    def inference_model_name(self) -> str:
        return "slsnet" if isinstance(self.inference_model, SLSNet) else "unet3d"

    def phase_of_epoch(self, epoch: int) -> str:
        return self.phases[0]

    @property
    def aligned_network(self) -> nn.Module:
        """The network whose modality-specific features the alignment acts on."""
        return self.inference_model

    def aligned_features(self, image: Tensor, present: Tensor) -> Tensor:
        """(B, M, C, d, h, w): the features of every modality that the alignment acts on (with anchor
        ``none``, those it would act on), at the first aligned level; modalities absent from ``present``
        are zero inputs."""
        level = self.cfg.aligned_levels()[0]
        net = self.aligned_network
        if isinstance(net, SLSNet):
            return net(image, present, return_all=True).modality_features[level]
        return modality_specific(net, _masked(image, present), level)


class SLSFramework(Framework):
    kind = "sls"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        levels = cfg.aligned_levels()
        self.net = SLSNet(num_modalities=M, num_classes=cfg.num_classes, base_channels=cfg.base_channels,
                          depth=cfg.depth, max_channels=cfg.max_channels, fusion=cfg.fusion, align_levels=levels,
                          deep_supervision=cfg.deep_supervision, fused=cfg.fused)
        aligns = {str(lv): _align(cfg, lv) for lv in levels} if cfg.anchor != "none" else {}
        self.align = nn.ModuleDict(aligns)

    @property
    def inference_model(self) -> nn.Module:
        return self.net

    def forward(self, image, mask, present, label) -> StepResult:
        out = self.net(image, mask, return_all=True)
        seg = _seg(out.logits, label, self.cfg.output)
        parts = {"seg": seg.detach()}
        loss = seg
        if len(self.align):
            align = sum(a(out.modality_features[int(lv)], mask) for lv, a in self.align.items())
            parts["align"] = align.detach()
            loss = loss + align
        first = self.cfg.aligned_levels()[0]
        return StepResult(loss, parts, out.logits[0], (out.modality_features[first].detach(), mask))


class KDFramework(Framework):
    kind = "kd"
    phases = ("teacher", "student")

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.level = cfg.aligned_levels()[0]
        self.teacher = _unet(cfg)
        self.student = _unet(cfg)
        self.align = _align(cfg, self.level)

    @property
    def teacher_epochs(self) -> int:
        return self.cfg.teacher_epochs or self.cfg.epochs

    def phase_of_epoch(self, epoch: int) -> str:
        return "teacher" if epoch < self.teacher_epochs else "student"

    @property
    def inference_model(self) -> nn.Module:
        return self.student

    @property
    def validated_model(self) -> nn.Module:
        return self.teacher if self.phase == "teacher" else self.student

    @property
    def aligned_network(self) -> nn.Module:
        return self.teacher

    def forward(self, image, mask, present, label) -> StepResult:
        full = _masked(image, present)
        if self.phase == "teacher":
            out = self.teacher(full, present, return_all=True)
            seg = _seg(out.logits, label, self.cfg.output)
            parts = {"seg": seg.detach()}
            loss, aligned = _align_full_branch(self.align, self.teacher, full, present, self.level, seg, parts)
            return StepResult(loss, parts, out.logits[0], aligned)
        with torch.no_grad():
            self.teacher.eval()
            ref = self.teacher(full, present, return_all=True)
        out = self.student(_masked(image, mask), mask, return_all=True)
        seg = _seg(out.logits, label, self.cfg.output)
        kd = losses.distillation_loss(out.logits[0], ref.logits[0], self.cfg.kd_temperature, self.cfg.output).mean()
        feat = losses.feature_distillation(out.features[self.level], ref.features[self.level]).mean()
        loss = seg + self.cfg.kd_alpha * kd + self.cfg.kd_beta * feat
        parts = {"seg": seg.detach(), "kd": kd.detach(), "feat": feat.detach()}
        return StepResult(loss, parts, out.logits[0], None)


class DAFramework(Framework):
    kind = "da"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.level = cfg.aligned_levels()[0]
        self.full = _unet(cfg)
        self.missing = _unet(cfg)
        self.discriminator = Discriminator(level_channels(cfg, self.level))
        self.align = _align(cfg, self.level)

    @property
    def inference_model(self) -> nn.Module:
        return self.missing

    @property
    def aligned_network(self) -> nn.Module:
        return self.full

    def forward(self, image, mask, present, label) -> StepResult:
        full = _masked(image, present)
        out_f = self.full(full, present, return_all=True)
        out_m = self.missing(_masked(image, mask), mask, return_all=True)
        seg = _seg(out_f.logits, label, self.cfg.output) + _seg(out_m.logits, label, self.cfg.output)
        # the discriminator learns to tell the branches apart; through the reversal, the missing branch's
        # encoder learns to make its features look like the full branch's
        d_full = self.discriminator(out_f.features[self.level].detach())
        d_missing = self.discriminator(gradient_reversal(out_m.features[self.level]))
        adv = (F.binary_cross_entropy_with_logits(d_full, torch.ones_like(d_full), reduction="none")
               + F.binary_cross_entropy_with_logits(d_missing, torch.zeros_like(d_missing), reduction="none")).mean()
        loss = seg + self.cfg.adv_weight * adv
        parts = {"seg": seg.detach(), "adv": adv.detach()}
        loss, aligned = _align_full_branch(self.align, self.full, full, present, self.level, loss, parts)
        return StepResult(loss, parts, out_m.logits[0], aligned)


FRAMEWORK_CLASSES = {"sls": SLSFramework, "kd": KDFramework, "da": DAFramework}


def build_framework(cfg: TrainConfig) -> Framework:
    return FRAMEWORK_CLASSES[cfg.framework](cfg)
