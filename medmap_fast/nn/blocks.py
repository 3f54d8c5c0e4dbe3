"""3D U-Net building blocks with the norm and activation fused (SPEC section 5).

The convolution itself stays with cuDNN / oneDNN. The blocks keep the parameter names of their plain
PyTorch equivalents, so checkpoints load both ways:

* :class:`ConvNormAct3d` == ``nn.Sequential(nn.Conv3d, nn.InstanceNorm3d(affine=True), nn.LeakyReLU)``
  (keys ``0.weight``, ``0.bias``, ``1.weight``, ``1.bias``);
* :class:`NormActConv3d` == ``nn.Sequential(nn.InstanceNorm3d(affine=True), nn.LeakyReLU, nn.Conv3d)``
  (keys ``0.*`` for the norm, ``2.*`` for the convolution).

With ``model.to(memory_format=torch.channels_last_3d)`` and channels-last inputs every tensor between
the blocks stays channels-last: no transposes run between convolution and norm.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

from torch import Tensor, nn

from .conv import Conv3d
from .norm_act import FusedNormAct

Size3 = Union[int, Sequence[int]]


def _same_padding(kernel_size: Size3, dilation: Size3):
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    d = (dilation,) * 3 if isinstance(dilation, int) else tuple(dilation)
    if any(ki % 2 == 0 for ki in k):
        raise ValueError(f"padding=None (same size) needs odd kernel sizes, got kernel_size={kernel_size!r}; "
                         "give padding explicitly")
    return tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))


def _norm_kwargs(norm, num_groups, activation, negative_slope, eps, backend):
    # spatial_dims=3: an unbatched (C, D, H, W) volume, which nn.Conv3d accepts, is normalised as one
    # sample (as nn.InstanceNorm3d does) instead of being read as a batch of C.
    return dict(norm=norm, num_groups=num_groups, activation=activation, negative_slope=negative_slope, eps=eps,
                backend=backend, spatial_dims=3)


class ConvNormAct3d(nn.Sequential):
    """Conv3d, then instance (or group) norm and LeakyReLU fused: the post-activation U-Net block.

    ``padding=None`` keeps the spatial size (odd kernels). ``bias`` is the convolution's (on by default,
    as in ``nn.Conv3d``, so state dicts match; a norm right after makes it redundant, and ``bias=False``
    saves its gradient).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size3 = 3,
        stride: Size3 = 1,
        padding: Optional[Size3] = None,
        dilation: Size3 = 1,
        bias: bool = True,
        norm: str = "instance",
        num_groups: Optional[int] = None,
        activation: Optional[str] = "leaky_relu",
        negative_slope: float = 0.01,
        eps: float = 1e-5,
        backend: Optional[str] = None,
    ):
        padding = _same_padding(kernel_size, dilation) if padding is None else padding
        super().__init__(OrderedDict([
            ("0", Conv3d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)),
            ("1", FusedNormAct(out_channels, **_norm_kwargs(norm, num_groups, activation, negative_slope, eps,
                                                            backend))),
        ]))


class NormActConv3d(nn.Sequential):
    """Norm and activation fused, then Conv3d: the pre-activation block. The slot ``1`` of the plain
    ``nn.Sequential(norm, act, conv)`` holds no parameters and is left out, so the keys match."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size3 = 3,
        stride: Size3 = 1,
        padding: Optional[Size3] = None,
        dilation: Size3 = 1,
        bias: bool = True,
        norm: str = "instance",
        num_groups: Optional[int] = None,
        activation: Optional[str] = "leaky_relu",
        negative_slope: float = 0.01,
        eps: float = 1e-5,
        backend: Optional[str] = None,
    ):
        padding = _same_padding(kernel_size, dilation) if padding is None else padding
        super().__init__(OrderedDict([
            ("0", FusedNormAct(in_channels, **_norm_kwargs(norm, num_groups, activation, negative_slope, eps,
                                                           backend))),
            ("2", Conv3d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)),
        ]))


class ResidualBlock3d(nn.Module):
    """The residual block of residual U-Nets (nnU-Net's ResEnc encoders, ResNet's basic block):

        out = act(norm2(conv2(act(norm1(conv1(x))))) + skip(x))

    with ``skip`` the identity, or a strided 1x1x1 convolution and a norm (no activation) when the
    stride or the channel count changes. The residual is added inside the second fused norm, before
    its activation. Parameter names: ``conv1``, ``norm1``, ``conv2``, ``norm2``, ``skip.0`` (conv),
    ``skip.1`` (norm), the same as the plain block built from ``nn.Conv3d`` / ``nn.InstanceNorm3d``
    modules of those names.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size3 = 3,
        stride: Size3 = 1,
        bias: bool = True,
        norm: str = "instance",
        num_groups: Optional[int] = None,
        activation: Optional[str] = "leaky_relu",
        negative_slope: float = 0.01,
        eps: float = 1e-5,
        backend: Optional[str] = None,
    ):
        super().__init__()
        padding = _same_padding(kernel_size, 1)
        kw = _norm_kwargs(norm, num_groups, activation, negative_slope, eps, backend)
        self.conv1 = Conv3d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.norm1 = FusedNormAct(out_channels, **kw)
        self.conv2 = Conv3d(out_channels, out_channels, kernel_size, 1, padding, bias=bias)
        self.norm2 = FusedNormAct(out_channels, **kw)
        strided = stride != 1 and stride != (1, 1, 1) and stride != [1, 1, 1]
        if strided or in_channels != out_channels:
            self.skip = nn.Sequential(OrderedDict([
                ("0", Conv3d(in_channels, out_channels, 1, stride, 0, bias=False)),
                ("1", FusedNormAct(out_channels, **dict(kw, activation="identity"))),
            ]))
        else:
            self.skip = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.norm1(self.conv1(x)))
        return self.norm2(out, residual=self.skip(x))
