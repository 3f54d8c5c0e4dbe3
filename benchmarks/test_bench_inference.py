"""Sliding-window inference: seconds per case for a small 3-D U-Net over a BraTS-like volume.

The volume is BraTS' 240 x 240 x 155 scaled by size/128 (120 x 120 x 78 at the CPU size 64, 30 x 30 x 19
at size 16 in CI), the window size^3 (the 128^3 of BraTS models, scaled the same way), overlap 0.5,
Gaussian weighting: 3 x 3 x 2 = 18 windows, as for a real BraTS case at 128^3. The model is a two-level
U-Net of plain torch.nn layers (Conv3d, InstanceNorm3d, LeakyReLU; 8 and 16 channels, stride-2 down,
transposed-conv up, one skip), float32, every modality present.

Two windows per model call (the default batch size). "model only" runs the same model on the same
number of windows, batched alike, with no window extraction or blending: the difference is the cost of
the sliding window itself.
"""

import os

import pytest
import torch
from torch import nn

from medmap_fast import _bench
from medmap_fast.evaluation import sliding_window_inference, window_positions

BRATS_SHAPE = (240, 240, 155)
OVERLAP = 0.5
BATCH = 2


def _block(cin, cout, stride=1):
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class TinyUNet(nn.Module):
    def __init__(self, modalities=4, classes=4, base=8):
        super().__init__()
        self.enc1 = nn.Sequential(_block(modalities, base), _block(base, base))
        self.enc2 = nn.Sequential(_block(base, 2 * base, stride=2), _block(2 * base, 2 * base))
        self.up = nn.ConvTranspose3d(2 * base, base, 2, stride=2)
        self.dec1 = _block(2 * base, base)
        self.head = nn.Conv3d(base, classes, 1)

    def forward(self, x, mask):
        x = x * mask[:, :, None, None, None].to(x.dtype)  # a missing modality contributes nothing
        e1 = self.enc1(x)
        d1 = self.dec1(torch.cat([self.up(self.enc2(e1)), e1], dim=1))
        return self.head(d1)


def _setup(size, device):
    shape = tuple(max(8, round(s * size / 128)) for s in BRATS_SHAPE)
    torch.manual_seed(0)
    model = TinyUNet().to(device).eval()
    image = torch.randn(1, 4, *shape, device=device)
    mask = torch.ones(1, 4, dtype=torch.bool, device=device)
    return model, image, mask, shape


@pytest.mark.parametrize("impl", ["sliding window", "model only"])
def test_sliding_window_inference(benchmark, device, size, impl):
    model, image, mask, shape = _setup(size, device)
    window = (size, size, size)
    n_windows = len(window_positions(shape, window, OVERLAP))
    if impl == "sliding window":

        def run():
            out = sliding_window_inference(model, image, mask, window=window, overlap=OVERLAP, batch_size=BATCH)
            _bench.synchronize(device)
            return out
    else:
        batch = torch.randn(BATCH, 4, *window, device=device)
        bmask = torch.ones(BATCH, 4, dtype=torch.bool, device=device)

        def run():
            with torch.no_grad():
                for _ in range(-(-n_windows // BATCH)):
                    out = model(batch, bmask)
            _bench.synchronize(device)
            return out

    benchmark.group = "sliding-window inference"
    rounds = 10 if device.type == "cuda" else 3
    benchmark.extra_info.update(
        impl=impl,
        volume=list(shape),
        window=list(window),
        overlap=OVERLAP,
        windows=n_windows,
        batch_size=BATCH,
        params=sum(p.numel() for p in model.parameters()),
    )
    out = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    med = benchmark.stats.stats.median
    # the machine may be shared: the load during the run says how far to trust the figure
    benchmark.extra_info.update(
        seconds_per_case=med, seconds_per_window=med / n_windows, load_average=os.getloadavg()[0]
    )
    if impl == "sliding window":
        assert out.shape == (1, 4, *shape) and torch.isfinite(out).all()
