"""A single 3D volume (batch of one) through nn.Conv3d, which PyTorch's CPU dispatch sends to its im2col
path, against medmap_fast.nn.conv.Conv3d, which sends it to oneDNN; and the small SLSNet's forward pass
on one 48^3 volume both ways. Float32, CPU, medians of 7 calls after 2 warm-up calls.

    python benchmarks/conv_single_volume.py
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from medmap_fast.models import SLSNet
from medmap_fast.nn.conv import Conv3d

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (benchmarks/_timing.py, beside this file)

SHAPES = [  # (in, out channels, size, stride): the small U-Net's levels at 48^3
    (1, 8, 48, 1), (8, 8, 48, 1), (8, 16, 48, 2), (16, 16, 24, 1), (32, 32, 12, 1), (64, 64, 6, 1),
]


def median_ms(fn, rounds: int = 7) -> float:
    return 1e3 * _timing.median_seconds(fn, rounds, warmup=2)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'conv 3x3x3':28s} {'nn.Conv3d ms':>13s} {'oneDNN ms':>10s} {'speed-up':>9s}")
    for cin, cout, size, stride in SHAPES:
        torch.manual_seed(0)
        plain = nn.Conv3d(cin, cout, 3, stride, 1)
        ours = Conv3d(cin, cout, 3, stride, 1)
        ours.load_state_dict(plain.state_dict())
        x = torch.randn(1, cin, size, size, size)
        with torch.no_grad():
            a, b = median_ms(lambda: plain(x)), median_ms(lambda: ours(x))
        print(f"{f'{cin}->{cout} ch, {size}^3, stride {stride}':28s} {a:13.2f} {b:10.2f} {a / b:8.1f}x")
    x, m = torch.randn(1, 4, 48, 48, 48), torch.ones(1, 4, dtype=torch.bool)
    for label, grad in (("forward", False), ("forward+backward", True)):
        res = []
        for fused in (False, True):
            torch.manual_seed(0)
            net = SLSNet.small(fused=fused)

            def step():
                if grad:
                    net(x, m).sum().backward()
                else:
                    with torch.no_grad():
                        net(x, m)
            res.append(median_ms(step, rounds=5))
        print(f"SLSNet.small, one 48^3 volume, {label}: fused=False {res[0]:.0f} ms, fused=True {res[1]:.0f} ms "
              f"({res[0] / res[1]:.1f}x)")


if __name__ == "__main__":
    main()
