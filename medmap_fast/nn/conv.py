"""``Conv3d``: ``nn.Conv3d`` that sends a single CPU volume to oneDNN.

For a batch of one 3D volume in float32 on the CPU, PyTorch's convolution dispatch picks its im2col
path ("Slow3d") instead of oneDNN, which it uses from a batch of two: on a 2-core AVX2 machine that
made a 3x3x3 convolution of 8 channels at 48^3 110 ms instead of 9 ms, and a small U-Net's forward
pass on one volume slower than on two (sliding-window inference with one window per batch, a
training batch of one). Same parameters, same state_dict; every other case goes through
``nn.Conv3d`` unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _takes_onednn(conv: nn.Conv3d, x: Tensor, weight: Tensor) -> bool:
    # oneDNN's convolution has float32 autograd on the CPU; under autocast the op would skip the cast
    # to the autocast dtype, and under torch.compile inductor chooses its own path.
    return (x.device.type == "cpu" and (x.dim() == 4 or (x.dim() == 5 and x.shape[0] == 1)) and x.dtype == torch.float32
            and weight.dtype == torch.float32 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` with a batch of one float32 CPU volume run by oneDNN (see the module doc)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias) -> Tensor:
        if _takes_onednn(self, input, weight):
            # an unbatched (C, D, H, W) volume is a batch of one, as nn.Conv3d reads it
            x = input.unsqueeze(0) if input.dim() == 4 else input
            out = torch.ops.aten.mkldnn_convolution(x, weight, bias, list(self.padding), list(self.stride),
                                                    list(self.dilation), self.groups)
            return out.squeeze(0) if input.dim() == 4 else out
        return super()._conv_forward(input, weight, bias)
