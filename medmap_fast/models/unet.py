"""UNet3D: the nnU-Net-style baseline, the modalities as input channels (zeros where missing)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from torch import Tensor, nn

from ._parts import (
    Decoder,
    Encoder,
    SegOutput,
    SegmentationModel,
    check_input,
    check_positive_int,
    common_config,
    init_weights,
    mask_input,
    presence,
    store_common_args,
)


class UNet3D(SegmentationModel):
    """3D U-Net (nnU-Net style) for brain-tumour segmentation from possibly incomplete MRI.

    ``depth`` levels: level 0 is two 3x3x3 Conv-InstanceNorm-LeakyReLU blocks at full resolution;
    each further level downsamples with a stride-2 convolution, then one stride-1 block. Channels
    ``min(base_channels * 2**i, max_channels)``. The decoder upsamples with 2x2x2 transposed
    convolutions, concatenates the skip and applies two blocks; 1x1x1 heads give the logits at every
    decoder level (deep supervision) or at full resolution only.

    Defaults are for 128^3 BraTS crops on a GPU; ``UNet3D.small()`` (8 base channels, 4 levels, at most
    64 channels) runs on a CPU.

    Args:
        in_channels: input channels, the modalities (t1, t1ce, t2, flair).
        num_classes: output channels: 3 sigmoid regions (WT, TC, ET) or 4 softmax classes (0, 1, 2, 4).
        base_channels, depth, max_channels: the widths and the number of levels (>= 2).
        deep_supervision: a head at every decoder level (else at full resolution only).
        negative_slope: of the LeakyReLUs (and of the Kaiming initialisation).
        fused: build the blocks from the fused :class:`medmap_fast.nn.ConvNormAct3d` (True) or from
            plain ``torch.nn`` modules (False); both have the same state_dict.
        backend: the fused ops' backend (None: automatic); unused with ``fused=False``.

    ``forward(x, mask=None, return_all=False)``: x (B, in_channels, D, H, W), D, H, W divisible by
    2**(depth-1); mask (B, in_channels), True where a modality is present (None: all). Returns the
    full-resolution logits (B, num_classes, D, H, W), or with ``return_all`` a :class:`SegOutput`.
    """

    def __init__(
        self,
        in_channels: int = 4,
        num_classes: int = 3,
        base_channels: int = 32,
        depth: int = 5,
        max_channels: int = 320,
        deep_supervision: bool = True,
        negative_slope: float = 0.01,
        fused: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        store_common_args(self, locals())

        block_backend = backend if fused else None
        self.encoder = Encoder(in_channels, self.channels, self.negative_slope, fused, block_backend)
        self.decoder = Decoder(self.channels, num_classes, deep_supervision, self.negative_slope, fused,
                               block_backend)
        init_weights(self, self.negative_slope)

    def config(self) -> Dict[str, Any]:
        """The constructor arguments (JSON-serialisable): ``build_model("unet3d", **model.config())``."""
        return dict(in_channels=self.in_channels, **common_config(self))

    def encode(self, x: Tensor) -> List[Tensor]:
        """Encoder features of every level, full resolution first, bottleneck last (x is not masked here)."""
        return self.encoder(x)

    def decode(self, skips: Sequence[Tensor]) -> List[Tensor]:
        """Logits of every head, highest resolution first, from the encoder features of :meth:`encode`."""
        return self.decoder(skips)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, return_all: bool = False
                ) -> Union[Tensor, SegOutput]:
        check_input(x, self.in_channels, self.depth, "one channel per modality")
        present = presence(mask, x, self.in_channels)
        skips = self.encoder(mask_input(x, present))
        # Inference needs only the full-resolution head: the others are not computed.
        logits = self.decoder(skips, all_heads=return_all)
        if not return_all:
            return logits[0]
        return SegOutput(logits, dict(enumerate(skips)), {})
